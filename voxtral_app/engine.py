"""The Voxtral engine: load the model once, then serve every conversation from one decode thread.

One GPU, one thread: `Engine` owns the model and a background loop that prefills new turns and
runs batched decode steps for all replies in flight. A `Chat` is one conversation; it keeps its
messages and which tokens its KV-cache slot holds, so a new turn only encodes and prefills what
is new (the longest common prefix with the cache is kept).
"""

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checkpoint
from . import prompt as prompts
from .generate import Decoder, sample

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "mistralai/Voxtral-Mini-3B-2507"


@dataclass(frozen=True)
class EngineOptions:
    model: str = DEFAULT_MODEL  # hub id or local checkpoint directory
    device: str = "auto"  # "auto": CUDA when available, else CPU
    compile: bool | None = None  # torch.compile the hot path; None: on with CUDA, off on CPU
    slots: int = 8  # conversations held at once, each with its own KV cache
    max_tokens: int = 8192  # KV cache per conversation (~16 turns of 30 s audio); older turns are dropped
    max_audio_s: float = 300.0  # per-turn audio cap, 5 min; longer speech keeps its last 5 min
    warmup: bool = True  # run (and compile) the hot path once at load so no user waits on it


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.2  # Mistral's recommendation for Voxtral chat
    top_p: float = 0.95
    max_new_tokens: int = 512  # reply length cap, tokens


CHAT = Sampling()
TRANSCRIBE = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=1024)  # greedy, as recommended


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says how to point at a local checkpoint."""


class EngineBusy(RuntimeError):
    """Every conversation slot is taken."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def download_hint(model: str) -> str:
    return (f"Download the checkpoint once, e.g. `hf download {DEFAULT_MODEL} --local-dir models/voxtral`, "
            "then start with `--model models/voxtral` (or VOXTRAL_MODEL=models/voxtral).")


def checkpoint_path(model: str) -> str:
    """Hub id or directory -> local directory, downloading (with progress bars) if needed."""
    if model == checkpoint.TINY:
        return checkpoint.build_tiny(os.path.join(os.path.expanduser("~"), ".cache", "voxtral_app", checkpoint.TINY))
    if os.path.isdir(model):
        return model
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise ModelLoadError(f"No model directory at '{model}'. {download_hint(model)}")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(model, allow_patterns=list(checkpoint.HUB_FILES))
    except Exception as error:  # offline, unknown repo, gated, network: all end the same way
        raise ModelLoadError(f"Could not get '{model}' from the Hugging Face Hub ({type(error).__name__}: "
                             f"{error}). {download_hint(model)}") from error


def load_engine(options: EngineOptions, background_warmup: bool = False) -> "Engine":
    """Load processor and model from a hub id or local directory and start the decode thread.

    With `background_warmup` the warm-up (and compilation) runs while the caller goes on to
    serve; `engine.ready` is set when it is done.
    """
    from transformers import AutoProcessor, VoxtralForConditionalGeneration

    device = resolve_device(options.device)
    path = checkpoint_path(options.model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = VoxtralForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=device)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"'{path}' is not a loadable Voxtral checkpoint ({error}). "
                             f"{download_hint(options.model)}") from error
    model.eval()
    logger.info("loaded %s on %s (%s) in %.1f s", options.model, device, dtype, time.perf_counter() - started)
    engine = Engine(model, processor, options)
    if not options.warmup:
        engine.ready.set()
    elif background_warmup:
        threading.Thread(target=engine.warm_up, name="voxtral-warmup", daemon=True).start()
    else:
        engine.warm_up()
    return engine


@dataclass(eq=False)
class Generation:
    """One reply being produced by the decode thread."""

    slot: int
    ids: list[int]  # prompt tokens to prefill, from position `start`
    start: int
    features: torch.Tensor | None
    sampling: Sampling
    tokens: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # sampled ids, then None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    fed: list[int] = field(default_factory=list)  # generated tokens whose keys/values are in the cache
    error: Exception | None = None
    submitted: float = field(default_factory=time.perf_counter)  # the turn began (prompt building included)
    queued: float = 0.0  # handed to the decode thread, inputs ready
    first_token: float | None = None
    finished: float | None = None
    # decode-thread state
    next_token: int = -1
    position: int = 0
    count: int = 0


