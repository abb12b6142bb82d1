"""The engine shared fairly (issue 29): a client's long prompt does not hold up another's short one."""

import threading

from voxtral_app.backends.contract import Sampling
from voxtral_app.model.engine import EngineOptions
from voxtral_app.model.loading import load_engine

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=4)


def test_prompts_waited_for_take_turns_piece_by_piece(tiny_checkpoint, speech):
    """A long prompt (a /v1 flood's) is prefilled in pieces; a short one that arrives meanwhile gets
    its own piece next instead of waiting for every piece of the long one."""
    engine = load_engine(EngineOptions(model=tiny_checkpoint, device="cpu", slots=2, max_tokens=2048,
                                       prefill_chunk=32, later_chunk=32, warmup=False))
    long_chat, short_chat = engine.open_chat(), engine.open_chat()
    calls = []
    prefill = engine.decoder.prefill
    long_started, short_sent = threading.Event(), threading.Event()

    def prefilled(slot, *args, **kwargs):
        calls.append(slot)
        if slot == long_chat.slot and not long_started.is_set():
            long_started.set()
            assert short_sent.wait(30)  # the short prompt arrives while the long one's first piece runs
        return prefill(slot, *args, **kwargs)

    engine.decoder.prefill = prefilled
    try:
        long_reply = long_chat.start(speech, sampling=GREEDY)  # ~390 prompt tokens: 13 pieces of 32
        assert long_started.wait(30)
        short_reply = short_chat.start(text="Hi.", sampling=GREEDY)  # one piece
        short_sent.set()
        assert short_reply.next_piece(timeout=60) is not None and long_reply.next_piece(timeout=60) is not None
    finally:
        engine.decoder.prefill = prefill
        long_chat.close()
        short_chat.close()
        engine.close()
    long_pieces = [i for i, slot in enumerate(calls) if slot == long_chat.slot]
    assert len(long_pieces) > 10, calls
    assert calls.index(short_chat.slot) < long_pieces[2], calls  # within a piece or two of arriving


def test_a_short_prompt_goes_before_long_ones_that_came_first(tiny_checkpoint, speech):
    """Prompts that wait together start shortest first (a person's turn before a flood's long prompt),
    and a long prompt's later pieces are `later_chunk` tokens: a turn arriving meanwhile waits for one."""
    engine = load_engine(EngineOptions(model=tiny_checkpoint, device="cpu", slots=3, max_tokens=2048,
                                       prefill_chunk=64, later_chunk=16, warmup=False))
    blocker, long_chat, short_chat = engine.open_chat(), engine.open_chat(), engine.open_chat()
    calls = []
    prefill = engine.decoder.prefill
    busy, queued = threading.Event(), threading.Event()

    def prefilled(slot, ids, *args, **kwargs):
        calls.append((slot, len(ids)))
        if slot == blocker.slot and not busy.is_set():
            busy.set()
            assert queued.wait(30)  # both prompts are submitted while the decode thread is busy
        return prefill(slot, ids, *args, **kwargs)

    engine.decoder.prefill = prefilled
    try:
        blocked = blocker.start(text="Hi.", sampling=GREEDY)
        assert busy.wait(30)
        long_reply = long_chat.start(speech, sampling=GREEDY)  # ~390 prompt tokens
        short_reply = short_chat.start(text="Hello there.", sampling=GREEDY)
        queued.set()
        for reply in (blocked, long_reply, short_reply):
            assert reply.next_piece(timeout=60) is not None
    finally:
        engine.decoder.prefill = prefill
        for chat in (blocker, long_chat, short_chat):
            chat.close()
        engine.close()
    order = [slot for slot, _ in calls if slot != blocker.slot]
    assert order[0] == short_chat.slot, calls
    long_sizes = [size for slot, size in calls if slot == long_chat.slot]
    assert long_sizes[0] == 64 and set(long_sizes[1:-1]) == {16} and len(long_sizes) > 10, long_sizes
