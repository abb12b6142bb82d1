"""The reply step: a finished turn of speech -> Voxtral's streamed reply, as chat updates (and speech).

`VoxtralHandler` is fastrtc's ReplyOnPause with our turn-taking (streaming VAD, short pause,
retract-on-resume, barge-in) and one `Conversation` per connection: fastrtc copies the handler for
each WebRTC, WebSocket or phone connection, so a conversation's messages and KV cache live on that
copy and never reach another connection. Replies go out as AdditionalOutputs(history, status): the
Gradio chat messages and a small status dict (latencies), and as audio when replies are spoken.
"""

import asyncio
import logging
import queue
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import av
import numpy as np
from fastrtc import AdditionalOutputs, ReplyOnPause
from fastrtc.utils import create_message, get_current_context

from .audio import SAMPLE_RATE, AudioError, prepare
from .engine import CHAT, Chat, Engine, EngineBusy, Reply
from .tts import SentenceSplitter
from .turn import TurnEvent, TurnOptions, TurnTaker
from .vad import SileroPauseModel, to_16k

logger = logging.getLogger(__name__)

MODES = ("chat", "transcribe")


@dataclass(frozen=True)
class Settings:
    """One connection's choices in the UI (or from `stream.set_input(webrtc_id, *values)`)."""

    mode: str = "chat"  # "chat": Voxtral answers; "transcribe": Voxtral writes down what was said
    language: str = ""  # transcription language code, "" = let Voxtral detect it
    temperature: float = CHAT.temperature  # chat sampling temperature (transcription is always greedy)
    spoken: bool = False  # also speak replies (always on for phone calls)

    @classmethod
    def from_values(cls, values: list) -> "Settings":
        """UI input values (mode, language, temperature, spoken), tolerant of junk and short lists."""
        names = ("mode", "language", "temperature", "spoken")
        values = [v for v in values if not hasattr(v, "webrtc_id")][-len(names):]  # drop the WebRTC value
        given = dict(zip(names, values))
        mode = given.get("mode") if given.get("mode") in MODES else cls.mode
        try:
            temperature = min(max(float(given.get("temperature", cls.temperature)), 0.0), 2.0)
        except (TypeError, ValueError):
            temperature = cls.temperature
        language = str(given.get("language") or "").strip().lower()[:8]
        return cls(mode, "" if language in ("", "auto") else language, temperature, bool(given.get("spoken")))


@dataclass(frozen=True)
class ChatOptions:
    turns: TurnOptions = TurnOptions()
    max_audio_s: float = 300.0  # a turn longer than this keeps its last part (engine's cap)
    reply_tokens: int = CHAT.max_new_tokens  # longest chat reply, tokens
    ui_interval_s: float = 0.05  # streamed text reaches the UI at most this often (first token at once)
    phone_spoken: bool = True  # phone callers cannot read: replies are spoken on calls
    temperature: float = CHAT.temperature  # chat temperature a new conversation starts with (--temperature)


@dataclass
class Turn:
    """Timings of one turn, for the INFO line and the UI."""

    speech_end: float  # perf_counter time the last speech arrived
    turn_end: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def status(self, reply: Reply | None) -> dict:
        stats = reply.stats if reply is not None else {}
        first = None if self.first_token is None else round((self.first_token - self.speech_end) * 1000)
        return {"pause_ms": round((self.turn_end - self.speech_end) * 1000), "first_token_ms": first,
                "tokens": stats.get("tokens", 0), "tokens_per_s": round(stats.get("tokens_per_s", 0.0), 1),
                "prefill_tokens": stats.get("prefill_tokens", 0), "cached_tokens": stats.get("cached_tokens", 0)}


