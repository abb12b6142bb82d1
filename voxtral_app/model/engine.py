"""The Voxtral engine: one decode thread serves every conversation on one model.

`Engine` owns the model's slot cache and a background thread that prefills new turns and runs
batched decode steps for all replies in flight. A long prompt is prefilled a piece at a time
(`prefill_chunk` tokens), with a decode step for the replies in flight between pieces. Conversations reach it only through messages: a
`Generation` handed to `submit()`, whose tokens come back on its own queue, and a `cancelled`
event. A watchdog view (`failure`, `stuck`) lets /health and the app notice a dead or hung thread.
Loading and warm-up live in loading.py; a conversation's KV-slot bookkeeping in chat.py. The
model itself (generate.Decoder) runs in this process, or in a child process of its own
(`model_process`, model_process.py), called only from the decode thread either way. Telemetry
listens from outside (`listen()`): the engine imports no metrics library, so the GPU bench needs none.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backends.contract import EngineBusy, EngineFailed
from . import prompt as prompts
from .chat import Chat
from .decoder import Decoder, sample
from .generation import Generation

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
    stuck_after_s: float = 30.0  # the decode thread has work but has not stepped for this long: stuck
    prefill_chunk: int = 512  # prompt tokens prefilled between two decode steps: a long prompt (a 5 min
    # upload, a trimmed conversation's re-prefill) never holds up the replies in flight for long
    decode_gap_s: float = 0.05  # while a finished turn waits for its prefill, replies in flight get a step
    # only this often: 4 turns ending at once each waited for the others' decode steps too, but a stream of
    # long prompts must not starve the replies in flight either
    model_process: bool = False  # the model in a child process with its own GIL (model_process.py); app.py's default
    transcript_tokens: int = 1024  # longest transcript, tokens (a chat reply's cap: ConversationOptions.reply_tokens)


class Engine:
    """The model, its slot cache and the decode thread that serves every conversation.

    Ownership: `pending`, `free_slots`, `failure` and `in_flight` are guarded by `self.wake` (a
    Condition); `active`, `filling`, `stepped` and the decoder's cache belong to the decode thread alone.
    """

    def __init__(self, model, processor, options: EngineOptions, on_failure: Callable[[BaseException], None] | None = None,
                 decoder=None):
        """`decoder`: a model_process.ModelProcess (then `model` is None), or by default a Decoder on `model`."""
        self.model = model
        self.processor = processor
        self.options = options
        if decoder is None:
            decoder = Decoder(model, options.slots, options.max_tokens, options.compile,
                              extractor=processor.feature_extractor)
        self.decoder = decoder
        self.model_device = decoder.device  # where the model runs
        self.device = decoder.inputs_device  # where first tokens are sampled
        tokenizer = processor.tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.begin_audio_id = tokenizer.convert_tokens_to_ids("[BEGIN_AUDIO]")
        self.inst_id = tokenizer.convert_tokens_to_ids("[INST]")  # each user turn begins with it
        self.structure = {tokenizer.convert_tokens_to_ids(token) for token in prompts.STRUCTURE}
        self.on_failure = on_failure  # called once, on the dying thread, if the decode thread dies
        self.free_slots = list(range(options.slots))
        self.pending: list[Generation] = []
        self.active: list[Generation] = []
        self.filling: list[Generation] = []  # taken from `pending`, being prefilled (decode thread)
        self.stepped = 0.0  # when the last decode step began (decode thread)
        self.in_flight = 0  # generations submitted and not yet finished
        self.failure: BaseException | None = None  # why the decode thread died
        self.wake = threading.Condition()
        self.beat = time.monotonic()  # the decode thread's last sign of life (a float: written by it alone)
        self.ready = threading.Event()  # set once warm-up (and compilation) succeeded
        self.closed = False  # set by close(): the decode thread ends
        self.listeners: tuple[Callable[[str, float], None], ...] = ()  # told (phase, seconds) of each prefill
        # piece and decode step, on the decode thread; replaced whole by listen(), never mutated
        self.thread = threading.Thread(target=self.run, name="voxtral-decode", daemon=True)
        self.thread.start()
        decoder.watch(self.fail)  # a model process that exits is the engine's failure

    # -- what the server shows (backends.contract.Backend) ---------------------------------------

    @property
    def device_kind(self) -> str:
        return self.model_device.type

    @property
    def device_name(self) -> str:
        return str(self.model_device)

    @property
    def compiled(self) -> bool:
        return self.decoder.compiled

    def memory_bytes(self) -> int:
        return self.decoder.memory_bytes()

    def describe(self) -> dict:
        return {"kind": "local"}

    def listen(self, listener: Callable[[str, float], None]) -> None:
        """Call `listener(phase, seconds)` after each prefill piece ("prefill") and decode step ("decode"),
        on the decode thread: it must be quick and must not raise. Listening twice is listening once."""
        with self.wake:
            if listener not in self.listeners:
                self.listeners = self.listeners + (listener,)

    def timed(self, phase: str, seconds: float) -> None:
        for listener in self.listeners:
            listener(phase, seconds)

    # -- conversations --------------------------------------------------------------------------

    def open_chat(self):
        """A new conversation on a free KV-cache slot (a session.Chat); EngineBusy when none is free."""
        with self.wake:
            if self.failure is not None:
                raise EngineFailed(f"the model server has failed ({self.failure}); it needs a restart")
            if not self.free_slots:
                raise EngineBusy(f"all {self.options.slots} conversation slots are in use; try again shortly")
            return Chat(self, self.free_slots.pop(0))

    def release(self, slot: int) -> None:
        with self.wake:
            if slot not in self.free_slots:
                self.free_slots.append(slot)

    @property
    def active_chats(self) -> int:
        with self.wake:
            return self.options.slots - len(self.free_slots)

    def submit(self, generation: Generation) -> Generation:
        generation.queued = time.perf_counter()
        with self.wake:
            if self.failure is not None:
                raise EngineFailed(f"the model server has failed ({self.failure}); it needs a restart")
            self.pending.append(generation)
            self.in_flight += 1
            self.wake.notify()
        return generation

    def cancel(self, generation: Generation) -> None:
        generation.cancelled.set()
        self.wake_up()

    def wake_up(self) -> None:
        """Tell the decode thread a generation's events changed (cancelled, wanted)."""
        with self.wake:
            self.wake.notify()

    @property
    def stuck(self) -> bool:
        """The decode thread has work but has not stepped for `stuck_after_s` (hung kernel, deadlock)."""
        with self.wake:
            busy = self.in_flight > 0
        return busy and self.ready.is_set() and time.monotonic() - self.beat > self.options.stuck_after_s

    @property
    def healthy(self) -> bool:
        return self.failure is None and self.thread.is_alive() and not self.stuck

    # -- decode thread --------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """End every reply and stop the decode thread. Call before exit: a daemon thread still inside
        a torch op when the interpreter finalizes aborts the process (std::terminate, exit status 134)."""
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout_s)
        self.decoder.close()

    def run(self) -> None:
        """The decode thread. If anything escapes the per-step error handling, it dies *loudly*:
        every waiting reply fails at once, new turns are refused, and `on_failure` is told."""
        try:
            if self.decoder.compiled:
                self.decoder.allow_variants()
                if self.options.warmup:  # here, not in the caller's thread: CUDA graphs are recorded per thread
                    self.decoder.warm_up()
            self.serve()
        except BaseException as error:  # noqa: BLE001 - the watchdog: anything that kills the thread
            logger.critical("the decode thread died: %s", error, exc_info=True)
            self.fail(error)
        self.strand()

    def fail(self, error: BaseException) -> None:
        """Mark the engine failed (from any thread): new turns are refused, the decode thread stops
        and fails every reply in flight, and `on_failure` is told once."""
        with self.wake:
            if self.failure is not None:
                return
            self.failure = error
            self.wake.notify()
        if self.on_failure is not None:
            self.on_failure(error)

    def strand(self) -> None:
        """On the decode thread, as it ends: finish every reply it still holds."""
        with self.wake:
            stranded, self.pending = self.pending + self.filling + self.active, []
        self.active, self.filling = [], []
        for generation in stranded:
            if self.failure is not None:
                generation.error = EngineFailed(f"the model server failed ({self.failure})")
            self.finish(generation)

    def serve(self) -> None:
        """Each round: one piece (`prefill_chunk` tokens at most) of one prompt, then one decode step
        for every reply in flight. Prompts someone waits for are prefilled first; a speculative one
        (a turn that may go on) joins at most one per round, so it never holds up a finished turn.
        While such a prompt waits, the replies in flight step only every `decode_gap_s`: a person
        waiting for the first word comes before the next word of a reply already streaming. Prompts
        waited for take turns, one piece each and a new one first, so a long one does not hold up the
        others; and the later pieces of a long prompt are paid for: the replies in flight then get as
        much decode time as those pieces took, so a client looping long prompts cannot starve them."""
        owed = 0.0  # seconds of decoding the replies in flight are owed for long prompts' later pieces
        while True:
            with self.wake:
                while (not self.pending and not self.filling and not self.active and not self.closed
                       and self.failure is None):
                    self.beat = time.monotonic()
                    self.wake.wait(1.0)
                if self.closed or self.failure is not None:
                    return
                wanted = [g for g in self.pending if g.wanted.is_set()]
                unseen = [g for g in self.pending if not g.wanted.is_set()]
                self.filling += wanted + unseen[:1]
                self.pending = unseen[1:]
            self.beat = time.monotonic()
            for generation in [g for g in self.filling if g.cancelled.is_set()]:
                self.finish(generation)
            self.filling = sorted((g for g in self.filling if not g.done.is_set()),  # waited for, then not yet begun
                                  key=lambda g: (not g.wanted.is_set(), g.filled > 0))
            if self.filling and not (self.active and owed > 0):
                head = self.filling[0]
                started, later_piece = time.perf_counter(), head.filled > 0
                if self.prefill(head):
                    self.filling.pop(0)
                elif not any(g.slot == head.slot for g in self.filling[1:]):
                    self.filling.append(self.filling.pop(0))  # one piece each in turn: a long prompt (one
                    # client's) cannot hold up a short one waiting behind it
                if later_piece:
                    owed += time.perf_counter() - started
            for generation in self.active:
                if generation.cancelled.is_set():
                    self.finish(generation)
            self.active = [g for g in self.active if not g.done.is_set()]
            if not self.active:
                owed = 0.0
            elif owed > 0 or not self.turn_waits() or time.perf_counter() - self.stepped >= self.options.decode_gap_s:
                started = time.perf_counter()
                self.decode(self.active)
                owed = max(0.0, owed - (time.perf_counter() - started))
                self.active = [g for g in self.active if not g.done.is_set()]

    def turn_waits(self) -> bool:
        """A prompt someone waits for is next in line or was just submitted (decode thread)."""
        if self.filling and self.filling[0].wanted.is_set():
            return True
        with self.wake:
            return any(g.wanted.is_set() for g in self.pending)

    def prefill(self, generation: Generation) -> bool:
        """Prefill the next piece of a prompt; at its end, sample the first token. -> whether the
        prompt is done with (all prefilled, or failed)."""
        started = time.perf_counter()
        piece = generation.ids[generation.filled: generation.filled + self.options.prefill_chunk]
        last = generation.filled + len(piece) == len(generation.ids)
        try:
            if generation.clips and generation.audio is None:
                generation.audio = self.decoder.encode_clips(generation.clips)
            audio = None
            if generation.audio is not None:
                count = sum(token == self.decoder.audio_token_id for token in piece)
                audio = generation.audio[generation.audio_used: generation.audio_used + count]
                generation.audio_used += count
            logits = self.decoder.prefill(generation.slot, piece, generation.start + generation.filled, None, audio)
            generation.filled += len(piece)
            if not last:
                self.timed("prefill", time.perf_counter() - started)
                return False
            s = generation.sampling
            token = int(logits.argmax()) if s.temperature <= 0 else int(sample(
                logits[None], torch.tensor([s.temperature], device=self.device),
                torch.tensor([s.top_p], device=self.device))[0])
        except Exception as error:  # OOM, bad input: fail this turn, keep serving
            logger.exception("prefill failed")
            generation.error = error
            self.finish(generation)
            return True
        generation.audio = None
        generation.position = generation.start + len(generation.ids)
        generation.first_token = time.perf_counter()
        self.timed("prefill", generation.first_token - started)  # int() synced the device
        if self.emit(generation, token):
            self.active.append(generation)
        return True

    def decode(self, batch: list[Generation]) -> None:
        started = self.stepped = time.perf_counter()
        try:
            tokens = self.decoder.step(
                [g.slot for g in batch], [g.next_token for g in batch], [g.position for g in batch],
                [g.sampling.temperature for g in batch], [g.sampling.top_p for g in batch])
        except Exception as error:  # fails only the generations of this step
            logger.exception("decode step failed")
            for generation in batch:
                generation.error = error
                self.finish(generation)
            return
        self.timed("decode", time.perf_counter() - started)  # tolist() synced the device
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
            with self.wake:
                self.in_flight -= 1
            generation.done.set()
