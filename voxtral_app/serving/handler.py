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
from ..conversation.events import StateChanged
from ..turns.taker import TurnTaker
from . import metrics
from .chat_view import CLOSED, HUSH, ChatView, Output
from .errors import busy_message
from .page_calls import PageConversation, PageKey

logger = logging.getLogger(__name__)

OUTPUT_RATE = 24_000  # Hz of the audio track fastrtc sends back
EMIT_WAIT_S = 0.02  # emit() blocks this long for an output (fastrtc calls it in a loop)
PHONE_RATE = 8_000  # Hz, Twilio's mu-law; phone audio is resampled on our threads, never on the event loop
# fastrtc sends a phone's audio a piece at a time and sleeps 0.75x each piece's length before the next,
# deaf to a barge-in's clear: a whole sentence (up to ~12 s of speech) as one piece held the next reply
# back for up to 0.75x its length
PHONE_PIECE_S = 0.2
PEER_SILENT_S = 5.0  # a live microphone sends frames even in silence: none for this long means the peer is gone
HEARD_FRAMES_MAX = 250  # WebRTC frames (5 s) waiting for the hearing thread; more are dropped, not queued
ALIVE_EVERY_S = 10.0  # while audio arrives, the conversation hears so this often (its idle clock starts again)
HEARING_IDLE_S = 10.0  # the hearing thread ends after this long without a frame (it restarts on the next)


def settings_from_controls(values: list) -> Settings:
    """The page's control values (mode, language, temperature, spoken), tolerant of junk and short
    lists; fastrtc puts the microphone's own value first."""
    names = ("mode", "language", "temperature", "spoken")
    values = [v for v in values if not hasattr(v, "webrtc_id") and v != "__webrtc_value__"
              and not isinstance(v, PageKey)][-len(names):]
    return Settings.from_dict(dict(zip(names, values)))


def time_limit_message(limit_s: float) -> str:
    limit = f"{limit_s / 60:g}-minute" if limit_s >= 60 else f"{limit_s:g}-second"
    return f"This call reached its {limit} limit. Press Start talking to go on: the conversation is kept."


def refusal(engine, error: Exception) -> str:
    """Why a connection gets no conversation, in plain words."""
    if isinstance(error, EngineBusy):
        slots = getattr(getattr(engine, "options", None), "slots", None)
        return busy_message(slots) if slots else "Every conversation is in use; please try again in a minute."
    return f"The model cannot answer right now ({error}). Please try again later."


