"""The fastrtc handler: one per WebRTC, WebSocket or phone connection (fastrtc copies it for each).

Audio in -> turn events (turns/taker.py) -> the connection's Conversation; its events -> chat
updates (AdditionalOutputs(history, status, final), chat_view.py) and spoken sentences out. The
handler keeps no conversation state of its own, so a connection's messages and KV cache never reach another.
"""

import collections
import contextlib
import logging
import queue
import threading
import time

import numpy as np
import soxr
from fastrtc import AdditionalOutputs, CloseStream, StreamHandler
from fastrtc.utils import create_message

from ..audio.pcm import SAMPLE_RATE
from ..audio.vad import to_16k
from ..backends.contract import EngineBusy, EngineFailed
from ..compat import fastrtc as compat
from ..conversation.conversation import Conversation, ConversationOptions, Settings
from ..turns.taker import TurnTaker
from . import metrics
from .chat_view import CLOSED, HUSH, ChatView, Output

logger = logging.getLogger(__name__)

OUTPUT_RATE = 24_000  # Hz of the audio track fastrtc sends back
EMIT_WAIT_S = 0.02  # emit() blocks this long for an output (fastrtc calls it in a loop)
PHONE_RATE = 8_000  # Hz, Twilio's mu-law; phone audio is resampled on our threads, never on the event loop
PEER_SILENT_S = 5.0  # a live microphone sends frames even in silence: none for this long means the peer is gone
HEARD_FRAMES_MAX = 250  # WebRTC frames (5 s) waiting for the hearing thread; more are dropped, not queued
HEARING_IDLE_S = 10.0  # the hearing thread ends after this long without a frame (it restarts on the next)


def settings_from_controls(values: list) -> Settings:
    """The page's control values (mode, language, temperature, spoken), tolerant of junk and short
    lists; fastrtc puts the microphone's own value first."""
    names = ("mode", "language", "temperature", "spoken")
    values = [v for v in values if not hasattr(v, "webrtc_id") and v != "__webrtc_value__"][-len(names):]
    return Settings.from_dict(dict(zip(names, values)))


