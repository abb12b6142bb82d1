"""A conversation: turns in (spoken, uploaded or typed), Voxtral's streamed replies out, as chat updates and speech.

Every transport (WebRTC and WebSocket handlers, phone calls, the page's upload box, the session
API) drives the same `Conversation`. It owns one engine `Chat` (a KV-cache slot), the chat messages
the page shows, the person's settings and the turn in progress, and it runs on its own worker
thread: other threads only `post()` messages to its inbox and read `Output`s from its outbox. So a
turn's speculative begin, its showing, a retraction, a barge-in and a clear can never interleave.
"""

import collections
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import soundfile

from . import metrics
from .audio import SAMPLE_RATE, AudioError, prepare
from .engine import CHAT, EngineBusy, EngineFailed
from .session import Chat, Reply
from .tts import SentenceSplitter
from .turn import TurnOptions

logger = logging.getLogger(__name__)

MODES = ("chat", "transcribe")
INTERRUPTS = ("speech", "resume", "cancel", "clear", "close", "settings")  # handled even while a reply streams
POLL_S = 0.01  # while a reply streams, the inbox is looked at this often (bounds barge-in latency)


@dataclass(frozen=True)
class Settings:
    """One connection's choices in the UI (or from `/input`, a session's config, a phone call)."""

    mode: str = "chat"  # "chat": Voxtral answers; "transcribe": Voxtral writes down what was said
    language: str = ""  # transcription language code, "" = let Voxtral detect it
    temperature: float = CHAT.temperature  # chat sampling temperature (transcription is always greedy)
    spoken: bool = False  # also speak replies

    @classmethod
    def from_values(cls, values: list) -> "Settings":
        """UI input values (mode, language, temperature, spoken), tolerant of junk and short lists."""
        names = ("mode", "language", "temperature", "spoken")
        values = [v for v in values if not hasattr(v, "webrtc_id") and v != "__webrtc_value__"][-len(names):]
        return cls.from_dict(dict(zip(names, values)))

    @classmethod
    def from_dict(cls, given: dict, base: "Settings | None" = None) -> "Settings":
        """Named values (a JSON body); missing or junk values keep `base`'s."""
        base = base or cls()
        mode = given.get("mode") if given.get("mode") in MODES else base.mode
        try:
            temperature = min(max(float(given.get("temperature", base.temperature)), 0.0), 2.0)
        except (TypeError, ValueError):
            temperature = base.temperature
        language = given.get("language", base.language)
        language = str(language or "").strip().lower()[:8] if isinstance(language, (str, type(None))) else ""
        spoken = given.get("spoken", base.spoken)
        return cls(mode, "" if language in ("", "auto") else language, temperature,
                   spoken if isinstance(spoken, bool) else base.spoken)


@dataclass(frozen=True)
class ConversationOptions:
    turns: TurnOptions = TurnOptions()
    max_audio_s: float = 300.0  # a turn longer than this keeps its last part (engine's cap)
    max_text_chars: int = 4_000  # a typed turn longer than this is refused
    reply_tokens: int = CHAT.max_new_tokens  # longest chat reply, tokens
    ui_interval_s: float = 0.05  # streamed text reaches the UI at most this often (first token at once)
    phone_spoken: bool = True  # phone callers cannot read: calls get spoken replies unless this is off
    idle_timeout_s: float = 300.0  # a conversation with no turn or message for this long closes itself
    temperature: float = CHAT.temperature  # chat temperature a new conversation starts with (--temperature)
    clips: int = 8  # the chat plays back the last 8 spoken turns (older ones show their label; 0: labels only)
    clip_s: float = 30.0  # a turn's clip keeps its last 30 s (960 KB of 16-bit 16 kHz audio)


@dataclass
class Output:
    """What the person should see (and hear) now: the whole chat, a status line, maybe speech."""

    history: list[dict]
    status: dict
    audio: tuple[int, np.ndarray] | None = None  # (rate, float32 samples) of one spoken sentence
    final: bool = False  # the turn's last update


HUSH = "hush"  # outbox marker: stop playing what was sent so far (the person spoke over it)
CLOSED = "closed"  # outbox marker: the conversation is over (its slot is free)