class VoxtralHandler(StreamHandler):
    """A connection's turn-taking in front of its Conversation.

    Threads: `receive()` alone owns `turns` and `alive_at`: it runs on the connection's hearing thread for
    WebRTC (`resample()`, on the event loop, only queues frames for it) and on fastrtc's receive worker for
    WebSocket and phone. `emit()` runs on fastrtc's emit worker and alone reads the outbox;
    start_up/set_args/shutdown only post messages; `view` and `rendered` belong to the emit worker.
    `hearing` belongs to the event loop. `settings`, `conversation`, `view` (until emit reads the
    conversation), `key`, `started_at` and `last_frame` are guarded by `lock` (set_args may come
    before start_up).

    The page's connections (`calls` set) keep no conversation of their own: the page's key arrives
    with its controls (set_args), the connection takes that page's conversation (PageCalls.take, or
    opens one), and parks it again when it ends, so Stop then Start, a dropped connection, and
    typed or uploaded turns between calls all continue one conversation. `reading` is held by
    emit() while it takes and renders an event, so the conversation is parked between two events.
    """

    def __init__(self, engine, options: ConversationOptions = ConversationOptions(), speaker=None,
                 transport_name: str = "webrtc", on_open=None, clock=time.monotonic, calls=None,
                 time_limit_s: float | None = None):
        super().__init__(input_sample_rate=SAMPLE_RATE, output_sample_rate=OUTPUT_RATE)
        self.engine = engine
        self.options = options
        self.speaker = speaker
        self.transport_name = transport_name  # webrtc | websocket | phone: labels logs and metrics
        self.on_open = on_open  # called with each connection's Conversation (the server's registry)
        self.clock = clock  # -> seconds, monotonic: when frames arrive (tests pass one they move by hand)
        self.turns = TurnTaker(options.turns)
        self.alive_at = float("-inf")  # perf_counter() when the conversation last heard "alive" (receive's thread)
        self.lock = threading.Lock()
        self.settings = Settings(temperature=options.temperature)
        self.conversation: Conversation | None = None
        self.view = ChatView(options, transport_name)  # the conversation's events as chat updates
        self.rendered: collections.deque = collections.deque()  # what the view made of the last event, in order
        self.refused: str | None = None  # why the connection was refused (or ended), until emit closes it
        self.last_frame: float | None = None  # clock() when the last WebRTC frame arrived (resample())
        self.heard: queue.Queue = queue.Queue(HEARD_FRAMES_MAX)  # WebRTC frames for the hearing thread, then None
        self.hearing: threading.Thread | None = None
        self.dropped = 0  # WebRTC frames dropped because the hearing thread was HEARD_FRAMES_MAX behind
        self.hung_up = threading.Event()  # set by shutdown(): the hearing thread ends, frames are ignored
        self.calls = calls  # PageCalls: the page's conversations (ui.py); None: not a page's connection
        self.time_limit_s = time_limit_s  # a page's call ends after this, saying so (None: no limit)
        self.key: PageKey | None = None  # the page this connection came from (set_args)
        self.started_at: float | None = None  # clock() at start_up
        self.reading = threading.Lock()
        self.parked = False  # the conversation went back to the parking: emit reads it no more (under `reading`)
        self.greeted = False  # the page was told the state of the conversation it joined (emit)
        self.time_is_up = False  # the call's end for its time limit is on its way (emit)

    def copy(self) -> "VoxtralHandler":
        return VoxtralHandler(self.engine, self.options, self.speaker, self.transport_name, self.on_open, self.clock,
                              self.calls, self.time_limit_s)

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
        if self.calls is not None:  # a page's: its conversation comes with its key (set_args)
            with self.lock:
                self.started_at = self.clock()
            self.send_message_sync(create_message("send_input", []))
            return
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
            refused = refusal(self.engine, error)
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

    def join(self, key: PageKey) -> None:
        """A page's connection joins that page's conversation: the parked one, or a new one."""
        parked = self.calls.take(key, self)
        if parked is None:
            with self.lock:
                settings = self.settings
            try:
                conversation = Conversation(self.engine, self.options, self.speaker, settings,
                                            name=self.transport_name, listener=metrics.conversation_event).open()
            except (EngineBusy, EngineFailed) as error:
                logger.warning("refused a page's connection: %s", error)
                metrics.REJECTED.inc()
                self.calls.release(key, self)
                with self.lock:
                    self.refused = refusal(self.engine, error)
                return
            parked = PageConversation(conversation, ChatView(self.options, self.transport_name))
            if self.on_open is not None:
                self.on_open(conversation, self.transport_name)
        with self.lock:
            self.view = parked.view
            self.conversation = parked.conversation
            settings = self.settings
            gone = self.hung_up.is_set()  # the connection ended while the conversation was being found
        parked.conversation.post("settings", settings)
        if gone:
            self.park()

    def shutdown(self) -> None:
        """fastrtc calls this on the event loop: it must not block (the conversation closes on its own
        thread; a page's is parked once emit is between two events)."""
        self.hung_up.set()
        with contextlib.suppress(queue.Full):
            self.heard.put_nowait(None)  # wakes the hearing thread, which ends
        with self.lock:
            conversation, key = self.conversation, self.key
        if conversation is None:
            return
        if self.calls is not None and key is not None:
            threading.Thread(target=self.park, name="voxtral-park", daemon=True).start()
        else:
            conversation.close()

    def end(self, message: str) -> None:
        """End this call (the server is shutting down): the page's chat says why. Any thread."""
        with self.lock:
            self.refused = message

    def park(self) -> None:
        """Hand the page's conversation back (once), between two of emit's events: to the parking, or
        to the page's next connection (PageCalls.take)."""
        with self.reading:
            with self.lock:
                conversation, key, view = self.conversation, self.key, self.view
                already, self.parked = self.parked, True
            if conversation is not None and not already:
                self.calls.park(key, PageConversation(conversation, view), self)

    def conversation_of(self, key: PageKey | None) -> Conversation | None:
        """This connection's conversation, for the page that shows `key` (the page's own, while the
        call is up), else None: a connection id alone is no credential."""
        with self.lock:
            if key is None or key != self.key or self.parked or self.conversation is None:
                return None
            conversation = self.conversation
        return None if conversation.closed.is_set() else conversation

    def set_args(self, args: list) -> None:
        super().set_args(args)
        settings = settings_from_controls(list(args))
        if self.phone_mode:
            settings = Settings.from_dict({"spoken": self.options.phone_spoken}, settings)
        key = next((value for value in args if isinstance(value, PageKey)), None)
        with self.lock:
            self.settings = settings
            conversation = self.conversation
            joining = self.calls is not None and key is not None and self.key is None and self.refused is None
            if joining:
                self.key = key
        if joining and not self.hung_up.is_set():
            self.join(key)
        elif conversation is not None:
            conversation.post("settings", settings)

    # -- audio in -----------------------------------------------------------------------------------

    def receive(self, frame) -> None:
        with self.lock:
            conversation = None if self.parked else self.conversation
        if conversation is None:
            return
        rate, samples = frame
        started = time.perf_counter()
        events = self.turns.feed(to_16k(rate, samples))
        metrics.AUDIO.observe(time.perf_counter() - started)
        if np.size(samples) and started - self.alive_at >= ALIVE_EVERY_S:  # audio arrives: not idle
            self.alive_at = started
            conversation.post("alive")
        for event in events:
            logger.debug("%s: turn event %s", self.transport_name, event.kind)
            if event.kind == "end":
                self.send_message_sync(create_message("log", "pause_detected"))
            conversation.post(event.kind, event)

    # -- replies out --------------------------------------------------------------------------------

    def emit(self):
        if not self.rendered:
            self.rendered.extend(self.next_outputs())
            if not self.rendered:
                return None
        item = self.rendered.popleft()
        if isinstance(item, CloseStream | tuple):  # a tuple: the rest of a phone reply's audio, a piece
            return item
        if item == HUSH:
            logger.debug("%s: hush", self.transport_name)
            self.stop_speaking()
            return None
        if item == CLOSED:
            return self.close_stream("the conversation has ended")
        return self.to_fastrtc(item)

    def next_outputs(self) -> list:
        """What to send next: the connection's own news (refused or ended by the server, out of
        time, the peer gone, the conversation joined), else what the view makes of the
        conversation's next event."""
        with self.lock:
            conversation, key, parked = self.conversation, self.key, self.parked
            refused, self.refused = self.refused, None
        if refused:  # a refused (or ended) connection is closed at once, saying why in the chat
            return [self.view.ended(refused), self.close_stream(refused)]
        if conversation is None or parked:
            time.sleep(EMIT_WAIT_S)  # not started yet (or over): fastrtc calls emit in a loop
            return []
        if self.out_of_time():
            self.time_is_up = True
            logger.info("%s: the call reached its time limit", self.transport_name)
            message = time_limit_message(self.time_limit_s)
            return [self.view.ended(message), self.close_stream(message)]
        elif self.peer_gone():  # don't wait ~30 s for ICE consent to notice: free the slot now
            if self.calls is not None and key is not None:  # a page's may come back on a new connection
                logger.info("%s: no audio for %.0f s; the page's conversation waits for it", self.transport_name,
                            PEER_SILENT_S)
                self.park()
                return [CloseStream("the connection was lost")]
            logger.info("%s: no audio for %.0f s; closing the conversation", self.transport_name, PEER_SILENT_S)
            conversation.close()
            with self.lock:  # once: emit() runs again (every EMIT_WAIT_S) until the conversation has closed
                self.last_frame = None
        elif not self.greeted and self.calls is not None:  # the conversation it joined, and that it listens
            self.greeted = True
            return [self.view.output({}, state="listening")]
        with self.reading:
            if self.parked:
                time.sleep(EMIT_WAIT_S)
                return []
            try:
                event = conversation.outbox.get(timeout=EMIT_WAIT_S)
            except queue.Empty:
                return []
            if isinstance(event, StateChanged) and self.calls is None:
                return []  # the page shows the voice loop's state; `/outputs` readers get the chat only
            return self.view.render(event)

    def close_stream(self, message: str) -> CloseStream:
        """The end of the stream; on the page, whose chat already says why, without fastrtc's toast
        repeating it."""
        return CloseStream("" if self.calls is not None else message)

    def out_of_time(self) -> bool:
        with self.lock:
            started = self.started_at
        return (self.time_limit_s is not None and started is not None and not self.time_is_up
                and self.clock() - started >= self.time_limit_s)

    def peer_gone(self) -> bool:
        if self.transport_name != "webrtc":  # sockets have their own media deadline (sockets.py)
            return False
        with self.lock:
            last = self.last_frame
        return last is not None and self.clock() - last > PEER_SILENT_S

    def to_fastrtc(self, output: Output):
        if self.transport_name == "webrtc" and self.channel is not None and self.channel.readyState != "open":
            return None  # the page has gone: fastrtc would tell it on the closed data channel (InvalidStateError)
        outputs = AdditionalOutputs(output.history, output.status, output.final, output.state)
        if output.final:
            self.send_message_sync(create_message("log", "response_starting"))
        if output.audio is None:
            return outputs
        rate, samples = output.audio
        if self.phone_mode:
            if rate != PHONE_RATE:  # here, not in fastrtc's librosa call on the event loop
                samples, rate = soxr.resample(samples, rate, PHONE_RATE).astype(np.float32), PHONE_RATE
            step = int(PHONE_PIECE_S * PHONE_RATE)
            pieces = [samples[i:i + step] for i in range(0, len(samples), step)] or [samples]
            # the rest go next, before anything rendered after this output; a hush clears what fastrtc has queued
            self.rendered.extendleft((rate, piece) for piece in reversed(pieces[1:]))
            samples = pieces[0]
        return (rate, samples), outputs

    def stop_speaking(self) -> None:
        if self.clear_queue is not None:  # fastrtc's playback queue, once the connection has one
            self.clear_queue()
        if self.phone_mode:
            compat.tell_twilio_to_clear(self)