class VoxtralHandler(StreamHandler):
    """A connection's turn-taking in front of its Conversation.

    Threads: `receive()` alone owns `turns`: it runs on the connection's hearing thread for WebRTC
    (`resample()`, on the event loop, only queues frames for it) and on fastrtc's receive worker for
    WebSocket and phone. `emit()` runs on fastrtc's emit worker and alone reads the outbox;
    start_up/set_args/shutdown only post messages; `view` and `rendered` belong to the emit worker.
    `hearing` belongs to the event loop. `settings`, `conversation` and `last_frame` are guarded by
    `lock` (set_args may come before start_up).
    """

    def __init__(self, engine, options: ConversationOptions = ConversationOptions(), speaker=None,
                 transport_name: str = "webrtc", on_open=None, clock=time.monotonic):
        super().__init__(input_sample_rate=SAMPLE_RATE, output_sample_rate=OUTPUT_RATE)
        self.engine = engine
        self.options = options
        self.speaker = speaker
        self.transport_name = transport_name  # webrtc | websocket | phone: labels logs and metrics
        self.on_open = on_open  # called with each connection's Conversation (the server's registry)
        self.clock = clock  # -> seconds, monotonic: when frames arrive (tests pass one they move by hand)
        self.turns = TurnTaker(options.turns)
        self.lock = threading.Lock()
        self.settings = Settings(temperature=options.temperature)
        self.conversation: Conversation | None = None
        self.view = ChatView(options, transport_name)  # the conversation's events as chat updates
        self.rendered: collections.deque = collections.deque()  # what the view made of the last event, in order
        self.refused: str | None = None  # why start_up refused the connection, until emit closes it
        self.last_frame: float | None = None  # clock() when the last WebRTC frame arrived (resample())
        self.heard: queue.Queue = queue.Queue(HEARD_FRAMES_MAX)  # WebRTC frames for the hearing thread, then None
        self.hearing: threading.Thread | None = None
        self.dropped = 0  # WebRTC frames dropped because the hearing thread was HEARD_FRAMES_MAX behind
        self.hung_up = threading.Event()  # set by shutdown(): the hearing thread ends, frames are ignored

    def copy(self) -> "VoxtralHandler":
        return VoxtralHandler(self.engine, self.options, self.speaker, self.transport_name, self.on_open, self.clock)

    def resample(self, frame) -> tuple:
        """A WebRTC frame, on fastrtc's event loop: queued for this connection's hearing thread, which
        resamples it and runs turn-taking. Left to fastrtc, every 20 ms frame waits for a worker thread
        and then for the loop again; with the loop busy (8 connections on 2 cores) the audio fell
        behind real time without end (25 s late after 90 s). Yields nothing to fastrtc."""
        if self.hung_up.is_set():
            return ()
        with self.lock:
            self.last_frame = self.clock()
        try:
            self.heard.put_nowait(frame)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning("%s: turn-taking is %d frames behind; dropping audio", self.transport_name,
                               HEARD_FRAMES_MAX)
        if self.hearing is None or not self.hearing.is_alive():
            self.hearing = threading.Thread(target=self.hear, name=f"voxtral-hearing-{self.transport_name}",
                                            daemon=True)
            self.hearing.start()
        return ()

    def hear(self) -> None:
        """The hearing thread: queued WebRTC frames -> 16 kHz pieces as they arrive -> `receive()`."""
        while True:
            try:
                frame = self.heard.get(timeout=HEARING_IDLE_S)
            except queue.Empty:
                return
            if frame is None or self.hung_up.is_set():
                return
            try:
                for piece in compat.resample_each_frame(self, frame):
                    self.receive((piece.sample_rate, piece.to_ndarray()))
            except Exception:  # noqa: BLE001 - one bad frame must not end the connection's hearing
                logger.exception("%s: a frame could not be heard", self.transport_name)

    # -- connection lifetime ----------------------------------------------------------------------

    def start_up(self) -> None:
        with self.lock:
            settings = self.settings
            if self.phone_mode:
                settings = self.settings = Settings(spoken=self.options.phone_spoken,
                                                    temperature=self.options.temperature)
            conversation = Conversation(self.engine, self.options, self.speaker, settings, name=self.transport_name,
                                        listener=metrics.conversation_event)
        try:
            conversation.open()
        except (EngineBusy, EngineFailed) as error:
            refused = f"The server is full ({error}). Please try again in a minute." if isinstance(
                error, EngineBusy) else f"The server cannot answer right now ({error})."
            logger.warning("refused a connection: %s", error)
            metrics.REJECTED.inc()
            self.send_message_sync(create_message("error", refused))
            with self.lock:
                self.refused = refused
            return
        with self.lock:
            self.conversation = conversation
            settings = self.settings  # arrived while the slot was being taken
            if self.last_frame is None:  # the no-audio rule counts from the connection, not its first frame
                self.last_frame = self.clock()
        conversation.post("settings", settings)
        if self.on_open is not None:
            self.on_open(conversation, self.transport_name)
        if self.transport_name == "webrtc":  # ask the page for its current controls, so the first turn uses them
            self.send_message_sync(create_message("send_input", []))

    def shutdown(self) -> None:
        """fastrtc calls this on the event loop: it must not block (the conversation closes on its own thread)."""
        self.hung_up.set()
        with contextlib.suppress(queue.Full):
            self.heard.put_nowait(None)  # wakes the hearing thread, which ends
        with self.lock:
            conversation = self.conversation
        if conversation is not None:
            conversation.close()

    def set_args(self, args: list) -> None:
        super().set_args(args)
        settings = settings_from_controls(list(args))
        if self.phone_mode:
            settings = Settings.from_dict({"spoken": self.options.phone_spoken}, settings)
        with self.lock:
            self.settings = settings
            conversation = self.conversation
        if conversation is not None:
            conversation.post("settings", settings)

    # -- audio in -----------------------------------------------------------------------------------

    def receive(self, frame) -> None:
        with self.lock:
            conversation = self.conversation
        if conversation is None:
            return
        rate, samples = frame
        started = time.perf_counter()
        events = self.turns.feed(to_16k(rate, samples))
        metrics.AUDIO.observe(time.perf_counter() - started)
        for event in events:
            logger.debug("%s: turn event %s", self.transport_name, event.kind)
            if event.kind == "end":
                self.send_message_sync(create_message("log", "pause_detected"))
            conversation.post(event.kind, event)

    # -- replies out --------------------------------------------------------------------------------

    def emit(self):
        with self.lock:
            conversation = self.conversation
            refused, self.refused = self.refused, None
        if refused:  # a refused connection is closed at once
            return CloseStream(refused)
        if conversation is None:
            time.sleep(EMIT_WAIT_S)  # not started yet (or refused): fastrtc calls emit in a loop
            return None
        if self.peer_gone():  # don't wait ~30 s for ICE consent to notice: free the slot now
            logger.info("%s: no audio for %.0f s; closing the conversation", self.transport_name, PEER_SILENT_S)
            conversation.close()
        if not self.rendered:
            try:
                event = conversation.outbox.get(timeout=EMIT_WAIT_S)
            except queue.Empty:
                return None
            self.rendered.extend(self.view.render(event))
            if not self.rendered:
                return None
        item = self.rendered.popleft()
        if item == HUSH:
            logger.debug("%s: hush", self.transport_name)
            self.stop_speaking()
            return None
        if item == CLOSED:
            return CloseStream("the conversation has ended")
        return self.to_fastrtc(item)

    def peer_gone(self) -> bool:
        if self.transport_name != "webrtc":  # sockets have their own media deadline (sockets.py)
            return False
        with self.lock:
            last = self.last_frame
        return last is not None and self.clock() - last > PEER_SILENT_S

    def to_fastrtc(self, output: Output):
        if self.transport_name == "webrtc" and self.channel is not None and self.channel.readyState != "open":
            return None  # the page has gone: fastrtc would tell it on the closed data channel (InvalidStateError)
        outputs = AdditionalOutputs(output.history, output.status, output.final)
        if output.final:
            self.send_message_sync(create_message("log", "response_starting"))
        if output.audio is None:
            return outputs
        rate, samples = output.audio
        if self.phone_mode and rate != PHONE_RATE:  # here, not in fastrtc's librosa call on the event loop
            samples, rate = soxr.resample(samples, rate, PHONE_RATE).astype(np.float32), PHONE_RATE
        return (rate, samples), outputs

    def stop_speaking(self) -> None:
        if self.clear_queue is not None:  # fastrtc's playback queue, once the connection has one
            self.clear_queue()
        if self.phone_mode:
            compat.tell_twilio_to_clear(self)