class Conversation:
    """One person's conversation: engine chat (KV cache) + the chat messages the UI shows."""

    def __init__(self, engine: Engine, options: ChatOptions, speaker=None):
        self.engine = engine
        self.options = options
        self.speaker = speaker  # text-to-speech for spoken replies (None: text only)
        self.chat: Chat | None = None
        self.history: list[dict] = []  # gradio "messages" format
        self.last_reply: Reply | None = None
        self.last_shown = 0  # history length before the last turn was shown (for retraction)
        self.shown_turn: int | None = None  # id of the turn shown last

    def open(self) -> None:
        if self.chat is None:
            self.chat = self.engine.open_chat()

    def close(self) -> None:
        if self.chat is not None:
            self.chat.close()
            self.chat = None

    def clear(self) -> None:
        if self.chat is not None:
            self.chat.reset()
        self.history = []
        self.last_reply = None

    def cancel(self) -> None:
        if self.last_reply is not None:
            self.last_reply.cancel()

    def retract(self, turn_id: int, pending: "Pending | None") -> AdditionalOutputs | None:
        """Take back turn `turn_id` (the person was not done speaking): drop its reply from the
        conversation, and from the chat if it was shown (-> the chat without it)."""
        if pending is not None:
            self.abandon(pending)
        if self.shown_turn != turn_id:
            return None
        self.history = self.history[: self.last_shown]
        self.shown_turn = None
        return AdditionalOutputs(list(self.history), {"retracted": True})

    def outputs(self, status: dict) -> AdditionalOutputs:
        return AdditionalOutputs([dict(m) for m in self.history], status)

    def begin(self, rate: int, samples: np.ndarray, settings: Settings, speech_end: float | None = None,
              turn_id: int | None = None) -> "Pending":
        """Start the reply to a turn (prompt, audio encoding and prefill begin now); nothing is shown yet.

        Called speculatively at a short pause; `abandon()` it if the person goes on speaking.
        Raises AudioError for unusable audio and EngineBusy when no conversation slot is free.
        """
        pending = Pending(Turn(speech_end=speech_end or time.perf_counter()), settings, turn_id)
        audio = prepare(rate, samples, self.options.max_audio_s)
        pending.seconds = len(audio) / SAMPLE_RATE
        self.open()
        if settings.mode == "transcribe":
            pending.reply = self.chat.transcribe(audio, settings.language or None)
        else:
            pending.reply = self.chat.start(audio, sampling=replace(CHAT, temperature=settings.temperature,
                                                                    max_new_tokens=self.options.reply_tokens))
        self.last_reply = pending.reply
        return pending

    def abandon(self, pending: "Pending") -> None:
        """Drop a speculative reply that was never shown, and its turn."""
        if pending.reply is not None and self.chat is not None:
            self.chat.discard(pending.reply)

    def respond(self, rate: int, samples: np.ndarray, settings: Settings, spoken: bool = False) -> Iterator:
        """One turn, begun and shown: audio in -> AdditionalOutputs as the reply streams."""
        try:
            pending = self.begin(rate, samples, settings)
        except AudioError as error:
            yield self.outputs({"error": str(error)})
            return
        yield from self.show(pending, spoken)

    def show(self, pending: "Pending", spoken: bool = False, stopped=lambda: False) -> Iterator:
        """Stream a begun reply into the chat (and speech when `spoken`); `stopped()` cancels it."""
        turn, reply = pending.turn, pending.reply
        turn.turn_end = time.perf_counter()
        self.last_shown = len(self.history)
        self.shown_turn = pending.turn_id
        message = {"role": "assistant", "content": ""}  # this turn's own message (history may grow meanwhile)
        self.history += [{"role": "user", "content": "🎙️ %.1f s of speech" % pending.seconds}, message]
        splitter = SentenceSplitter() if spoken and self.speaker is not None else None
        last_update = 0.0
        try:
            for piece in reply:
                if stopped():
                    reply.cancel()
                now = time.perf_counter()
                if turn.first_token is None:
                    turn.first_token = now
                message["content"] = reply.text
                sentences = splitter.push(piece) if splitter is not None else []
                for sentence in sentences:
                    yield self.speaker.synthesize(sentence), self.outputs(turn.status(reply))
                    last_update = time.perf_counter()
                if not sentences and (last_update == 0.0 or now - last_update >= self.options.ui_interval_s):
                    yield self.outputs(turn.status(reply))
                    last_update = now
            for sentence in splitter.flush() if splitter is not None else []:
                yield self.speaker.synthesize(sentence), self.outputs(turn.status(reply))
        except RuntimeError as error:  # the engine failed this turn: say so, keep serving
            logger.exception("turn failed")
            message["content"] = reply.text + f"\n\n⚠️ {error}"
        status = turn.status(reply)
        if reply.generation.cancelled.is_set():
            status["interrupted"] = True
        if not reply.text and not reply.generation.cancelled.is_set():
            message["content"] = "…"  # nothing generated (an immediate end of sequence)
        message["metadata"] = {"title": latency_line(status)}
        logger.info("turn: mode=%s audio=%.1fs pause=%sms first_token=%sms prefill=%d cached=%d tokens=%d %.1f tok/s%s",
                    pending.settings.mode, pending.seconds, status["pause_ms"], status["first_token_ms"],
                    status["prefill_tokens"], status["cached_tokens"], status["tokens"], status["tokens_per_s"],
                    " (interrupted)" if status.get("interrupted") else "")
        yield self.outputs(status)


