"""The generation backend: what a Conversation and the server need from whatever generates replies.

Two implementations: `model.engine.Engine` (local: the model in this process, a KV cache per
conversation, batched decode) and `backends.openai.OpenAIBackend` (streams from an OpenAI-compatible server
such as vLLM). app.py picks one with `--backend local|openai`; nothing else knows which it got.
These Protocols only write the contract down (typing, docs); nothing checks them at run time.
"""

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.2  # Mistral's recommendation for Voxtral chat
    top_p: float = 0.95
    max_new_tokens: int = 512  # reply length cap, tokens


CHAT = Sampling()
TRANSCRIBE = Sampling(temperature=0.0, top_p=1.0)  # greedy, as recommended; its length: transcript_tokens


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

    def transcribe(self, audio: np.ndarray, language: str | None = None, speculative: bool = False) -> Reply: ...

    def discard(self, reply: Reply) -> None:
        """Drop a reply (speculative, or taken back) and the user turn it answered."""

    def cancel(self) -> None: ...

    def tidy(self, sampling: Sampling = ...) -> bool:
        """Between turns, once the last one is final: housekeeping that would otherwise hold up the
        next turn (the local engine trims a full conversation and re-prefills it in the background)."""

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


class Turns:
    """What every Chat shares: its messages, the reply in progress, and the turn lifecycle around
    them (discard, cancel, reset, close; dropping the newest or the oldest turn). A subclass says how
    a reply settles (`settle`), what frees its place (`release`) and what it derived from the
    messages that must go when they change other than by a new turn (`forget`).
    Owned by the thread that drives it (a Conversation's worker)."""

    def __init__(self):
        self.messages: list[dict] = []
        self.current = None  # the last reply started, until settled
        self.closed = False

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

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.settle(cancel=True)
            self.release()

    def drop_last_turn(self) -> None:
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
            self.forget()

    def drop_oldest_turn(self) -> bool:
        """Drop the oldest turn (a user message and its reply); the last turn always stays. -> whether
        one was dropped."""
        last_turn = 2 if self.messages and self.messages[-1]["role"] == "assistant" else 1
        if len(self.messages) <= last_turn:
            return False
        logger.info("conversation too long; dropping its oldest turn")
        self.messages = self.messages[2:] if self.messages[1]["role"] == "assistant" else self.messages[1:]
        self.forget()
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

