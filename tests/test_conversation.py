"""The Conversation and its engine Chat under hostile timing: speculative begins, abandons,
retractions, barge-ins and clears from other threads, and a decode thread that dies."""

import os
import queue
import random
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import app_options
from servers import BackgroundServer

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.backends.contract import EngineFailed, Sampling
from voxtral_app.conversation.conversation import (
    Conversation,
    ConversationOptions,
    Settings,
)
from voxtral_app.conversation.events import (
    Closed,
    Hushed,
    ReplyDelta,
    ReplyFinished,
    ReplyRetracted,
    ReplyStarted,
    StateChanged,
    TurnFailed,
    UserTurn,
)
from voxtral_app.conversation.parking import Parking
from voxtral_app.model.engine import EngineOptions
from voxtral_app.model.loading import load_engine
from voxtral_app.serving.app import create_app
from voxtral_app.serving.chat_view import ChatView
from voxtral_app.turns.taker import TurnEvent

GREEDY = Settings(temperature=0.0)


def events_until_finished(conversation, timeout_s=60):
    """The conversation's events up to the end of a turn: its reply finished, or the turn failed."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        event = conversation.outbox.get(timeout=timeout_s)
        seen.append(event)
        if isinstance(event, (ReplyFinished, TurnFailed)):
            return seen
    raise TimeoutError("no finished reply")


def page(events, options=ConversationOptions()):
    """The events as the page shows them (serving/chat_view.py): its last chat update."""
    view = ChatView(options)
    outputs = [o for event in events for o in view.render(event) if not isinstance(o, str)]
    return outputs[-1]


def test_interleaved_turn_events_keep_the_cache_exact(engine, shadowed, speech, other_speech):
    """Random pause/continue/end/resume/speech/clear from two threads at random times; afterwards
    every launch continued exactly what its slot held, and a last greedy turn equals a fresh chat."""
    rng = random.Random(7)
    clips = [speech[: int(s * SAMPLE_RATE)] for s in (1.0, 1.5, 2.0)] + [other_speech[:SAMPLE_RATE]]
    conversation = Conversation(engine, ConversationOptions(reply_tokens=8), settings=GREEDY, name="stress").open()
    reader_stop = threading.Event()
    outputs = []

    def read():
        while not reader_stop.is_set():
            try:
                outputs.append(conversation.outbox.get(timeout=0.05))
            except queue.Empty:
                pass

    reader = threading.Thread(target=read)
    reader.start()

    def events(seed):
        local = random.Random(seed)
        for _ in range(12):
            clip = local.choice(clips)
            kind = local.choice(["pause", "pause", "continue", "end", "end", "resume", "speech", "clear"])
            event = TurnEvent(kind, clip, time.perf_counter()) if kind in ("pause", "end") else TurnEvent(kind)
            conversation.post(kind, event)
            time.sleep(local.uniform(0, 0.15))

    threads = [threading.Thread(target=events, args=(rng.random(),)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    conversation.post("end", TurnEvent("end", clips[0], time.perf_counter()))  # a last turn, shown
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(isinstance(o, ReplyFinished) and o.error is None and o.text
                                                  for o in outputs[-3:]):
        time.sleep(0.05)
    conversation.close()
    assert conversation.closed.wait(30)
    reader_stop.set()
    reader.join()
    while not conversation.outbox.empty():  # what the reader left: Closed is in the outbox before `closed` is set
        outputs.append(conversation.outbox.get_nowait())

    assert not shadowed.errors, shadowed.errors
    assert shadowed.checked >= 5
    assert isinstance(outputs[-1], Closed)
    messages = conversation.chat.messages
    roles = [m["role"] for m in messages]
    assert all(a != b for a, b in zip(roles, roles[1:])), roles  # atomic turns: user, assistant, user, ...


def test_a_turn_is_recorded_with_its_reply_or_not_at_all(engine, speech):
    chat = engine.open_chat()
    try:
        with pytest.raises(ValueError):  # a prompt over the cache: the turn is refused and not kept
            chat.start(np.tile(speech, 40)[: 200 * SAMPLE_RATE], sampling=Sampling(max_new_tokens=16))
        assert chat.messages == []
        reply = chat.start(speech, sampling=Sampling(temperature=0.0, max_new_tokens=8))
        reply.cancel()  # cancelled before anything was read: no reply, so no turn
        chat.settle()
        assert chat.messages == []
    finally:
        chat.close()


def test_barge_in_and_retraction_through_the_conversation(engine, speech):
    conversation = Conversation(engine, ConversationOptions(reply_tokens=400), settings=Settings(temperature=1.0),
                                name="barge").open()
    try:
        conversation.post("end", TurnEvent("end", speech[: 2 * SAMPLE_RATE], time.perf_counter()))
        seen = [conversation.outbox.get(timeout=60)]
        while not (isinstance(seen[-1], ReplyDelta) and seen[-1].text):
            seen.append(conversation.outbox.get(timeout=60))
        conversation.post("resume", TurnEvent("resume"))  # speech came back: take the reply back
        while not isinstance(seen[-1], ReplyRetracted):
            seen.append(conversation.outbox.get(timeout=30))
        assert any(isinstance(e, Hushed) for e in seen)
        assert seen[-1].turn == 1 and seen[-1].stats is not None  # retracted while it streamed
        assert page(seen).history == []  # the turn left the page
        conversation.post("settings", Settings())  # round trip: the worker has applied the retraction
        conversation.post("text", "hello")
        after = events_until_finished(conversation)
        assert isinstance(after[-1], ReplyFinished) and after[-1].turn == 2
        assert [(e.source, e.text) for e in after if isinstance(e, UserTurn)] == [("text", "hello")]
        assert [m["role"] for m in page(seen + after).history] == ["user", "assistant"]
    finally:
        conversation.close()
    assert conversation.closed.wait(30)
    assert [m["role"] for m in conversation.chat.messages] in (["user", "assistant"], [])


def test_the_voice_state_follows_the_loop(engine, speech):
    """listening -> hearing (speech) -> thinking (turn shown) -> speaking (first token) -> listening; speaking
    over a reply goes straight to hearing."""
    conversation = Conversation(engine, ConversationOptions(reply_tokens=400), settings=Settings(temperature=1.0),
                                name="states").open()

    def states(seen):
        return [e.state for e in seen if isinstance(e, StateChanged)]

    try:
        conversation.post("speech", TurnEvent("speech"))
        conversation.post("end", TurnEvent("end", speech[: 2 * SAMPLE_RATE], time.perf_counter()))
        seen = events_until_finished(conversation)
        seen.append(conversation.outbox.get(timeout=10))
        assert states(seen) == ["listening", "hearing", "thinking", "speaking", "listening"]
        conversation.post("end", TurnEvent("end", speech[: 2 * SAMPLE_RATE], time.perf_counter()))
        more = [conversation.outbox.get(timeout=60)]
        while not isinstance(more[-1], ReplyStarted):
            more.append(conversation.outbox.get(timeout=60))
        conversation.post("speech", TurnEvent("speech"))  # barge-in
        more += events_until_finished(conversation)
        assert states(more) == ["thinking", "speaking", "hearing"]
    finally:
        conversation.close()
    assert conversation.closed.wait(30)


class FakeConversation:
    def __init__(self):
        self.closed = threading.Event()

    def close(self):
        self.closed.set()


def test_parked_conversations_wait_for_their_credential_then_close():
    now = [0.0]
    parking = Parking(resume_s=120, limit=2, clock=lambda: now[0])
    a, b, c = FakeConversation(), FakeConversation(), FakeConversation()
    parking.park("a", a)
    parking.park("b", b)
    assert parking.take("nobody") is None
    assert parking.take("a") is a and not a.closed.is_set()
    assert parking.take("a") is None  # taken once
    parking.park("a", a)
    parking.park("c", c)  # over the limit: the oldest (b) is closed
    assert b.closed.is_set() and len(parking) == 2
    now[0] = 121.0
    assert parking.sweep() == 2 and a.closed.is_set() and c.closed.is_set()
    assert parking.take("c") is None
    off = Parking(resume_s=0)
    d = FakeConversation()
    off.park("d", d)
    assert d.closed.is_set() and off.take("d") is None


def test_a_dead_decode_thread_fails_turns_fast_and_refuses_new_ones(tiny_checkpoint, speech):
    failures = []
    engine = load_engine(EngineOptions(model=tiny_checkpoint, device="cpu", slots=2, max_tokens=1024, warmup=False),
                         on_failure=failures.append)
    try:
        conversation = Conversation(engine, ConversationOptions(reply_tokens=200), name="doomed").open()

        def explode(generation, token):
            raise SystemError("injected: the decode loop broke")

        engine.emit = explode  # escapes the per-step handling: the decode thread dies
        started = time.monotonic()
        conversation.post("end", TurnEvent("end", speech[:SAMPLE_RATE], time.perf_counter()))
        events = events_until_finished(conversation, timeout_s=20)
        assert time.monotonic() - started < 10
        assert isinstance(events[-1], ReplyFinished) and "failed" in events[-1].error
        assert "⚠️" in page(events).history[-1]["content"]  # the page says so under the reply
        assert not engine.healthy and isinstance(failures[0], SystemError)
        with pytest.raises(EngineFailed):
            engine.open_chat()
        conversation.post("text", "still there?")  # a new turn gets the error at once
        refused = events_until_finished(conversation, timeout_s=10)[-1]
        assert isinstance(refused, TurnFailed) and "failed" in refused.message
        conversation.close()
        assert conversation.closed.wait(10)
        served = BackgroundServer(create_app(engine, app_options(engine), speaker=None))
        try:
            health = httpx.get(f"{served.url}/health")
        finally:
            served.stop()
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "injected" in health.json()["error"]
    finally:
        engine.close()


def test_spoken_turns_show_as_clips_and_replies_say_their_mode(engine, speech):
    """On the page, each spoken turn is a playable 16 kHz wav in the chat (the last `clips` of them),
    each finished reply's footer names its mode, and the clips go when the conversation closes."""
    import json

    import soundfile

    options = ConversationOptions(reply_tokens=4, clips=2)
    conversation = Conversation(engine, options, settings=GREEDY, name="clips").open()
    view = ChatView(options)
    try:
        finals = []
        for seconds, settings in [(1.0, GREEDY), (1.5, Settings(mode="transcribe", language="en")), (2.0, GREEDY)]:
            conversation.post("settings", settings)
            conversation.post("audio", (SAMPLE_RATE, speech[: int(seconds * SAMPLE_RATE)]))
            events = events_until_finished(conversation)
            assert [e.source for e in events if isinstance(e, UserTurn)] == ["upload"]
            finals.append([o for e in events for o in view.render(e)][-1])
        assert [f.status["mode"] for f in finals] == ["chat", "transcribe", "chat"] and all(f.final for f in finals)
        history = finals[-1].history
        json.dumps(history)  # /outputs sends it as JSON
        turns = [m["content"] for m in history if m["role"] == "user"]
        assert turns[0] == "🎙️ 1.0 s of speech"  # past `clips`: its label only
        for turn, seconds in zip(turns[1:], (1.5, 2.0)):
            assert turn["mime_type"] == "audio/wav" and turn["alt_text"] == f"🎙️ {seconds:.1f} s of speech"
            samples, rate = soundfile.read(turn["path"], dtype="float32")
            assert rate == SAMPLE_RATE and len(samples) == int(seconds * SAMPLE_RATE)
            assert np.abs(samples - speech[: len(samples)]).max() < 1e-3  # what was said, as 16-bit PCM
        replies = [m for m in history if m["role"] == "assistant"]
        assert not any("metadata" in m for m in replies)  # nothing gradio would fold
        footers = [m["content"].rsplit("<sub>", 1)[1] for m in replies]
        assert footers[0].startswith("💬 Reply · answered ") and footers[1].startswith("📝 Transcript (en) · answered ")
        assert footers[2].startswith("💬 Reply · answered ") and "after you sent it" in footers[2]  # uploads
        clip_dir = os.path.dirname(turns[-1]["path"])
        assert len(os.listdir(clip_dir)) == 3  # up to 2 * clips files stay for outputs still on their way
    finally:
        conversation.close()
    assert conversation.closed.wait(30)
    rendered = []
    while not rendered or rendered[-1] != "closed":  # the page's marker once the Closed event is rendered
        rendered += view.render(conversation.outbox.get(timeout=10))
    assert not os.path.exists(clip_dir)
    assert not os.path.exists(clip_dir)


@pytest.mark.slow
def test_audio_keeps_a_conversation_from_idling_and_a_kept_one_waits_for_its_owner(engine):
    """Idle means no audio, turn or message: a silent live microphone ("alive") keeps the conversation, a
    conversation kept for its owner after a dropped connection ("kept") outlives the idle time, then idles."""
    options = ConversationOptions(idle_timeout_s=1.0)  # wide margins: a loaded machine may oversleep
    listening = Conversation(engine, options, name="alive").open()
    kept = Conversation(engine, options, name="kept").open()
    try:
        kept.post("kept", 6.0)
        for _ in range(25):  # 2.5 s of audio arriving, more than twice the idle time
            listening.post("alive")
            time.sleep(0.1)
        assert not listening.closed.is_set() and not kept.closed.is_set()
        assert listening.closed.wait(10) and kept.closed.wait(10)  # then silence: both idle out
    finally:
        listening.close()
        kept.close()
    for conversation in (listening, kept):  # they closed on their own: idle
        events = []
        while not conversation.outbox.empty():
            events.append(conversation.outbox.get_nowait())
        assert isinstance(events[-1], Closed) and events[-1].reason == "idle"
