"""The generation backend: what a Conversation and the server need from whatever generates replies.

Two implementations: `model.engine.Engine` (local: the model in this process, a KV cache per
conversation, batched decode) and `backends.openai.OpenAIBackend` (streams from an OpenAI-compatible server
such as vLLM). app.py picks one with `--backend local|openai`; nothing else knows which it got.
These Protocols only write the contract down (typing, docs); nothing checks them at run time.
"""

import base64
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..audio.pcm import wav_samples

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.2  # Mistral's recommendation for Voxtral chat
    top_p: float = 0.95
    max_new_tokens: int = 512  # reply length cap, tokens


CHAT = Sampling()
TRANSCRIBE = Sampling(temperature=0.0, top_p=1.0)  # greedy, as recommended; its length: transcript_tokens


MAX_AUDIO_TURNS = 5  # clips in one prompt at most: vLLM's limit for Voxtral ("performance tends to degrade after 5")
UNHEARD = "[inaudible]"  # an aged spoken turn whose transcript could not be made


class EngineBusy(RuntimeError):
    """Every conversation slot is taken."""


class EngineFailed(RuntimeError):
    """The decode thread has died; nothing more can be generated until the process restarts."""


class Reply(Protocol):
    """A reply in progress, read by one thread; `cancel()` may come from any thread."""

    text: str  # what the reader has been handed so far
    prompt_ids: list[int]  # the prompt it continues ([] when the backend does not say)

    def next_piece(self, timeout: float | None = None) -> str | None:
        """The next text piece ('' is possible), None once over; queue.Empty after `timeout` s
        without one; RuntimeError (a message for the user) if generation failed."""

    def __iter__(self) -> Iterator[str]: ...

    def want(self) -> None:
        """It is shown now: someone waits for it (a speculative reply is served after waited-for ones)."""

    def cancel(self) -> None: ...

    @property
    def cancelled(self) -> bool: ...

    @property
    def done(self) -> bool: ...

    @property
    def stats(self) -> dict:
        """prefill_tokens, cached_tokens, first_token_s (None before it), tokens, tokens_per_s."""


class Chat(Protocol):
    """One conversation: its messages and the reply in progress. Owned by the thread that drives it."""

    messages: list[dict]

    def start(self, audio: np.ndarray | None = None, text: str = "", sampling: Sampling = ...,
              speculative: bool = False) -> Reply:
        """Add a user turn (16 kHz float32 audio and/or text) and start the reply. Does not wait for
        the first token; ValueError for a turn that cannot be sent. `speculative`: begun at a short
        pause, nobody waits for it yet."""

    def transcribe(self, audio: np.ndarray, language: str | None = None, speculative: bool = False,
                   max_tokens: int | None = None) -> Reply:
        """Transcribe `audio` (not added to the conversation); `max_tokens`: a shorter cap than the backend's."""

    def discard(self, reply: Reply) -> None:
        """Drop a reply (speculative, or taken back) and the user turn it answered."""

    def cancel(self) -> None: ...

    def tidy(self, sampling: Sampling = ...) -> bool:
        """Between turns, once the last one is final: housekeeping that would otherwise hold up the
        next turn (old spoken turns become text; the local engine trims a full conversation and
        re-prefills it in the background)."""

    def caption(self, language: str | None = None) -> Future | None:
        """A Future of what was said in the turn just started (None when it has no audio)."""

    def reset(self) -> None: ...

    def close(self) -> None:
        """End the reply in progress and free the conversation's place."""


class Pieces:
    """What every Reply implementation shares: iterating yields its text pieces (empty ones skipped)
    until the reply is over; `next_piece()` is the implementation's."""

    def __iter__(self) -> Iterator[str]:
        while (piece := self.next_piece()) is not None:
            if piece:
                yield piece

    @property
    def queued(self) -> bool:
        """It waits for a slot: every one is busy with a reply (the local engine's KV rows, model/rows.py)."""
        return False