@dataclass
class Pending:
    """A turn whose reply has begun (perhaps speculatively) and may not be shown yet."""

    reply: Reply
    settings: Settings
    speech_end: float  # perf_counter time the last speech arrived
    label: str  # the user's turn as text: what they typed, or "🎙️ 2.8 s of speech"
    audio: np.ndarray | None = None  # a spoken turn's 16 kHz samples, for its clip in the chat
    turn_end: float = 0.0
    first_token: float | None = None
    history_at: int = 0  # chat length before this turn was shown (where a retraction cuts)
    ended_by: str = ""  # why turn-taking ended the turn: complete, long_pause, no_new_speech, background, max_turn

    def status(self) -> dict:
        stats = self.reply.stats
        first = None if self.first_token is None else round((self.first_token - self.speech_end) * 1000)
        return {"mode": self.settings.mode, "language": self.settings.language,
                "pause_ms": round((self.turn_end - self.speech_end) * 1000),
                "first_token_ms": first, "tokens": stats["tokens"],
                "tokens_per_s": round(stats["tokens_per_s"], 1), "prefill_tokens": stats["prefill_tokens"],
                "cached_tokens": stats["cached_tokens"], "ended_by": self.ended_by}


def reply_kind(mode: str, language: str = "") -> str:
    """What a reply is, as the chat labels it."""
    if mode == "transcribe":
        return "📝 Transcript" + (f" ({language})" if language else "")
    return "💬 Reply"


def reply_title(status: dict) -> str:
    """A finished reply's title in the chat: what kind of reply it is, then how fast it came."""
    return f"{reply_kind(status['mode'], status.get('language', ''))} · {latency_line(status)}"


def latency_line(status: dict) -> str:
    first = status.get("first_token_ms")
    parts = [f"⏱ {first} ms to first token" if first is not None else "⏱ no tokens",
             f"{status.get('tokens_per_s', 0)} tok/s"]
    if status.get("interrupted"):
        parts.append("interrupted")
    return " · ".join(parts)


