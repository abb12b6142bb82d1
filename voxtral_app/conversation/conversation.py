"""A conversation: turns in (spoken, uploaded or typed), Voxtral's streamed replies out, as typed events.

Every transport (WebRTC and WebSocket handlers, phone calls, the page's upload box, the session
API) drives the same `Conversation`. It owns one backend `Chat` (a slot), the person's settings and
the turn in progress, and it runs on its own worker thread: other threads only `post()` messages to
its inbox and read events (events.py) from its outbox. So a turn's speculative start, its showing,
a retraction, a barge-in and a clear can never interleave. How the events look (chat messages,
JSON, speech on a phone line) is each surface's business; the words used here are in events.py.
"""

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..audio.pcm import SAMPLE_RATE, AudioError, prepare
from ..backends.contract import CHAT, Chat, EngineBusy, EngineFailed, Reply
from ..turns.taker import TurnOptions
from .events import (
    Cleared,
    Closed,
    Event,
    Hushed,
    Opened,
    ReplyDelta,
    ReplyFinished,
    ReplyRetracted,
    ReplyStarted,
    ReplyStats,
    Speech,
    StateChanged,
    TurnFailed,
    UserTranscript,
    UserTurn,
)
from .speech import SentenceSplitter

logger = logging.getLogger(__name__)

MODES = ("chat", "transcribe")
INTERRUPTS = ("speech", "resume", "cancel", "clear", "close", "settings")  # handled even while a reply streams
POLL_S = 0.01  # while a reply streams, the inbox is looked at this often (bounds barge-in latency)


@dataclass(frozen=True)
class Settings:
    """One connection's choices (the page's controls, `/input`, a session's config, a phone call)."""

    mode: str = "chat"  # "chat": Voxtral answers; "transcribe": Voxtral writes down what was said
    language: str = ""  # transcription language code, "" = let Voxtral detect it
    temperature: float = CHAT.temperature  # chat sampling temperature (transcription is always greedy)
    spoken: bool = False  # also speak replies

    @classmethod
    def from_dict(cls, given: dict, base: "Settings | None" = None) -> "Settings":
        """Named values (a JSON body, the page's controls); missing or junk values keep `base`'s."""
        base = base or cls()
        mode = given.get("mode") if given.get("mode") in MODES else base.mode
        try:
            temperature = min(max(float(given.get("temperature", base.temperature)), 0.0), 2.0)
        except (TypeError, ValueError):
            temperature = base.temperature
        if temperature != temperature:  # NaN
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
    ui_interval_s: float = 0.05  # a streaming reply's deltas come at most this often (the first token at once)
    phone_spoken: bool = True  # phone callers cannot read: calls get spoken replies unless this is off
    idle_timeout_s: float = 60.0  # a conversation with no audio, turn or message for this long closes itself
    # (frees its slot: an open socket that never sends audio must not hold one; a live microphone, even
    # silent, keeps it: its connection posts "alive")
    temperature: float = CHAT.temperature  # chat temperature a new conversation starts with (--temperature)
    clips: int = 8  # the page plays back the last 8 spoken turns (older ones show their label; 0: labels only)
    clip_s: float = 30.0  # a turn's clip keeps its last 30 s (960 KB of 16-bit 16 kHz audio)
    captions: bool = False  # transcribe each spoken chat turn beside its reply (UserTranscript); app.py's
    # --captions turns it on (what it costs: docs/benchmarks, long-talk)


@dataclass
class Pending:
    """A turn whose reply has begun (perhaps speculatively) and may not be shown yet."""

    reply: Reply
    settings: Settings
    speech_end: float  # perf_counter time the last speech arrived (or the text was sent)
    source: str  # "speech" | "upload" | "text"
    text: str = ""  # a typed turn's text
    audio: np.ndarray | None = None  # a spoken turn's 16 kHz samples
    turn: int = 0  # its number once shown
    turn_end: float = 0.0
    first_token: float | None = None
    ended_by: str = ""  # why turn-taking ended the turn: complete, long_pause, no_new_speech, background, max_turn

    def stats(self) -> ReplyStats:
        stats = self.reply.stats
        first = None if self.first_token is None else round((self.first_token - self.speech_end) * 1000)
        return ReplyStats(self.settings.mode, self.settings.language, self.source,
                          round((self.turn_end - self.speech_end) * 1000), first, stats["tokens"],
                          round(stats["tokens_per_s"], 1), stats["prefill_tokens"], stats["cached_tokens"],
                          self.ended_by, stats["first_token_s"])