@dataclass
class Pending:
    """A turn whose reply has begun (perhaps speculatively) but may not be shown yet."""

    turn: Turn
    settings: Settings
    turn_id: int | None = None
    reply: Reply | None = None
    seconds: float = 0.0  # of audio in the turn


def resolved(pending: Pending) -> Future:
    future = Future()
    future.set_result(pending)
    return future


def latency_line(status: dict) -> str:
    first = status.get("first_token_ms")
    parts = [f"⏱ {first} ms to first token" if first is not None else "⏱ no tokens",
             f"{status.get('tokens_per_s', 0)} tok/s"]
    if status.get("interrupted"):
        parts.append("interrupted")
    return " · ".join(parts)


class VoxtralHandler(ReplyOnPause):
    """ReplyOnPause with streaming turn-taking and a per-connection Voxtral conversation."""

    def __init__(self, engine: Engine, options: ChatOptions = ChatOptions(), speaker=None):
        super().__init__(self.reply, model=SileroPauseModel(), input_sample_rate=SAMPLE_RATE,
                         output_sample_rate=24_000, can_interrupt=True)
        self.engine = engine
        self.options = options
        self.speaker = speaker
        self.conversation = Conversation(engine, options, speaker)
        self.turns = TurnTaker(options.turns)
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()  # ("turn", id, (TurnEvent, Pending)) | ("outputs", id, ...)
        self.turn_id = 0  # id of the last turn that ended
        self.retracted: set[int] = set()  # turns taken back because speech resumed
        self.settings = Settings(temperature=options.temperature)
        self.refused: str | None = None
        self.playing_until = 0.0  # monotonic time the spoken reply sent so far ends playing
        self.preparing = ThreadPoolExecutor(1, thread_name_prefix="voxtral-prepare")  # speculative begin()
        self.speculation: Future | None = None  # reply begun at a short pause, shown if the turn ends
        self.ended: Future | None = None  # the reply to the turn that ended last (taken back on "resume")

    def copy(self) -> "VoxtralHandler":
        return VoxtralHandler(self.engine, self.options, self.speaker)

    def resample(self, frame):
        """fastrtc keeps the input frame's sample count (960 at 48 kHz) when resampling: at 16 kHz
        that is 60 ms lumps. Let the resampler pass each 20 ms frame on as soon as it arrives."""
        if self._resampler is None:
            self._resampler = av.AudioResampler(format="s16", layout=self.expected_layout,
                                                rate=self.input_sample_rate, frame_size=None)
        yield from self._resampler.resample(frame)

    # -- connection lifetime ----------------------------------------------------------------------

    def start_up(self) -> None:
        try:
            self.conversation.open()
        except EngineBusy as error:
            self.refused = f"The server is full ({error}). Please try again in a minute."
            logger.warning("refused a connection: %s", error)
            self.send_message_sync(create_message("error", self.refused))

    def shutdown(self) -> None:
        self.drop_speculation()
        self.preparing.shutdown(wait=True)
        self.conversation.cancel()
        self.conversation.close()

    def set_args(self, args: list) -> None:
        super().set_args(args)
        self.settings = Settings.from_values(list(args))
        if self.phone_mode:
            self.settings = replace(self.settings, spoken=self.options.phone_spoken)

    # -- audio in: turn events --------------------------------------------------------------------

    def receive(self, frame: tuple[int, np.ndarray]) -> None:
        if self.refused:
            return
        rate, samples = frame
        for event in self.turns.feed(to_16k(rate, samples)):
            self.on_turn_event(event)

    def on_turn_event(self, event: TurnEvent) -> None:
        if event.kind == "speech":  # barge-in: stop the reply being generated and spoken
            if self.generator is not None or time.monotonic() < self.playing_until:
                logger.info("barge-in: stopping the reply")
                self.conversation.cancel()
                self.stop_speaking()
        elif event.kind == "resume":  # the turn was not over: take the reply back
            logger.debug("speech resumed within %.1f s of the turn's end; retracting it", self.turns.options.resume_s)
            self.retracted.add(self.turn_id)
            self.stop_speaking()
            ended = self.ended.result() if self.ended is not None else None  # before the next turn begins
            outputs = self.conversation.retract(self.turn_id, ended)
            self.ended = None
            if outputs is not None:
                self.jobs.put(("outputs", self.turn_id, outputs))
        elif event.kind == "pause":  # maybe the end: prepare the reply now (off this audio thread), show it at "end"
            self.drop_speculation()
            self.speculation = self.preparing.submit(self.prepare, event, self.turn_id + 1)
        elif event.kind == "continue":  # it was a pause inside the turn
            self.drop_speculation()
        elif event.kind == "end":
            self.turn_id += 1
            self.send_message_sync(create_message("log", "pause_detected"))
            pending, self.speculation = self.speculation, None
            self.ended = pending
            self.jobs.put(("turn", self.turn_id, (event, pending)))
            self.event.set()

    def prepare(self, event: TurnEvent, turn_id: int) -> Pending | None:
        try:
            return self.conversation.begin(SAMPLE_RATE, event.audio, self.settings, event.speech_end, turn_id)
        except (AudioError, EngineBusy) as error:
            logger.debug("no speculative reply: %s", error)
            return None

    def drop_speculation(self) -> None:
        if self.speculation is not None:
            self.abandon(self.speculation)
            self.speculation = None

    def abandon(self, pending: Future | None) -> None:
        """Drop a reply being prepared or prepared, once it is (the preparing thread is in order)."""
        if pending is not None:
            pending.add_done_callback(lambda done: done.result() and self.conversation.abandon(done.result()))

    def stop_speaking(self) -> None:
        self.playing_until = 0.0
        self.clear_queue()
        if self.phone_mode:  # Twilio keeps playing what it has buffered until told to clear
            context = get_current_context()
            if context.websocket is not None:
                asyncio.run_coroutine_threadsafe(
                    context.websocket.send_json({"event": "clear", "streamSid": context.webrtc_id}), self.loop)

    # -- replies out ------------------------------------------------------------------------------

    def emit(self):
        if self.generator is None:
            try:
                kind, turn_id, event = self.jobs.get(timeout=0.02)  # block briefly: fastrtc polls emit in a loop
            except queue.Empty:
                return None
            if kind == "outputs":
                return event
            event, pending = event
            if turn_id in self.retracted:  # taken back before it was shown
                self.abandon(pending)
                return None
            self.generator = self.reply(event, turn_id, pending)
        try:
            output = next(self.generator)
            if isinstance(output, tuple) and isinstance(output[0], tuple):  # (rate, audio), outputs
                rate, audio = output[0]
                self.playing_until = max(self.playing_until, time.monotonic()) + len(audio) / rate
            return output
        except StopIteration:
            self.generator = None
            self.send_message_sync(create_message("log", "response_starting"))
            return None
        except Exception as error:  # a turn boundary: log, tell the person, keep serving
            logger.exception("reply failed")
            self.generator = None
            return AdditionalOutputs(list(self.conversation.history), {"error": f"reply failed: {error}"})

    def reply(self, event: TurnEvent, turn_id: int = 0, pending: Future | None = None):
        """fastrtc's reply fn, for one finished turn (audio as float32 16 kHz)."""
        pending = pending.result() if pending is not None else None
        if pending is None:
            try:
                pending = self.conversation.begin(SAMPLE_RATE, event.audio, self.settings, event.speech_end, turn_id)
                self.ended = resolved(pending)
            except AudioError as error:
                yield self.conversation.outputs({"error": str(error)})
                return
        spoken = self.settings.spoken or self.phone_mode
        yield from self.conversation.show(pending, spoken, stopped=lambda: turn_id in self.retracted)

    def reset(self) -> None:  # ReplyOnPause's reset would drop our queued turns; nothing to reset here
        self.generator = None