class Engine:
    """The model, its slot cache and the decode thread that serves every conversation."""

    def __init__(self, model, processor, options: EngineOptions):
        self.model = model
        self.processor = processor
        self.options = options
        self.device = model.device
        compile = options.compile if options.compile is not None else self.device.type == "cuda"
        self.decoder = Decoder(model, options.slots, options.max_tokens, compile)
        tokenizer = processor.tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.begin_audio_id = tokenizer.convert_tokens_to_ids("[BEGIN_AUDIO]")
        self.free_slots = list(range(options.slots))
        self.pending: list[Generation] = []
        self.active: list[Generation] = []
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self.run, name="voxtral-decode", daemon=True)
        self.ready = threading.Event()  # set once warm-up (and compilation) is done
        self.closed = False  # set by close(): the decode thread ends
        self.thread.start()

    # -- conversations --------------------------------------------------------------------------

    def open_chat(self) -> "Chat":
        with self.wake:
            if not self.free_slots:
                raise EngineBusy(f"all {self.options.slots} conversation slots are in use; try again shortly")
            return Chat(self, self.free_slots.pop(0))

    def release(self, slot: int) -> None:
        with self.wake:
            if slot not in self.free_slots:
                self.free_slots.append(slot)

    @property
    def active_chats(self) -> int:
        return self.options.slots - len(self.free_slots)

    def submit(self, generation: Generation) -> Generation:
        generation.queued = time.perf_counter()
        with self.wake:
            self.pending.append(generation)
            self.wake.notify()
        return generation

    def features(self, clips: list[np.ndarray]) -> torch.Tensor | None:
        return prompts.audio_features(self.processor, clips, self.device)

    def warm_up(self) -> None:
        """Encode, prefill and decode once (and at the batch sizes used) before the first user."""
        started = time.perf_counter()
        chats = [self.open_chat() for _ in range(min(2, self.options.slots))]
        try:
            audio = np.sin(np.linspace(0, 2000, prompts.CHUNK_SAMPLES // 30)).astype(np.float32) * 0.1
            replies = [chat.start(audio, sampling=Sampling(max_new_tokens=4)) for chat in chats]
            for reply in replies:
                "".join(reply)
        finally:
            for chat in chats:
                chat.close()
            self.ready.set()
        logger.info("warm-up done in %.1f s (compiled: %s)", time.perf_counter() - started, self.decoder.compiled)

    # -- decode thread --------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """End every reply and stop the decode thread. Call before exit: a daemon thread still inside
        a torch op when the interpreter finalizes aborts the process (std::terminate, exit status 134)."""
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout_s)

    def run(self) -> None:
        if self.decoder.compiled:
            self.decoder.allow_variants()
            if self.options.warmup:  # here, not in the caller's thread: CUDA graphs are recorded per thread
                self.decoder.warm_up()
        while True:
            with self.wake:
                while not self.pending and not self.active and not self.closed:
                    self.wake.wait()
                if self.closed:
                    for generation in self.pending + self.active:
                        self.finish(generation)
                    self.pending, self.active = [], []
                    return
                new, self.pending = self.pending, []
            for generation in new:
                self.prefill(generation)
            self.active = [g for g in self.active if not g.done.is_set()]
            for generation in self.active:
                if generation.cancelled.is_set():
                    self.finish(generation)
            self.active = [g for g in self.active if not g.done.is_set()]
            if self.active:
                self.decode(self.active)

    def prefill(self, generation: Generation) -> None:
        if generation.cancelled.is_set():
            return self.finish(generation)
        try:
            logits = self.decoder.prefill(generation.slot, generation.ids, generation.start, generation.features)
            s = generation.sampling
            token = int(logits.argmax()) if s.temperature <= 0 else int(sample(
                logits[None], torch.tensor([s.temperature], device=self.device),
                torch.tensor([s.top_p], device=self.device))[0])
        except Exception as error:  # OOM, bad input: fail this turn, keep serving
            logger.exception("prefill failed")
            generation.error = error
            return self.finish(generation)
        generation.position = generation.start + len(generation.ids)
        generation.first_token = time.perf_counter()
        if self.emit(generation, token):
            self.active.append(generation)

    def decode(self, batch: list[Generation]) -> None:
        try:
            tokens = self.decoder.step(
                [g.slot for g in batch], [g.next_token for g in batch], [g.position for g in batch],
                [g.sampling.temperature for g in batch], [g.sampling.top_p for g in batch])
        except Exception as error:
            logger.exception("decode step failed")
            for generation in batch:
                generation.error = error
                self.finish(generation)
            return
        for generation, token in zip(batch, tokens):
            generation.fed.append(generation.next_token)
            generation.position += 1
            self.emit(generation, token)

    def emit(self, generation: Generation, token: int) -> bool:
        """Hand out a sampled token; False when the reply is over."""
        if token == self.eos_id:
            self.finish(generation)
            return False
        generation.tokens.put(token)
        generation.count += 1
        generation.next_token = token
        full = generation.position + 1 >= self.options.max_tokens
        if generation.count >= generation.sampling.max_new_tokens or full or generation.cancelled.is_set():
            self.finish(generation)
            return False
        return True

    def finish(self, generation: Generation) -> None:
        if not generation.done.is_set():
            generation.finished = time.perf_counter()
            generation.tokens.put(None)
            generation.done.set()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def clip_key(clip: np.ndarray) -> str:
    return hashlib.blake2b(clip.tobytes(), digest_size=16).hexdigest()


class Reply:
    """A reply in progress: iterate for text pieces as tokens arrive; `cancel()` stops it."""

    def __init__(self, engine: Engine, generation: Generation, record: bool):
        self.engine = engine
        self.generation = generation
        self.record = record  # chat replies join the conversation; transcripts do not
        self.tokens: list[int] = []  # handed to the reader
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        decode = self.engine.processor.tokenizer.decode
        while (token := self.generation.tokens.get()) is not None:
            self.tokens.append(token)
            text = decode(self.tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                continue
            piece, self.text = text[len(self.text):], text
            if piece:
                yield piece
        if self.generation.error is not None:
            raise RuntimeError(f"generation failed: {self.generation.error}") from self.generation.error

    def cancel(self) -> None:
        self.generation.cancelled.set()
        with self.engine.wake:
            self.engine.wake.notify()

    @property
    def done(self) -> bool:
        return self.generation.done.is_set()

    @property
    def stats(self) -> dict:
        g = self.generation
        end = g.finished or time.perf_counter()
        first = (g.first_token - g.submitted) if g.first_token else None
        decode_s = end - g.first_token if g.first_token else 0.0
        rate = (len(g.fed) / decode_s) if decode_s > 0 else 0.0
        return {"prefill_tokens": len(g.ids), "cached_tokens": g.start, "first_token_s": first,
                "tokens": g.count, "tokens_per_s": rate}


class Chat:
    """One conversation: its messages and what its KV-cache slot holds."""

    def __init__(self, engine: Engine, slot: int):
        self.engine = engine
        self.slot = slot
        self.messages: list[dict] = []
        self.encoded: tuple[int, prompts.Prompt] | None = None  # (messages encoded, their prompt)
        self.cached: list[int] = []  # token ids whose keys/values are in the slot, in order
        self.cached_clips: list[tuple[int, str]] = []  # (block start, clip hash) for audio in the slot
        self.current: Reply | None = None
        self.closed = False

    def start(self, audio: np.ndarray | None = None, text: str = "", sampling: Sampling = CHAT) -> Reply:
        """Add a user turn and start the reply (prefill begins now; iterate the Reply for text)."""
        started = time.perf_counter()
        self.settle()
        self.messages.append(prompts.user_message(audio, text))
        prompt = self.fit(sampling)
        return self.launch(prompt, sampling, record=True, started=started)

    def transcribe(self, audio: np.ndarray, language: str | None = None) -> Reply:
        """Start a transcription of `audio`; it is not added to the conversation."""
        started = time.perf_counter()
        self.settle()
        prompt = prompts.transcription_prompt(self.engine.processor, audio, language, self.engine.options.model)
        return self.launch(prompt, TRANSCRIBE, record=False, started=started)

    def discard(self, reply: Reply) -> None:
        """Drop a reply that was started speculatively, and the user turn it answered."""
        reply.cancel()
        recorded, reply.record = reply.record, False
        if self.current is reply:
            self.settle()
            if recorded and self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()
                self.encoded = None

    def cancel(self) -> None:
        if self.current is not None:
            self.current.cancel()

    def reset(self) -> None:
        """Forget the conversation (the cache is overwritten by the next turn)."""
        self.settle(cancel=True)
        self.messages = []
        self.encoded = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.settle(cancel=True)
            self.engine.release(self.slot)

    # -- internals ------------------------------------------------------------------------------

    def fit(self, sampling: Sampling) -> prompts.Prompt:
        """Prompt for the conversation, dropping its oldest turns until prompt + reply fit the cache."""
        limit = self.engine.options.max_tokens - sampling.max_new_tokens
        target = limit  # once over the limit, drop down to half of it: the whole cache is
        while True:  # re-prefilled after a drop, so let that happen once every few turns, not every turn
            prompt = self.encode()
            if len(prompt.ids) <= target or len(self.messages) <= 1:
                break
            logger.info("conversation over %d tokens; dropping its oldest turn", target)
            target = limit // 2
            self.messages = self.messages[2:] if self.messages[1]["role"] == "assistant" else self.messages[1:]
            self.encoded = None
        if len(prompt.ids) > limit:
            self.messages.pop()
            self.encoded = None
            raise ValueError(f"this turn needs {len(prompt.ids)} prompt tokens; the limit is {limit}")
        return prompt

    def encode(self) -> prompts.Prompt:
        """The conversation's prompt; when it only grew by a reply and a new user turn since the
        last one, extend that (a 20-turn conversation re-encoded costs ~30 ms of CPU per turn)."""
        n = len(self.messages)
        if self.encoded is not None and self.encoded[0] == n - 2 and self.messages[-2]["role"] == "assistant":
            prompt = prompts.extend_prompt(self.engine.processor, self.encoded[1], self.messages[-2]["content"],
                                           self.messages[-1])
        else:
            prompt = prompts.chat_prompt(self.engine.processor, self.messages)
        self.encoded = (n, prompt)
        return prompt

    def launch(self, prompt: prompts.Prompt, sampling: Sampling, record: bool, started: float) -> Reply:
        starts = prompts.audio_block_starts(prompt.ids, self.engine.begin_audio_id)
        clips = list(zip(starts, map(clip_key, prompt.audio)))
        keep = min(common_prefix(self.cached, prompt.ids), len(prompt.ids) - 1)
        for (start, key), cached in zip(clips, self.cached_clips + [None] * len(clips)):
            if start < keep and cached != (start, key):  # same tokens, different sound: re-encode
                keep = start
        new_clips = [clip for clip, (start, _) in zip(prompt.audio, clips) if start >= keep]
        generation = Generation(self.slot, prompt.ids[keep:], keep, self.engine.features(new_clips), sampling,
                                submitted=started)
        self.current = Reply(self.engine, self.engine.submit(generation), record)
        self.prompt_ids, self.prompt_clips = prompt.ids, clips
        return self.current

    def settle(self, cancel: bool = False) -> None:
        """Wait for the last reply to leave the decode thread and book what the slot now holds."""
        reply, self.current = self.current, None
        if reply is None:
            return
        if cancel:
            reply.cancel()
        reply.generation.done.wait()
        if reply.generation.error is not None:
            self.cached, self.cached_clips = [], []
        else:
            self.cached = self.prompt_ids + reply.generation.fed
            self.cached_clips = self.prompt_clips
        if reply.record and reply.text.strip():
            self.messages.append(prompts.assistant_message(reply.text.strip()))  # as mistral-common keeps it