def audio_part(part) -> str | None:
    """A message part's audio as base64 WAV, in either chat format (transformers' `audio` parts, which
    the local engine keeps, or OpenAI's `input_audio`); None for other parts."""
    if not isinstance(part, dict):
        return None
    if part.get("type") == "audio":
        return part.get("base64")
    if part.get("type") == "input_audio":
        return (part.get("input_audio") or {}).get("data")
    return None


def is_spoken(message: dict) -> bool:
    """A user turn with audio in it."""
    return message["role"] == "user" and isinstance(message["content"], list) and any(
        audio_part(part) is not None for part in message["content"])


def as_text(message: dict, transcript: str) -> dict:
    """A spoken user turn -> the same turn as text: its transcript in place of its audio."""
    parts = [{"type": "text", "text": transcript or UNHEARD}]
    parts += [part for part in message["content"] if audio_part(part) is None]
    return {"role": "user", "content": [{"type": "text", "text": "\n".join(part["text"] for part in parts)}]}


def ageing(spoken: int, keep: int) -> int:
    """How many of a conversation's `spoken` turns become text as a new turn begins, so that the
    prompt keeps at most `keep` clips. They go in batches, down to half of `keep`: a prompt whose
    oldest clip changes is prefilled again from there, so that happens every few turns, not every turn."""
    return spoken - keep // 2 if spoken >= keep else 0


