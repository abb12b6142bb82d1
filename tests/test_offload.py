"""KV rows as a cache (model/rows.py): more conversations than rows, exactly as if each kept its own.

A conversation whose rows went to host memory and came back, or were dropped and prefilled again, must
reply token for token what it would have replied had it never left its row (the tiny random Voxtral,
greedy, on the CPU), and its chat's booking must stay what the rows physically hold."""

import random
import threading
import time

import pytest

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.backends.contract import EngineBusy, Sampling
from voxtral_app.model.engine import EngineOptions
from voxtral_app.model.loading import load_engine

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=12)
TURNS = ("What was said?", "Say it again, shorter.", "And once more.")


def wait_for(condition, timeout_s=30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def tiny(checkpoint, **values):
    options = EngineOptions(model=checkpoint, device="cpu", slots=4, max_tokens=1024, warmup=False, **values)
    return load_engine(options)


class Phases:
    """What the engine told its listeners, counted (a listener runs on the decode thread)."""

    def __init__(self, engine):
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        engine.listen(self)

    def __call__(self, phase: str, seconds: float) -> None:
        with self.lock:
            self.counts[phase] = self.counts.get(phase, 0) + 1

    def __getitem__(self, phase: str) -> int:
        with self.lock:
            return self.counts.get(phase, 0)


def interleaved(engine, speech, other_speech) -> list[list[int]]:
    """Chat A's greedy reply tokens, turn by turn, while chat B speaks between A's turns."""
    a, b = engine.open_chat(), engine.open_chat()
    try:
        tokens = []
        for i, text in enumerate(TURNS):
            reply = a.start(speech if i == 0 else None, text=text, sampling=GREEDY)
            "".join(reply)
            a.settle()
            tokens.append(reply.tokens)
            "".join(b.start(other_speech if i == 0 else None, text=text, sampling=GREEDY))
            b.settle()
        return tokens
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def alone(tiny_checkpoint, speech, other_speech):
    """The reference: a row per conversation, nothing ever leaves its row."""
    engine = tiny(tiny_checkpoint)
    try:
        yield interleaved(engine, speech, other_speech)
    finally:
        engine.close()


@pytest.mark.parametrize("host_gb, moved", [(1.0, "restore"), (0.0, "reprefill")])
def test_an_offloaded_conversation_replies_as_if_it_never_left(tiny_checkpoint, speech, other_speech, alone,
                                                               host_gb, moved):
    """One row for two conversations: each turn evicts the other. Restored from host memory, or (with no
    host budget) prefilled again from its history, A says exactly what it says with a row of its own."""
    engine = tiny(tiny_checkpoint, kv_slots=1, kv_host_gb=host_gb)
    phases = Phases(engine)
    try:
        assert interleaved(engine, speech, other_speech) == alone
        assert phases[moved] >= 4  # A's turns 2, 3 and B's turns 2, 3 came back
        assert phases["offload"] >= 5
        assert phases["restore" if moved == "reprefill" else "reprefill"] == 0
        # both chats closed: the decode thread forgets their rows and copies on its next round
        assert wait_for(lambda: engine.kv_rows_in_use == 0 and engine.kept_on_host == 0)
    finally:
        engine.close()


@pytest.mark.slow
def test_offload_and_restore_through_the_model_process(tiny_checkpoint, speech, other_speech, alone):
    """With the model in its own process the host copies live there, behind the same calls."""
    engine = tiny(tiny_checkpoint, kv_slots=1, model_process=True)
    phases = Phases(engine)
    try:
        assert interleaved(engine, speech, other_speech) == alone
        assert phases["restore"] >= 4
    finally:
        engine.close()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """This module's engine (the `shadowed` fixture wraps it): 4 conversations on 2 rows, a small host budget
    (about two conversations' worth), so turns restore and re-prefill both."""
    engine = tiny(tiny_checkpoint, kv_slots=2, kv_host_gb=0.000_002)
    yield engine
    engine.close()


def test_random_turns_on_fewer_rows_keep_every_booking_exact(engine, shadowed, speech, other_speech):
    """Four conversations, random turns and cancels from four threads on two rows: every launch continues
    exactly what its conversation's rows hold (restored, re-prefilled or never moved)."""
    phases = Phases(engine)
    clips = [speech[: int(s * SAMPLE_RATE)] for s in (0.5, 1.0)] + [other_speech[:SAMPLE_RATE]]
    failures = []

    def talk(seed):
        rng = random.Random(seed)
        chat = engine.open_chat()
        try:
            for _ in range(5):
                reply = chat.start(rng.choice(clips + [None]), text=rng.choice(TURNS),
                                   sampling=Sampling(temperature=0.0, max_new_tokens=rng.choice((1, 4, 8))))
                if rng.random() < 0.3:
                    reply.cancel()
                "".join(reply)
            chat.settle()
        except Exception as error:  # noqa: BLE001 - reported by the test below
            failures.append(error)
        finally:
            chat.close()

    threads = [threading.Thread(target=talk, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert not shadowed.errors, shadowed.errors
    assert shadowed.checked >= 20
    assert phases["offload"] > 0 and phases["restore"] + phases["reprefill"] > 0


def test_turns_past_the_queue_are_refused(tiny_checkpoint, speech):
    """One row, no queue: a second turn while the first is in flight is the usual busy error. (A listener
    holds the decode thread inside the first prefill, so the first turn is surely still in flight.)"""
    engine = tiny(tiny_checkpoint, kv_slots=1, turn_queue=0)
    inside, go_on = threading.Event(), threading.Event()

    def hold(phase, seconds):
        inside.set()
        go_on.wait(30)

    engine.listen(hold)
    a, b = engine.open_chat(), engine.open_chat()
    try:
        reply = a.start(speech, sampling=GREEDY)
        assert inside.wait(30)
        with pytest.raises(EngineBusy):
            b.start(None, text="hello", sampling=GREEDY)
        assert b.messages == []  # atomic: the refused turn is not kept
        go_on.set()
        assert "".join(reply) is not None
    finally:
        go_on.set()
        a.close()
        b.close()
        engine.close()


def test_a_failed_copy_fails_one_turn_and_the_engine_goes_on(tiny_checkpoint, speech):
    """Host memory can run out: a cache copy that raises fails the turn that needed it, not the decode
    thread, and that conversation's next turn prefills its history again."""
    engine = tiny(tiny_checkpoint, kv_slots=1)
    phases = Phases(engine)
    offload = engine.decoder.offload
    calls = []

    def failing_once(row, length):
        calls.append(row)
        if len(calls) == 1:
            raise MemoryError("pinned host memory")
        return offload(row, length)

    engine.decoder.offload = failing_once
    a, b = engine.open_chat(), engine.open_chat()
    try:
        "".join(a.start(speech, text="What was said?", sampling=GREEDY))
        with pytest.raises(RuntimeError, match="pinned host memory"):
            "".join(b.start(None, text="hello", sampling=GREEDY))  # needs A's row: A's copy fails
        b.settle()
        assert b.messages == [] and engine.healthy  # atomic: the failed turn is not kept
        assert "".join(b.start(None, text="hello", sampling=GREEDY)) is not None  # the row is free now
        assert "".join(a.start(None, text="And then?", sampling=GREEDY)) is not None  # A lost its cache:
        a.settle()
        assert phases["reprefill"] == 1 and not a.current  # ...its history was prefilled again
    finally:
        a.close()
        b.close()
        engine.close()