class Conversation:
    """One person's conversation. Owner: its worker thread; everything below `# worker-owned` is
    touched by that thread alone. Any thread may `post()`, `close()` and read `outbox`."""

    def __init__(self, engine, options: ConversationOptions = ConversationOptions(), speaker=None,
                 settings: Settings = Settings(), name: str = "conversation"):
        self.engine = engine
        self.options = options
        self.speaker = speaker  # text-to-speech for spoken replies (None: text only)
        self.name = name
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # (kind, value) from any thread
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # Output | HUSH | CLOSED, to one reader
        self.closed = threading.Event()  # set by the worker once its slot is released
        self.worker = threading.Thread(target=self.run, name=f"voxtral-{name}", daemon=True)
        # worker-owned
        self.settings = settings
        self.chat: Chat | None = None
        self.history: list[dict] = []  # gradio "messages" format
        self.speculation: Pending | None = None  # begun at a short pause, shown if the turn ends
        self.shown: Pending | None = None  # the last shown turn: taken back if speech resumes
        self.deferred: collections.deque = collections.deque()  # messages that arrived while a reply streamed
        self.closing = False
        self.clip_dir: str | None = None  # this conversation's clips of spoken turns (removed when it closes)
        self.clip_files: collections.deque = collections.deque()  # oldest first

    # -- any thread -----------------------------------------------------------------------------

    def open(self) -> "Conversation":
        """Take a KV-cache slot (EngineBusy / EngineFailed if there is none) and start the worker."""
        self.chat = self.engine.open_chat()
        metrics.opened(self)
        self.worker.start()
        return self

    def post(self, kind: str, value=None) -> None:
        """kind: "pause" / "continue" / "end" / "resume" / "speech" (TurnEvents), "audio" ((rate, samples),
        a whole turn), "text" (a typed turn), "settings", "cancel" (stop the reply), "clear", "close"."""
        if not self.closed.is_set():
            self.inbox.put((kind, value))

    def close(self) -> None:
        """Never blocks: the worker cancels the reply, frees the slot and ends."""
        self.post("close")

    # -- worker ---------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self.closing:
                if self.deferred:
                    kind, value = self.deferred.popleft()
                else:
                    kind, value = self.inbox.get(timeout=self.options.idle_timeout_s)
                self.handle(kind, value)
        except queue.Empty:
            logger.info("%s: closing after %.0f s without a turn", self.name, self.options.idle_timeout_s)
            self.outbox.put(self.output({"error": "This conversation was closed after a long silence."}))
        except Exception:  # noqa: BLE001 - a bug must not leak the slot
            logger.exception("%s: conversation failed", self.name)
        finally:
            self.drop_speculation()
            if self.clip_dir is not None:
                shutil.rmtree(self.clip_dir, ignore_errors=True)
            self.chat.close()  # waits for its reply to leave the decode thread (cancelled: one step)
            metrics.closed(self)
            self.closed.set()
            self.outbox.put(CLOSED)

    def handle(self, kind: str, value) -> None:
        if kind == "close":
            self.closing = True
        elif kind == "settings":
            self.settings = value
        elif kind == "pause":  # maybe the end: prepare the reply now, unseen
            self.drop_speculation()
            self.speculation = self.begin_audio(value.audio, value.speech_end, quiet=True)
        elif kind == "continue":  # it was a pause inside the turn
            self.drop_speculation()
        elif kind == "end":
            pending, self.speculation = self.speculation, None
            pending = pending or self.begin_audio(value.audio, value.speech_end)
            if pending is not None:
                pending.ended_by = getattr(value, "reason", "") or ""
            self.show(pending)
        elif kind == "audio":  # a whole turn at once (an upload)
            rate, samples = value
            try:
                audio = prepare(rate, samples, self.options.max_audio_s)
            except AudioError as error:
                metrics.ERRORS.labels("audio").inc()
                return self.outbox.put(self.output({"error": str(error)}, final=True))
            self.show(self.begin_audio(audio, time.perf_counter()))
        elif kind == "text":
            self.show(self.begin_text(value))
        elif kind == "resume":  # the turn was not over: take its reply back
            self.outbox.put(HUSH)
            self.retract()
        elif kind == "speech":  # a new turn begins: the last one can no longer be taken back
            self.outbox.put(HUSH)
            self.shown = None
            if self.speculation is None:  # trim a full conversation now, while they speak, not at the turn's end
                self.chat.tidy(replace(CHAT, max_new_tokens=self.options.reply_tokens))
        elif kind == "clear":
            self.drop_speculation()
            self.chat.reset()
            self.history, self.shown = [], None
            self.outbox.put(self.output({"cleared": True}))
        elif kind != "cancel":
            logger.warning("%s: unknown message %r", self.name, kind)

    def output(self, status: dict, audio=None, final: bool = False) -> Output:
        return Output([dict(m) for m in self.history], status, audio, final)

    def begin_audio(self, audio: np.ndarray, speech_end: float, quiet: bool = False) -> Pending | None:
        """Start the reply to a spoken turn (prompt, audio encoding and prefill begin now); nothing is shown.
        `quiet`: speculative, at a short pause: no error is shown, and the engine serves it after waited-for turns."""
        settings = self.settings
        label = "🎙️ %.1f s of speech" % (len(audio) / SAMPLE_RATE)
        try:
            audio = prepare(SAMPLE_RATE, audio, self.options.max_audio_s)
            if settings.mode == "transcribe":
                reply = self.chat.transcribe(audio, settings.language or None, speculative=quiet)
            else:
                reply = self.chat.start(audio, sampling=replace(CHAT, temperature=settings.temperature,
                                                                max_new_tokens=self.options.reply_tokens),
                                        speculative=quiet)
        except (AudioError, ValueError, EngineBusy, EngineFailed) as error:
            if not quiet:
                metrics.ERRORS.labels("audio" if isinstance(error, AudioError) else "turn").inc()
                self.outbox.put(self.output({"error": str(error)}, final=True))
            return None
        return Pending(reply, settings, speech_end, label, audio=audio)

    def begin_text(self, text: str) -> Pending | None:
        text = text.strip() if isinstance(text, str) else ""
        if not text or len(text) > self.options.max_text_chars:
            self.outbox.put(self.output({"error": f"A typed turn needs 1-{self.options.max_text_chars} characters."},
                                        final=True))
            return None
        settings = replace(self.settings, mode="chat")  # typed text is always answered
        try:
            reply = self.chat.start(text=text, sampling=replace(CHAT, temperature=settings.temperature,
                                                                max_new_tokens=self.options.reply_tokens))
        except (ValueError, EngineFailed) as error:
            metrics.ERRORS.labels("turn").inc()
            self.outbox.put(self.output({"error": str(error)}, final=True))
            return None
        return Pending(reply, settings, time.perf_counter(), text)

    def drop_speculation(self) -> None:
        if self.speculation is not None:
            self.chat.discard(self.speculation.reply)
            self.speculation = None

    def retract(self) -> None:
        """Take back the last shown turn: from the chat's memory, and from the page."""
        pending, self.shown = self.shown, None
        if pending is None:
            return
        self.chat.discard(pending.reply)
        metrics.RETRACTIONS.inc()
        self.history = self.history[:pending.history_at]
        self.outbox.put(self.output({"retracted": True}))

    def show(self, pending: Pending | None) -> None:
        """Stream a begun reply into the chat (and speech when the settings say so). Messages that
        arrive meanwhile are looked at between tokens: interrupts act now, turns wait their turn."""
        if pending is None:
            return
        reply = pending.reply
        reply.want()
        pending.turn_end = time.perf_counter()
        pending.history_at = len(self.history)
        self.shown = pending
        message = {"role": "assistant", "content": ""}  # its metadata (mode, latency) marks it finished
        self.history += [{"role": "user", "content": self.clip(pending)}, message]
        speak = pending.settings.spoken and self.speaker is not None
        splitter = SentenceSplitter() if speak else None
        last_update, retract, error = 0.0, False, None
        while True:
            retract = self.interrupts(reply) or retract
            try:
                piece = reply.next_piece(timeout=POLL_S)
            except queue.Empty:
                continue
            except RuntimeError as failure:  # the engine failed this turn: say so, keep serving
                logger.error("%s: turn failed: %s", self.name, failure)
                error = failure
                metrics.ERRORS.labels("turn").inc()
                break
            if piece is None:
                break
            now = time.perf_counter()
            if pending.first_token is None:
                pending.first_token = now
                metrics.TURN_LATENCY.observe(now - pending.speech_end)
            message["content"] = reply.text
            sentences = splitter.push(piece) if splitter is not None and not reply.cancelled else []
            for sentence in sentences:
                self.outbox.put(self.output(pending.status(), audio=self.speaker.synthesize(sentence)))
                last_update = time.perf_counter()
            if not sentences and (last_update == 0.0 or now - last_update >= self.options.ui_interval_s):
                self.outbox.put(self.output(pending.status()))
                last_update = now
        if splitter is not None and not reply.cancelled:
            for sentence in splitter.flush():
                self.outbox.put(self.output(pending.status(), audio=self.speaker.synthesize(sentence)))
        metrics.turn_shown(self.name, pending.settings.mode, reply.stats)
        if retract:
            return self.retract()
        status = pending.status()
        if reply.cancelled:
            status["interrupted"] = True
        if error is not None:
            message["content"] = reply.text + f"\n\n⚠️ {error}"
            status["error"] = str(error)
        elif not reply.text and not reply.cancelled:
            message["content"] = "…"  # nothing generated (an immediate end of sequence)
        message["metadata"] = {"title": reply_title(status)}
        logger.info("turn: mode=%s %s pause=%sms first_token=%sms prefill=%d cached=%d tokens=%d %.1f tok/s%s",
                    pending.settings.mode, pending.label, status["pause_ms"], status["first_token_ms"],
                    status["prefill_tokens"], status["cached_tokens"], status["tokens"], status["tokens_per_s"],
                    " (interrupted)" if status.get("interrupted") else "")
        self.outbox.put(self.output(status, final=True))

    def clip(self, pending: Pending) -> str | dict:
        """The user's turn as the chat shows it: a spoken turn is a playable clip (a gradio file message,
        its label as alt_text), a typed one its text. Only the last `clips` spoken turns keep their clip."""
        if pending.audio is None or self.options.clips <= 0:
            return pending.label
        if self.clip_dir is None:
            self.clip_dir = tempfile.mkdtemp(prefix=f"voxtral-{self.name}-")
        fd, path = tempfile.mkstemp(suffix=".wav", dir=self.clip_dir)
        with os.fdopen(fd, "wb") as out:
            soundfile.write(out, pending.audio[-int(self.options.clip_s * SAMPLE_RATE):], SAMPLE_RATE,
                            subtype="PCM_16", format="WAV")
        self.clip_files.append(path)
        while len(self.clip_files) > 2 * self.options.clips:  # outputs still on their way may name recent ones
            os.remove(self.clip_files.popleft())
        spoken = [m for m in self.history if m["role"] == "user" and isinstance(m["content"], dict)]
        for message in spoken[:max(len(spoken) - self.options.clips + 1, 0)]:
            message["content"] = message["content"]["alt_text"]
        return {"path": path, "mime_type": "audio/wav", "alt_text": pending.label}

    def interrupts(self, reply: Reply) -> bool:
        """While `reply` streams: apply the messages that cannot wait; -> whether to take it back."""
        retract = False
        while True:
            try:
                kind, value = self.inbox.get_nowait()
            except queue.Empty:
                return retract
            if kind not in INTERRUPTS:
                self.deferred.append((kind, value))
                continue
            if kind == "settings":
                self.settings = value
                continue
            reply.cancel()
            if kind == "resume":
                self.outbox.put(HUSH)
                retract = True
            elif kind == "close":
                self.closing = True
            elif kind in ("speech", "clear"):  # done once the reply has stopped
                self.deferred.append((kind, value))
