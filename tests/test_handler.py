"""The WebRTC handler's audio intake: frames leave fastrtc's event loop at once, and are heard in order
on the connection's own thread, at 16 kHz, with a bounded backlog. A page's connections continue
the page's one conversation, and end in words."""

import logging
import queue
import threading
import time

import av
import numpy as np
import soxr
from fastrtc import CloseStream

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.conversation.conversation import Conversation, ConversationOptions
from voxtral_app.conversation.parking import Parking
from voxtral_app.serving import handler as handlers
from voxtral_app.serving.handler import VoxtralHandler
from voxtral_app.serving.page_calls import PageCalls, PageKey
from voxtral_app.serving.ui import PageConversations

FRAME = 960  # samples per 20 ms at 48 kHz, as aiortc's Opus decoder hands them


def webrtc_frames(speech: np.ndarray) -> list[av.AudioFrame]:
    """16 kHz speech as a browser's WebRTC audio arrives: 48 kHz packed stereo s16, 20 ms frames."""
    pcm = (np.clip(soxr.resample(speech, SAMPLE_RATE, 48_000), -1, 1) * 32767).astype(np.int16)
    frames = []
    for i in range(len(pcm) // FRAME):
        chunk = np.repeat(pcm[i * FRAME: (i + 1) * FRAME], 2)  # left, right, left, right...
        frame = av.AudioFrame.from_ndarray(chunk[None], format="s16", layout="stereo")
        frame.sample_rate, frame.pts = 48_000, i * FRAME
        frames.append(frame)
    return frames


def listening(handler: VoxtralHandler, gate: threading.Event | None = None) -> list:
    """Replace the handler's turn-taking with a recorder of (thread name, rate, samples)."""
    heard = []

    def receive(frame):
        if gate is not None:
            gate.wait(30)
        heard.append((threading.current_thread().name, *frame))

    handler.receive = receive
    return heard


def test_frames_are_heard_in_order_at_16k_on_the_connections_own_thread(engine, speech):
    handler = VoxtralHandler(engine).copy()
    heard = listening(handler)
    frames = webrtc_frames(speech[: 3 * SAMPLE_RATE])
    started = time.perf_counter()
    for frame in frames:
        assert tuple(handler.resample(frame)) == ()  # fastrtc gets nothing to hop to a worker thread
    queued_s = time.perf_counter() - started
    deadline = time.monotonic() + 30
    while sum(len(s.reshape(-1)) for _, _, s in heard) < len(frames) * 320 - 320 and time.monotonic() < deadline:
        time.sleep(0.01)
    handler.shutdown()
    handler.hearing.join(5)
    assert not handler.hearing.is_alive()
    assert queued_s < 0.5, f"queueing {len(frames)} frames took {queued_s:.2f} s on the event loop"
    assert {name for name, _, _ in heard} == {"voxtral-hearing-webrtc"}
    assert {rate for _, rate, _ in heard} == {SAMPLE_RATE}
    got = np.concatenate([s.reshape(-1) for _, _, s in heard]).astype(np.float32) / 32768
    sent = speech[: len(got)]
    lag = max(range(200), key=lambda k: float(np.dot(got[k:k + 8000], sent[:8000])))
    n = min(len(got) - lag, len(sent)) - 400
    assert np.corrcoef(got[lag:lag + n], sent[:n])[0, 1] > 0.95  # the same speech, mono, in order
    assert handler.dropped == 0


def test_a_stalled_hearing_thread_drops_frames_instead_of_queueing_without_end(engine, speech):
    handler = VoxtralHandler(engine).copy()
    gate = threading.Event()
    heard = listening(handler, gate)
    frames = webrtc_frames(speech[: 7 * SAMPLE_RATE])  # 350 frames, more than the 250 that may wait
    for frame in frames:
        handler.resample(frame)
    assert handler.heard.qsize() <= handlers.HEARD_FRAMES_MAX
    assert handler.dropped >= len(frames) - handlers.HEARD_FRAMES_MAX - 1
    gate.set()
    handler.shutdown()
    handler.hearing.join(10)
    assert not handler.hearing.is_alive() and heard


class Listener:
    """A conversation as emit() sees it: an outbox that stays empty, and whether it was closed."""

    def __init__(self):
        self.outbox = queue.Queue()
        self.closed = False

    def close(self):
        self.closed = True


def test_a_peer_that_stops_sending_frames_is_gone_after_peer_silent_s(engine, speech, caplog):
    """A live microphone sends frames even in silence; PEER_SILENT_S without one closes the conversation
    at the next emit(), with one log line however often emit() runs before it has closed. The handler's
    clock is moved by hand: no test waits 5 s."""
    now = [1000.0]
    handler = VoxtralHandler(engine, clock=lambda: now[0]).copy()  # fastrtc's copy keeps the clock
    listening(handler)
    handler.conversation = conversation = Listener()
    frame = webrtc_frames(speech[: SAMPLE_RATE // 50])[0]  # one 20 ms frame
    assert not handler.peer_gone() and handler.emit() is None  # no frame yet: the connection is still starting
    handler.resample(frame)
    now[0] += handlers.PEER_SILENT_S - 0.02
    assert not handler.peer_gone()
    handler.resample(frame)  # a frame of silence is a frame: the peer is there
    now[0] += handlers.PEER_SILENT_S - 0.02
    assert handler.emit() is None and not conversation.closed
    now[0] += 0.04  # PEER_SILENT_S since the last frame
    assert handler.peer_gone()
    with caplog.at_level(logging.INFO, logger=handlers.__name__):
        assert handler.emit() is None and conversation.closed
        assert handler.emit() is None and handler.emit() is None  # the conversation is still closing
    assert [r.getMessage() for r in caplog.records if "no audio" in r.getMessage()] == [
        "webrtc: no audio for 5 s; closing the conversation"]
    handler.shutdown()
    handler.hearing.join(5)
    assert not handler.hearing.is_alive()


def page_connection(page: VoxtralHandler) -> VoxtralHandler:
    """A new connection from a page (fastrtc copies the page's handler), with nowhere to send messages."""
    connection = page.copy()
    connection.send_message_sync = lambda message: None  # no data channel here
    connection.start_up()
    return connection


def controls(key: PageKey) -> list:
    return ["__webrtc_value__", key, "chat", "auto", 0.2, False]  # what the page sends: ui.build_ui's inputs


def outputs_until_quiet(connection: VoxtralHandler) -> list:
    seen = []
    while (output := connection.emit()) is not None:
        seen.append(output)
    return seen


def test_a_pages_connections_continue_its_one_conversation(engine):
    """Stop then Start (or a dropped connection) takes the page's conversation back from the parking,
    with its chat; only the page's key does, and no connection id stands in for it."""
    parking = Parking(resume_s=120)
    page = VoxtralHandler(engine, ConversationOptions(), calls=PageCalls(parking))
    key, stranger = PageKey(), PageKey()
    assert key != stranger and len(key.value) >= 32
    first = page_connection(page)
    assert first.conversation is None  # a page's connection waits for the page's key
    first.set_args(controls(key))
    conversation = first.conversation
    try:
        assert conversation is not None and first.conversation_of(key) is conversation
        assert first.conversation_of(stranger) is None and first.conversation_of(None) is None
        assert outputs_until_quiet(first)[0].args[3] == "listening"  # the page learns the state it joined
        first.shutdown()  # Stop: the conversation is parked, not closed
        assert wait_for(lambda: len(parking) == 1) and not conversation.closed.is_set()
        assert first.conversation_of(key) is None
        second = page_connection(page)
        second.set_args(controls(key))
        assert second.conversation is conversation and second.view is first.view and len(parking) == 0
        other = page_connection(page)
        other.set_args(controls(stranger))
        assert other.conversation is not None and other.conversation is not conversation
        other.shutdown()
        second.shutdown()
        assert wait_for(lambda: len(parking) == 2)
    finally:
        parking.close_all()
    assert conversation.closed.wait(10)


def test_a_page_closed_while_its_call_parks_the_conversation_frees_its_slot(engine):
    """Closing a tab ends its call and unloads its page at about the same moment. An unload that came
    after the call let go of the conversation but before it was parked found it nowhere, and the
    conversation then held its slot for --resume-s; now the parking closes it. So for a typed turn's
    reply that ends after its page has closed."""
    parking = Parking(resume_s=120)
    calls = PageCalls(parking)
    page = VoxtralHandler(engine, ConversationOptions(), calls=calls)
    pages = PageConversations(engine, page, calls)
    key = PageKey()
    pages.opened("a-page-session", key)
    connection = page_connection(page)
    connection.set_args(controls(key))
    conversation = connection.conversation
    park = calls.park

    def unloaded_first(*args):
        pages.closed("a-page-session")  # the call has let go (its conversation_of is None), not yet parked
        park(*args)

    calls.park = unloaded_first
    try:
        connection.shutdown()
        assert conversation.closed.wait(10) and len(parking) == 0
        calls.park = park
        typed = pages.take(key := PageKey())  # a typed turn between calls has the conversation out
        pages.opened("another-page-session", key)
        pages.closed("another-page-session")
        pages.park(key, typed)  # its reply done
        assert typed.closed.wait(10) and len(parking) == 0
    finally:
        parking.close_all()


def test_closed_pages_are_remembered_within_a_bound(monkeypatch):
    """A client that opens and closes pages as fast as it can does not grow the closed pages' keys without end."""
    from voxtral_app.serving import page_calls

    monkeypatch.setattr(page_calls, "GONE_MAX", 100)
    calls = PageCalls(Parking(resume_s=120))
    keys = [PageKey() for _ in range(1000)]
    for key in keys:
        calls.forget(key)
    assert len(calls.gone) == 100 and keys[-1].value in calls.gone and keys[0].value not in calls.gone


def test_a_pages_call_ends_in_words_at_its_time_limit_at_shutdown_and_when_refused(engine):
    now = [100.0]
    parking = Parking(resume_s=120)
    calls = PageCalls(parking)
    page = VoxtralHandler(engine, ConversationOptions(), calls=calls, time_limit_s=900, clock=lambda: now[0])
    connection = page_connection(page)
    connection.set_args(controls(PageKey()))
    held = []
    try:
        other = page_connection(page)
        other.set_args(controls(PageKey()))
        outputs_until_quiet(other)
        calls.end_all("The server is shutting down.")  # the app's shutdown
        assert other.emit().args[0][-1]["content"] == "⚠️ The server is shutting down."
        assert isinstance(other.emit(), CloseStream)
        other.shutdown()
        outputs_until_quiet(connection)
        now[0] += 900
        ended = connection.emit()
        assert ended.args[3] == "ended" and ended.args[0][-1] == {
            "role": "assistant", "content": "⚠️ This call reached its 15-minute limit. Press Start talking to go on: "
                                            "the conversation is kept."}
        assert isinstance(connection.emit(), CloseStream)  # fastrtc ends the call; the page keeps its chat
        connection.shutdown()
        assert wait_for(lambda: len(parking) == 2)
        while engine.free_slots:  # every slot taken: the next page is refused, in words, with the number
            held.append(Conversation(engine, ConversationOptions()).open())
        refused = page_connection(page)
        refused.set_args(controls(PageKey()))
        told = refused.emit()
        assert told.args[3] == "ended" and told.args[0] == [{"role": "assistant", "content": (
            f"⚠️ All {engine.options.slots} conversations are in use; please try again in a minute.")}]
        assert isinstance(refused.emit(), CloseStream)
        assert not calls.holders  # nobody holds the refused page's (nor the parked pages') conversation
    finally:
        for conversation in held:
            conversation.close()
        parking.close_all()


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()