class Turns:
    """What every Chat shares: its messages, the reply in progress, and the turn lifecycle around
    them (discard, cancel, reset, close; dropping the newest or the oldest turn; spoken turns that age
    into text). A subclass says how a reply settles (`settle`), what frees its place (`release`), how
    it transcribes a turn aside (`transcribe_aside`) and what it derived from the messages that must
    go when they change other than by a new turn (`forget`).
    Owned by the thread that drives it (a Conversation's worker)."""

    def __init__(self):
        self.messages: list[dict] = []
        self.current = None  # the last reply started, until settled
        self.closed = False
        self.transcripts: dict[int, tuple[dict, Future]] = {}  # id(spoken message) -> (it, its transcript)

    def transcribe_aside(self, audio: np.ndarray, language: str | None) -> Future:
        raise NotImplementedError

    def transcript_of(self, message: dict, language: str | None = None) -> Future:
        """The transcript of a spoken user turn, asked for once."""
        entry = self.transcripts.get(id(message))
        if entry is None or entry[0] is not message:
            audio = next(a for a in map(audio_part, message["content"]) if a is not None)
            entry = self.transcripts[id(message)] = (message, self.transcribe_aside(
                wav_samples(base64.b64decode(audio)), language))
        return entry[1]

    def caption(self, language: str | None = None) -> Future | None:
        """What was said in the turn just started (the last message, when it is a spoken turn)."""
        if self.messages and is_spoken(self.messages[-1]):
            return self.transcript_of(self.messages[-1], language)
        return None

    def age(self, keep: int, wait_s: float | None = None) -> bool:
        """Older spoken turns become their transcripts, so that the next prompt keeps at most `keep`
        clips. Between turns (the conversation ends with a reply) the next turn is counted as spoken;
        it ages turns only once all their transcripts are ready, and asks for those of the next batch
        a turn early (`wait_s` None). At a
        turn's start (it ends with the new user turn) the cap holds: each transcript is waited for up
        to `wait_s`, and a turn without one becomes UNHEARD. -> whether any turn changed."""
        starting = bool(self.messages) and self.messages[-1]["role"] == "user"
        history = self.messages[:-1] if starting else self.messages
        closed = [m for m in history if is_spoken(m)]
        new = 1 if not starting or is_spoken(self.messages[-1]) else 0
        due = ageing(len(closed), keep) if len(closed) + new > keep else 0
        futures = [self.transcript_of(message) for message in closed[:due]]  # all asked for before any wait
        if not starting and len(closed) + 2 >= keep:  # the next batch may age a turn from now: ask for it already
            for message in closed[:len(closed) - keep // 2 + 1]:
                self.transcript_of(message)
        if wait_s is None and not all(future.done() for future in futures):
            return False  # between turns: they age together, once all are ready
        changed = False
        for message, future in zip(closed[:due], futures):
            try:
                transcript = future.result(timeout=wait_s)
            except Exception:  # noqa: BLE001 - not in time, or failed: the turn still ages
                transcript = UNHEARD
            index = next(i for i, m in enumerate(self.messages) if m is message)
            self.messages[index] = as_text(message, transcript)
            changed = True
        if changed:
            self.forget()
            self.prune_transcripts()
        return changed

    def prune_transcripts(self) -> None:
        """Forget the transcripts of turns no longer in the conversation."""
        alive = {id(m): m for m in self.messages}
        for key in [k for k, (message, _) in self.transcripts.items() if alive.get(k) is not message]:
            self.transcripts.pop(key)[1].cancel()  # not begun yet: never run

    def settle(self, cancel: bool = False) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def forget(self) -> None:
        """The messages changed other than by a new turn."""

    def discard(self, reply) -> None:
        """Drop a reply (begun speculatively, or taken back) and the user turn it answered."""
        reply.cancel()
        recorded, reply.record = reply.record, False
        if self.current is reply:
            self.settle()
            if recorded:
                self.drop_last_turn()

    def cancel(self) -> None:
        if self.current is not None:
            self.current.cancel()

    def reset(self) -> None:
        """Forget the conversation."""
        self.settle(cancel=True)
        self.messages = []
        self.forget()
        self.prune_transcripts()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.settle(cancel=True)
            self.release()

    def drop_last_turn(self) -> None:
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
            self.forget()
            self.prune_transcripts()

    def drop_oldest_turn(self) -> bool:
        """Drop the oldest turn (a user message and its reply); the last turn always stays. -> whether
        one was dropped."""
        last_turn = 2 if self.messages and self.messages[-1]["role"] == "assistant" else 1
        if len(self.messages) <= last_turn:
            return False
        logger.info("conversation too long; dropping its oldest turn")
        self.messages = self.messages[2:] if self.messages[1]["role"] == "assistant" else self.messages[1:]
        self.forget()
        self.prune_transcripts()
        return True


class Options(Protocol):
    model: str
    slots: int  # conversations at once
    max_audio_s: float  # per-turn audio cap


class Backend(Protocol):
    """Owned by the process; thread-safe. `open_chat()` raises EngineBusy when `slots`
    conversations are open, EngineFailed when the backend cannot serve any more."""

    options: Options
    device_kind: str  # where generation runs: "cuda", "cpu" or "remote" (the end-of-turn default reads it)
    device_name: str  # the same for people: "cuda:0", "cpu", the remote server's URL
    compiled: bool  # the hot path is torch.compiled (False when remote)
    ready: threading.Event  # set once the first turn can be served without a warm-up wait
    failure: BaseException | None

    def open_chat(self) -> Chat: ...

    def memory_bytes(self) -> int:
        """Accelerator memory the backend holds here (0 on CPU and when remote)."""

    def describe(self) -> dict:
        """What /health says about the backend: {"kind": "local"}, or the remote one's report."""

    def listen(self, listener) -> None:
        """Call `listener(phase, seconds)` after each model step ("prefill", "decode"), where there are any."""

    def leave(self, chat: Chat) -> None:
        """`chat`'s connection ended; its conversation is kept for a resume and stops counting against `slots`."""

    def come_back(self, chat: Chat) -> None:
        """`chat` has a connection again and counts again; EngineBusy when `slots` are connected already."""

    @property
    def free_slots(self) -> list: ...

    @property
    def kept_conversations(self) -> int:
        """Open conversations that have left (kept for a resume)."""

    @property
    def active_chats(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def stuck(self) -> bool: ...

    def close(self) -> None: ...

