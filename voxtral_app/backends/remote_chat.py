"""A conversation held against an OpenAI-compatible server (openai.py's `OpenAIBackend`).

`RemoteChat` keeps the conversation's messages in OpenAI's chat format (the user's audio as an
`input_audio` part, a base64 WAV) and asks the backend for each reply; a `RemoteReply` is that
reply's stream as the conversation reads it. Threads: a RemoteChat belongs to the thread that drives
it (a Conversation's worker); a RemoteReply's pieces cross from the backend's loop thread on a
queue.SimpleQueue, and its end is a threading.Event.
"""

import asyncio
import base64
import io
import logging
import queue
import threading
import time
import uuid
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from ..audio.pcm import SAMPLE_RATE
from .contract import CHAT, Pieces, Sampling, Turns

if TYPE_CHECKING:
    from .openai import OpenAIBackend

logger = logging.getLogger(__name__)

SETTLE_TIMEOUT_S = 30.0  # a cancelled stream closes at once; this is a backstop
WAV_BYTES_PER_S = 2 * SAMPLE_RATE  # 16-bit mono: what a turn's audio costs on the wire


def wav_base64(audio: np.ndarray) -> str:
    """16 kHz float32 samples -> a 16-bit WAV, base64 (half the bytes of float; the source was 16-bit)."""
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def user_message(audio: np.ndarray | None, text: str) -> dict:
    """A user turn as OpenAI's chat format carries it (vLLM's Voxtral reads `input_audio` parts)."""
    content = []
    if audio is not None:
        content.append({"type": "input_audio", "input_audio": {"data": wav_base64(audio), "format": "wav"}})
    if text:
        content.append({"type": "text", "text": text})
    if not content:
        raise ValueError("a user turn needs audio or text")
    return {"role": "user", "content": content}


def audio_seconds(message: dict) -> float:
    if not isinstance(message["content"], list):
        return 0.0
    data = [part["input_audio"]["data"] for part in message["content"] if part["type"] == "input_audio"]
    return sum(len(b64) * 3 / 4 for b64 in data) / WAV_BYTES_PER_S


class RemoteReply(Pieces):
    """A reply streaming from the server. Read by one thread; the loop thread writes pieces, usage
    and times before it ends the queue with None; `cancel()` may come from any thread."""

    def __init__(self, backend: "OpenAIBackend", record: bool):
        self.backend = backend
        self.record = record  # chat replies join the conversation; transcripts do not
        self.prompt_ids: list[int] = []  # the server tokenizes; we do not know its ids
        self.pieces: queue.SimpleQueue = queue.SimpleQueue()  # str, then None
        self.text = ""  # what the reader has been handed
        self.tokens: list[str] = []  # the pieces handed out (one per streamed chunk)
        self.error: str | None = None  # set by the loop thread before the end
        self.usage = None  # the server's usage, when it sends one
        self.task: asyncio.Task | None = None  # loop-owned
        self.ended = threading.Event()
        self.cancel_event = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        self.finished: float | None = None
        self.chunks = 0

    # -- reader thread --------------------------------------------------------------------------

    def next_piece(self, timeout: float | None = None) -> str | None:
        piece = self.pieces.get(timeout=timeout) if timeout is not None else self.pieces.get()
        if piece is None:
            self.pieces.put(None)  # stays over: later calls see the end too
            if self.error is not None and not self.cancelled:
                raise RuntimeError(self.error)
            return None
        self.tokens.append(piece)
        self.text += piece
        return piece

    def wait(self, timeout: float = SETTLE_TIMEOUT_S) -> bool:
        return self.ended.wait(timeout)

    @property
    def done(self) -> bool:
        return self.ended.is_set()

    @property
    def stats(self) -> dict:
        end = self.finished or time.perf_counter()
        first = (self.first_token - self.submitted) if self.first_token else None
        usage = self.usage
        tokens = usage.completion_tokens if usage is not None else self.chunks
        decode_s = end - self.first_token if self.first_token else 0.0
        details = getattr(usage, "prompt_tokens_details", None)
        return {"prefill_tokens": usage.prompt_tokens if usage is not None else 0,
                "cached_tokens": (getattr(details, "cached_tokens", None) or 0) if details is not None else 0,
                "first_token_s": first, "tokens": tokens,
                "tokens_per_s": max(tokens - 1, 0) / decode_s if decode_s > 0 else 0.0}

    # -- any thread -----------------------------------------------------------------------------

    def want(self) -> None:
        """Someone waits for this reply now (the local engine reorders its prefills; a server schedules its own)."""

    def cancel(self) -> None:
        """Close the stream (the server sees the client go and stops generating)."""
        if not self.cancel_event.is_set():
            self.cancel_event.set()
            self.backend.on_loop(self.stop)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    # -- loop thread ----------------------------------------------------------------------------

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def put(self, piece: str) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
        self.chunks += 1
        self.pieces.put(piece)

    def end(self, task: asyncio.Task | None = None) -> None:
        self.finished = time.perf_counter()
        self.pieces.put(None)
        self.backend.stream_ended()
        self.ended.set()