class Conversation:
    """One person's conversation. Owner: its worker thread; everything below `# worker-owned` is
    touched by that thread alone. Any thread may `post()`, `close()` and read `outbox` (one reader).
    `listener(conversation, event)`, if given, hears every event on the worker thread (metrics)."""

    def __init__(self, backend, options: ConversationOptions = ConversationOptions(), speaker=None,
                 settings: Settings = Settings(), name: str = "conversation",
                 listener: Callable[["Conversation", Event], None] | None = None):
        self.backend = backend
        self.options = options
        self.speaker = speaker  # text-to-speech for spoken replies (None: text only)
        self.name = name  # the transport it came in by: labels logs and metrics
        self.listener = listener
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # (kind, value) from any thread
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # events, to one reader
        self.closed = threading.Event()  # set by the worker once its slot is released
        self.worker = threading.Thread(target=self.run, name=f"voxtral-{name}", daemon=True)
        # worker-owned
        self.settings = settings
        self.chat: Chat | None = None
        self.turns = 0  # turns shown so far (each event of a turn carries its number)
        self.speculation: Pending | None = None  # started at a short pause, shown if the turn ends
        self.shown: Pending | None = None  # the last shown turn: retracted if speech resumes
        self.streaming: Pending | None = None  # the turn whose reply is streaming now
        self.deferred: collections.deque = collections.deque()  # messages that arrived while a reply streamed
        self.closing = False
        self.voice_state = ""  # the last StateChanged emitted
        self.captioning: dict = {}  # turn -> the Future of its caption, until it is told
        self.kept_s = 0.0  # kept this long for its owner after its connection dropped (Parking): not idle meanwhile

    # -- any thread -----------------------------------------------------------------------------

    def open(self) -> "Conversation":
        """Take a slot (EngineBusy / EngineFailed if there is none) and start the worker."""
        self.chat = self.backend.open_chat()
        self.emit(Opened())
        self.state("listening")
        self.worker.start()
        return self

    def post(self, kind: str, value=None) -> None:
        """kind: "pause" / "continue" / "end" / "resume" / "speech" (TurnEvents), "audio" ((rate, samples),
        a whole turn), "text" (a typed turn), "settings", "cancel" (stop the reply), "clear", "close";
        and "caption" ((turn, Future)), posted by a caption as it is done; "alive" (the connection still
        sends audio, silence included: not idle) and "kept" (seconds: its connection dropped and it waits
        that long for its owner, then Parking closes it; not idle before)."""
        if not self.closed.is_set():
            self.inbox.put((kind, value))

    def close(self) -> None:
        """Never blocks: the worker cancels the reply, frees the slot and ends."""
        self.post("close")

    # -- worker ---------------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        self.outbox.put(event)
        if self.listener is not None:
            try:
                self.listener(self, event)
            except Exception:  # noqa: BLE001 - telemetry must not end a conversation
                logger.exception("%s: the listener failed on %s", self.name, type(event).__name__)

    def state(self, state: str) -> None:
        """Tell the surfaces what the voice loop does now (once per change)."""
        if state != self.voice_state:
            self.voice_state = state
            self.emit(StateChanged(state))

    def run(self) -> None:
        closed = Closed()
        try:
            while not self.closing:
                if self.deferred:
                    kind, value = self.deferred.popleft()
                else:
                    kind, value = self.inbox.get(timeout=max(self.options.idle_timeout_s, self.kept_s))
                if kind not in ("kept", "caption"):
                    self.kept_s = 0.0  # its connection is back (or it never left)
                self.handle(kind, value)
        except queue.Empty:
            logger.info("%s: closing after %.0f s without a turn", self.name, self.options.idle_timeout_s)
            closed = Closed("idle", f"This conversation was closed after {self.options.idle_timeout_s:.0f} s without "
                            "speech or a message; start a new one to go on.")
        except Exception:  # noqa: BLE001 - a bug must not leak the slot
            logger.exception("%s: conversation failed", self.name)
            closed = Closed("failed", "This conversation failed; please start a new one.")
        finally:
            self.drop_speculation()
            self.chat.close()  # waits for its reply to leave the decode thread (cancelled: one step)
            self.emit(closed)  # before `closed` is set: whoever waits for it finds the event there
            self.closed.set()

    def handle(self, kind: str, value) -> None:
        if kind == "close":
            self.closing = True
        elif kind == "settings":
            self.settings = value
        elif kind == "caption":
            self.captioned(*value)
        elif kind == "kept":
            self.kept_s = float(value)
        elif kind == "alive":
            pass  # audio still arrives (silence included): the idle clock starts again
        elif kind == "pause":  # maybe the end: prepare the reply now, unseen
            self.drop_speculation()
            self.speculation = self.start_audio(value.audio, value.speech_end, "speech", speculative=True)
        elif kind == "continue":  # it was a pause inside the turn
            self.drop_speculation()
        elif kind == "end":
            pending, self.speculation = self.speculation, None
            pending = pending or self.start_audio(value.audio, value.speech_end, "speech")
            if pending is not None:
                pending.ended_by = getattr(value, "reason", "") or ""
            if pending is None:  # it could not start: told by TurnFailed
                self.state("listening")
            self.show(pending)
        elif kind == "audio":  # a whole turn at once (an upload)
            rate, samples = value
            try:
                audio = prepare(rate, samples, self.options.max_audio_s)
            except AudioError as error:
                return self.emit(TurnFailed(str(error), "audio"))
            self.show(self.start_audio(audio, time.perf_counter(), "upload"))
        elif kind == "text":
            self.show(self.start_text(value))
        elif kind == "resume":  # the turn was not over: take its reply back
            self.emit(Hushed())
            self.state("hearing")
            self.retract()
        elif kind == "speech":  # a new turn begins: the last one can no longer be retracted
            self.emit(Hushed())
            self.state("hearing")
            self.shown = None
            if self.speculation is None:  # trim a full conversation now, while they speak, not at the turn's end
                self.chat.tidy(replace(CHAT, max_new_tokens=self.options.reply_tokens))
        elif kind == "clear":
            self.drop_speculation()
            self.captioning.clear()
            self.chat.reset()
            self.shown = None
            self.emit(Cleared())
        elif kind != "cancel":
            logger.warning("%s: unknown message %r", self.name, kind)

    def start_audio(self, audio: np.ndarray, speech_end: float, source: str,
                    speculative: bool = False) -> Pending | None:
        """Start the reply to a spoken turn (prompt, audio encoding and prefill begin now); nothing is shown.
        `speculative`: at a short pause: no error is told, and the backend serves it after waited-for turns."""
        settings = self.settings
        try:
            audio = prepare(SAMPLE_RATE, audio, self.options.max_audio_s)
            if settings.mode == "transcribe":
                reply = self.chat.transcribe(audio, settings.language or None, speculative=speculative)
            else:
                reply = self.chat.start(audio, sampling=replace(CHAT, temperature=settings.temperature,
                                                                max_new_tokens=self.options.reply_tokens),
                                        speculative=speculative)
        except (AudioError, ValueError, EngineBusy, EngineFailed) as error:
            if not speculative:
                self.emit(TurnFailed(str(error), "audio" if isinstance(error, AudioError) else "turn"))
            return None
        return Pending(reply, settings, speech_end, source, audio=audio)

    def start_text(self, text: str) -> Pending | None:
        text = text.strip() if isinstance(text, str) else ""
        if not text or len(text) > self.options.max_text_chars:
            self.emit(TurnFailed(f"A typed turn needs 1-{self.options.max_text_chars} characters.", "text"))
            return None
        settings = replace(self.settings, mode="chat")  # typed text is always answered
        try:
            reply = self.chat.start(text=text, sampling=replace(CHAT, temperature=settings.temperature,
                                                                max_new_tokens=self.options.reply_tokens))
        except (ValueError, EngineFailed) as error:
            self.emit(TurnFailed(str(error), "turn"))
            return None
        return Pending(reply, settings, time.perf_counter(), "text", text=text)

    def caption(self, pending: Pending) -> None:
        """Transcribe a shown spoken chat turn beside its reply; UserTranscript follows when it is done."""
        if not self.options.captions or pending.audio is None or pending.settings.mode != "chat":
            return
        try:
            future = self.chat.caption(pending.settings.language or None)
        except Exception:  # noqa: BLE001 - a caption is a nicety: the turn goes on without one
            logger.exception("%s: a caption could not be asked for", self.name)
            return
        if future is not None:
            self.captioning[pending.turn] = future
            future.add_done_callback(lambda done, turn=pending.turn: self.post("caption", (turn, done)))

    def captioned(self, turn: int, future) -> None:
        if self.captioning.get(turn) is not future:
            return  # retracted or cleared meanwhile
        del self.captioning[turn]
        if not future.cancelled() and future.exception() is None and future.result():
            self.emit(UserTranscript(turn, future.result()))

    def drop_speculation(self) -> None:
        if self.speculation is not None:
            self.chat.discard(self.speculation.reply)
            self.speculation = None

    def retract(self, streaming: bool = False) -> None:
        """Take back the last shown turn, from the chat's memory and from every surface."""
        pending, self.shown = self.shown, None
        if pending is None:
            return
        self.captioning.pop(pending.turn, None)
        self.chat.discard(pending.reply)
        self.emit(ReplyRetracted(pending.turn, pending.stats() if streaming else None))

    def show(self, pending: Pending | None) -> None:
        """Stream a started reply (and speech when the settings say so). Messages that arrive
        meanwhile are looked at between tokens: interrupts act now, turns wait their turn."""
        if pending is None:
            return
        reply = pending.reply
        reply.want()
        pending.turn_end = time.perf_counter()
        self.turns += 1
        pending.turn = turn = self.turns
        self.shown = pending
        self.emit(UserTurn(turn, pending.source, pending.text, pending.audio))
        self.state("thinking")
        self.caption(pending)
        speak = pending.settings.spoken and self.speaker is not None
        splitter = SentenceSplitter() if speak else None
        last_delta, sent, retract, error = 0.0, "", False, None
        while True:
            retract = self.interrupts(reply) or retract
            try:
                piece = reply.next_piece(timeout=POLL_S)
            except queue.Empty:
                if pending.first_token is None and reply.queued:
                    self.state("queued")
                continue
            except RuntimeError as failure:  # the backend failed this turn: say so, keep serving
                logger.error("%s: turn failed: %s", self.name, failure)
                error = str(failure)
                break
            if piece is None:
                break
            now = time.perf_counter()
            if pending.first_token is None:
                pending.first_token = now
                self.emit(ReplyStarted(turn, now - pending.speech_end, pending.stats()))
                self.state("speaking")
            sentences = splitter.push(piece) if splitter is not None and not reply.cancelled else []
            if sentences or last_delta == 0.0 or now - last_delta >= self.options.ui_interval_s:
                if reply.text != sent:
                    self.emit(ReplyDelta(turn, reply.text, reply.text[len(sent):]))
                    sent, last_delta = reply.text, now
                for sentence in sentences:
                    self.speak(turn, sentence)
                    last_delta = time.perf_counter()
        if splitter is not None and not reply.cancelled:
            for sentence in splitter.flush():
                self.speak(turn, sentence)
        if retract:  # speech resumed: the state is `hearing` already
            return self.retract(streaming=True)
        if reply.text != sent:  # the last pieces, held back by the delta interval
            self.emit(ReplyDelta(turn, reply.text, reply.text[len(sent):]))
        stats = pending.stats()
        seconds = 0.0 if pending.audio is None else len(pending.audio) / SAMPLE_RATE
        logger.info("turn: mode=%s source=%s %.1f s pause=%sms first_token=%sms prefill=%d cached=%d tokens=%d "
                    "%.1f tok/s%s", stats.mode, stats.source, seconds, stats.pause_ms, stats.first_token_ms,
                    stats.prefill_tokens, stats.cached_tokens, stats.tokens, stats.tokens_per_s,
                    " (interrupted)" if reply.cancelled else "")
        self.emit(ReplyFinished(turn, reply.text, stats, interrupted=reply.cancelled, error=error))
        if self.voice_state != "hearing":  # barged in on: they speak already
            self.state("listening")

    def speak(self, turn: int, sentence: str) -> None:
        rate, samples = self.speaker.synthesize(sentence)
        self.emit(Speech(turn, rate, samples))

    def interrupts(self, reply: Reply) -> bool:
        """While `reply` streams: apply the messages that cannot wait; -> whether to retract it."""
        retract = False
        while True:
            try:
                kind, value = self.inbox.get_nowait()
            except queue.Empty:
                return retract
            if kind == "caption":  # told now, beside the reply
                self.captioned(*value)
                continue
            if kind in ("alive", "kept"):
                self.handle(kind, value)
                continue
            if kind not in INTERRUPTS:
                self.deferred.append((kind, value))
                continue
            if kind == "settings":
                self.settings = value
                continue
            reply.cancel()
            if kind in ("speech", "resume"):
                self.state("hearing")
            if kind == "resume":
                self.emit(Hushed())
                retract = True
            elif kind == "close":
                self.closing = True
            elif kind in ("speech", "clear"):  # done once the reply has stopped
                self.deferred.append((kind, value))
