"""What a conversation tells the world: typed events, in order, on its outbox.

A conversation (conversation.py) knows nothing of pages, sockets or phones; each surface renders
these events its own way: the page folds them into chat messages (serving/chat_view.py), the
session WebSocket into JSON messages (serving/session_api.py), the metrics count them
(serving/metrics.py). Events are immutable; a turn's events share its `turn` number.

Glossary (one name per act, in every layer):
- connection: one transport's link to a person (a WebRTC peer, a WebSocket, a phone call).
- conversation: one person's exchange with the model: its messages, settings and one backend chat.
- slot: the backend's room for one conversation (the local engine's KV-cache rows).
- turn: what the person said or typed, from its start to its end; a turn is *shown* when it ends.
- reply: the model's answer to a turn; it *streams* (deltas), then *finishes*.
- retract: take a shown turn and its reply back, because the person was not done speaking.
- cancel: stop a reply early (barge-in, the person pressed stop); what it said so far stays.
- hush: stop playing the speech sent so far.
- clear: forget the conversation's messages; the conversation and its slot stay.
- close: end the conversation and free its slot.
"""

from dataclasses import asdict, dataclass

import numpy as np

from ..audio.pcm import SAMPLE_RATE

SOURCES = ("speech", "upload", "text")  # where a turn came from
CLOSE_REASONS = ("closed", "idle", "failed")  # why a conversation ended
STATES = ("listening", "hearing", "thinking", "queued", "speaking")  # what the voice loop is doing (StateChanged)


@dataclass(frozen=True)
class Event:
    """Anything a conversation emits."""


@dataclass(frozen=True)
class ReplyStats:
    """How a reply went, as every surface reports it."""

    mode: str  # "chat" | "transcribe"
    language: str = ""  # transcription language ("" = detected)
    source: str = "speech"  # one of SOURCES
    pause_ms: int = 0  # from the end of speech to the end of the turn (turn-taking's wait)
    first_token_ms: int | None = None  # from the end of speech (or the typed message) to the first token
    tokens: int = 0
    tokens_per_s: float = 0.0
    prefill_tokens: int = 0  # prompt tokens computed for this reply
    cached_tokens: int = 0  # prompt tokens reused from the conversation's cache
    ended_by: str = ""  # why turn-taking ended a spoken turn (turns.taker.REASONS), "" otherwise
    backend_first_token_s: float | None = None  # from the turn's start in the backend (prompt building included)


@dataclass(frozen=True)
class Opened(Event):
    """The conversation has its slot."""


@dataclass(frozen=True, eq=False)
class UserTurn(Event):
    """A turn is shown: its reply streams next."""

    turn: int
    source: str  # one of SOURCES
    text: str = ""  # a typed turn's text
    audio: np.ndarray | None = None  # a spoken or uploaded turn: float32 16 kHz samples

    @property
    def seconds(self) -> float:
        return 0.0 if self.audio is None else len(self.audio) / SAMPLE_RATE


@dataclass(frozen=True)
class UserTranscript(Event):
    """What Voxtral heard in a spoken or uploaded turn, as text (its caption): transcribed beside
    the reply, so it may come before, during or after the reply's deltas."""

    turn: int
    text: str


@dataclass(frozen=True)
class StateChanged(Event):
    """The voice loop moved on: `listening` (waiting for the person), `hearing` (they speak),
    `thinking` (their turn ended; no reply token yet), `queued` (thinking, but every slot is busy with
    replies: the turn waits for one), `speaking` (the reply streams)."""

    state: str  # one of STATES


@dataclass(frozen=True)
class ReplyStarted(Event):
    """The reply's first token: `latency_s` after the person stopped speaking (or sent the text)."""

    turn: int
    latency_s: float
    stats: ReplyStats  # as known at the first token


@dataclass(frozen=True)
class ReplyDelta(Event):
    """More of the reply: `text` is all of it so far, `delta` what is new since the last delta."""

    turn: int
    text: str
    delta: str


@dataclass(frozen=True, eq=False)
class Speech(Event):
    """One spoken sentence of the reply (when spoken replies are on)."""

    turn: int
    rate: int  # Hz
    samples: np.ndarray  # float32


@dataclass(frozen=True)
class ReplyFinished(Event):
    """The reply is over: its whole text, how it went, and whether it was cut short or failed."""

    turn: int
    text: str
    stats: ReplyStats
    interrupted: bool = False  # cancelled (barge-in, the person pressed stop)
    error: str | None = None  # generation failed part-way: what to tell the person

    def status(self) -> dict:
        """The stats as one flat dict, with `interrupted` and `error` only when they happened: the
        `status` every surface reports (the page's /outputs, the session API's text_response)."""
        return asdict(self.stats) | ({"interrupted": True} if self.interrupted else {}) | (
            {"error": self.error} if self.error is not None else {})


@dataclass(frozen=True)
class ReplyRetracted(Event):
    """A shown turn and its reply are taken back (the person went on speaking). `stats` is set when
    the reply was still streaming (it never finished), None when it had finished."""

    turn: int
    stats: ReplyStats | None = None


@dataclass(frozen=True)
class Hushed(Event):
    """Stop playing the speech sent so far: the person spoke over it."""


@dataclass(frozen=True)
class Cleared(Event):
    """The conversation's messages are forgotten."""


@dataclass(frozen=True)
class TurnFailed(Event):
    """A turn could not begin (unreadable audio, an empty or overlong text, no backend): tell the person."""

    message: str
    kind: str = "turn"  # "audio" | "turn" | "text"


@dataclass(frozen=True)
class Closed(Event):
    """The conversation is over and its slot is free; the last event."""

    reason: str = "closed"  # one of CLOSE_REASONS
    message: str = ""  # what to tell the person, if anything