class RemoteChat(Turns):
    """One conversation: its messages in OpenAI's format, and the reply in progress.
    Owned by the thread that drives it (a Conversation's worker)."""

    def __init__(self, backend: "OpenAIBackend"):
        super().__init__()
        self.backend = backend
        self.id = uuid.uuid4().hex  # sent as X-Voxtral-Conversation: a load balancer can pin it to a replica
        self.away = False  # kept for a resume without a connection (OpenAIBackend.leave; under its lock)

    def start(self, audio: np.ndarray | None = None, text: str = "", sampling: Sampling = CHAT,
              speculative: bool = False) -> RemoteReply:
        """`speculative` changes nothing here: the server schedules its own requests."""
        self.settle()
        self.messages.append(user_message(audio, text))
        self.age(self.backend.options.audio_turns, wait_s=self.backend.options.age_wait_s)
        self.trim()
        reply = RemoteReply(self.backend, record=True)
        self.current = self.backend.submit(reply, self.backend.stream_chat(reply, list(self.messages), sampling, self.id))
        return reply

    def transcribe(self, audio: np.ndarray, language: str | None = None, speculative: bool = False,
                   max_tokens: int | None = None) -> RemoteReply:
        self.settle()
        reply = RemoteReply(self.backend, record=False)
        limit = min(max_tokens or self.backend.options.transcript_tokens, self.backend.options.transcript_tokens)
        self.current = self.backend.submit(reply, self.backend.transcribe(reply, audio, language, self.id, limit))
        return reply

    def transcribe_aside(self, audio: np.ndarray, language: str | None):
        return self.backend.transcribe_aside(audio, language, self.id)

    def release(self) -> None:
        self.backend.release(self)

    def tidy(self, sampling: Sampling = CHAT) -> bool:
        """Old spoken turns become their transcripts (the server re-reads the history each turn; its
        prefix cache, if any, is its own, and helps only while the history's start is unchanged)."""
        self.settle()
        return self.age(self.backend.options.audio_turns)

    def trim(self) -> None:
        """Drop the oldest turns while the history holds more audio than the server should re-read."""
        while sum(map(audio_seconds, self.messages)) > self.backend.options.history_audio_s and self.drop_oldest_turn():
            pass

    def settle(self, cancel: bool = False) -> None:
        """Wait for the last reply's stream to close, and keep its text in the conversation (what
        its reader saw) or drop the turn it answered (no text, or it failed)."""
        reply, self.current = self.current, None
        if reply is None:
            return
        if cancel:
            reply.cancel()
        if not reply.wait():
            logger.error("a reply's stream did not close in %.0f s", SETTLE_TIMEOUT_S)
            reply.cancel()
        if reply.record:
            text = reply.text.strip()
            if text and reply.error is None:
                self.messages.append({"role": "assistant", "content": text})
            else:
                self.drop_last_turn()
