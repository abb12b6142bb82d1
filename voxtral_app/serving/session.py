"""One session of the session API (session_api.py): its PCM in, as turn events to its conversation,
and its conversation's events out, as the socket's JSON messages and PCM."""

import asyncio
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soxr

from ..audio.pcm import SAMPLE_RATE
from ..conversation.conversation import Conversation, Settings
from ..conversation.events import (
    Cleared,
    Closed,
    Hushed,
    ReplyDelta,
    ReplyFinished,
    ReplyRetracted,
    Speech,
    StateChanged,
    TurnFailed,
    UserTranscript,
)
from ..turns.taker import TurnTaker
from . import metrics
from .handler import ALIVE_EVERY_S


def error(code: str, message: str) -> dict:
    return {"type": "error", "code": code, "message": message}


class Session:
    """One created session. `connected`, `parked`, `deadline`, `replies`, `settings` and `expiry` belong
    to the event loop (creation, expiry, parking and the socket's receive loop run there); `turns`,
    `resampler` and `alive_at` to its audio thread."""

    def __init__(self, conversation: Conversation, rate: int, settings: Settings, on_close=None):
        self.id = secrets.token_urlsafe(24)  # the only credential: unguessable
        self.conversation = conversation
        self.rate = rate  # Hz of the PCM in both directions, fixed at creation
        self.settings = settings
        self.connected = False
        self.parked = False  # its socket closed; kept in Sessions.parking for a reconnect
        self.deadline: float | None = None  # loop time when the time limit ends it (from its first socket)
        self.replies: Replies | None = None  # its events -> the socket of the moment (from its first socket)
        self.on_close = on_close  # Sessions.end
        self.expiry: asyncio.TimerHandle | None = None
        self.audio = ThreadPoolExecutor(1, thread_name_prefix=f"voxtral-session-{self.id[:6]}")
        # audio-thread-owned (built there on the first chunk: the VAD takes a moment to load)
        self.turns: TurnTaker | None = None
        self.resampler: soxr.ResampleStream | None = None
        self.alive_at = float("-inf")  # perf_counter() when the conversation last heard "alive"

    @property
    def closed(self) -> threading.Event:
        return self.conversation.closed

    def close(self) -> None:
        """End the session (what Parking calls when nobody came back in time; on the event loop)."""
        self.on_close(self)

    def hear(self, pcm: bytes) -> list[str]:
        """On the audio thread: int16 PCM -> 16 kHz float -> turn events, posted; -> their kinds."""
        started = time.perf_counter()
        if self.turns is None:
            self.turns = TurnTaker(self.conversation.options.turns)
            if self.rate != SAMPLE_RATE:  # streaming: no clicks at chunk edges
                self.resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32")
        audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        if self.resampler is not None:
            audio = self.resampler.resample_chunk(audio)
        events = self.turns.feed(audio)
        metrics.AUDIO.observe(time.perf_counter() - started)
        if len(audio) and started - self.alive_at >= ALIVE_EVERY_S:  # audio arrives: the conversation is not idle
            self.alive_at = started
            self.conversation.post("alive")
        for event in events:
            self.conversation.post(event.kind, event)
        return [event.kind for event in events]


class Replies:
    """A session's conversation events -> socket messages, on its own thread for the session's life (it
    alone owns `speaking`). Each message goes to the socket of the moment's `deliver` (thread-safe), None
    once the conversation has closed; while no socket is attached, messages are dropped. `deliver` and
    `turns` are guarded by `lock` (the event loop attaches and detaches sockets)."""

    def __init__(self, session: Session):
        self.session = session
        self.speaking = False  # speech was sent since the last hush (the client may be playing it)
        self.lock = threading.Lock()
        self.deliver = None
        self.turns = 0  # turns the conversation holds: chat replies kept, less retracted, 0 after a clear

    def attach(self, deliver) -> int:
        """Send to `deliver` from now on. -> the turns the conversation holds."""
        with self.lock:
            self.deliver = deliver
            return self.turns

    def detach(self) -> None:
        with self.lock:
            self.deliver = None

    def run(self) -> None:
        while True:
            event = self.session.conversation.outbox.get()
            self.count(event)
            for message in self.messages(event):
                self.send(message)
            if isinstance(event, Closed):
                return self.send(None)

    def send(self, message) -> None:
        with self.lock:
            deliver = self.deliver
        if deliver is not None:
            deliver(message)

    def count(self, event) -> None:
        with self.lock:
            kept = isinstance(event, ReplyFinished) and event.error is None and event.text.strip()
            if kept and event.stats.mode == "chat":  # as the chat keeps a turn (transcripts are not turns)
                self.turns += 1
            elif isinstance(event, ReplyRetracted) and event.stats is None:  # it had finished: it was counted
                self.turns = max(0, self.turns - 1)
            elif isinstance(event, Cleared):
                self.turns = 0

    def messages(self, event) -> list:
        if isinstance(event, ReplyDelta):
            return [{"type": "text_delta", "text": event.delta}]
        if isinstance(event, Speech):
            samples = event.samples
            if event.rate != self.session.rate:
                samples = soxr.resample(samples, event.rate, self.session.rate)
            self.speaking = True
            return [(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()]
        if isinstance(event, ReplyFinished):
            out = [{"type": "text_response", "text": event.text, "timestamp": time.time(),
                    "latency_ms": event.stats.first_token_ms, "mode": event.stats.mode,
                    "interrupted": event.interrupted, "status": event.status()}]
            return out + ([error("turn_failed", event.error)] if event.error is not None else [])
        if isinstance(event, UserTranscript):
            return [{"type": "user_transcript", "turn": event.turn, "text": event.text}]
        if isinstance(event, ReplyRetracted):
            return [{"type": "retracted"}]
        if isinstance(event, Cleared):
            return [{"type": "cleared"}]
        if isinstance(event, TurnFailed):
            return [error("turn_failed", event.message)]
        if isinstance(event, Closed) and event.message:
            return [error("closed", event.message)]
        if isinstance(event, StateChanged) and event.state == "queued":
            return [{"type": "queued", "message": "Every slot is busy; your turn is next in line."}]
        if isinstance(event, Hushed) and self.speaking:
            self.speaking = False
            return [{"type": "hush"}]
        return []
