"""The model in its own process (model_process.py): the same replies as in the app's process, and a
child that dies fails turns at once instead of hanging them."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.backends.contract import EngineFailed, Sampling
from voxtral_app.model.engine import EngineOptions
from voxtral_app.model.loading import load_engine
from voxtral_app.model.model_process import Calls, cpu_threads
from voxtral_app.model.prompt import sound

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=24)


def conversation(engine, speech: np.ndarray, other_speech: np.ndarray) -> list[tuple[str, int, int]]:
    """Two spoken turns in one conversation: (reply, prompt tokens prefilled, tokens reused from the cache)."""
    chat = engine.open_chat()
    try:
        turns = []
        for clip in (speech[: 3 * SAMPLE_RATE], other_speech[: 2 * SAMPLE_RATE]):
            reply = chat.start(clip, sampling=GREEDY)
            text = "".join(reply)
            turns.append((text, reply.stats["prefill_tokens"], reply.stats["cached_tokens"]))
        return turns
    finally:
        chat.close()


@pytest.fixture(scope="module")
def process_engine(tiny_checkpoint):
    # 32-token pieces: each prompt's audio is prefilled over many calls, from embeddings kept in the child
    engine = load_engine(EngineOptions(model=tiny_checkpoint, device="cpu", slots=2, max_tokens=2048,
                                       prefill_chunk=32, model_process=True))
    yield engine
    engine.close()


def test_the_model_process_gives_the_replies_of_the_apps_own(engine, process_engine, speech, other_speech):
    assert process_engine.model is None and process_engine.decoder.process.poll() is None
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())  # as many as the child uses: the same sums in the same order
    try:
        here = conversation(engine, speech, other_speech)
    finally:
        torch.set_num_threads(threads)
    there = conversation(process_engine, speech, other_speech)
    assert there == here
    assert there[1][2] > 0  # the second turn reused the first one's cache, in the child


def test_a_clip_crosses_as_its_sound_and_is_padded_again_in_the_child(engine, speech):
    clip = np.zeros(480_000, np.float32)  # a turn as Voxtral's prompt holds it: padded to 30 s
    clip[: 2 * SAMPLE_RATE] = speech[: 2 * SAMPLE_RATE]
    clip[SAMPLE_RATE: SAMPLE_RATE + 100] = 0.0  # silence inside the sound stays
    sent = sound(clip)
    assert len(sent) == np.flatnonzero(clip)[-1] + 1 <= 2 * SAMPLE_RATE
    assert np.array_equal(sent, clip[: len(sent)]) and len(sound(np.zeros(9, np.float32))) == 0
    calls = Calls(engine.decoder, audio_kept=2)  # the child's side, here on the app's own decoder
    key, length = calls.encode_clips([(sent, len(clip))])
    assert length == 375 and torch.equal(calls.audio[key], engine.decoder.encode_clips([clip]))


@pytest.mark.slow  # over 4 s: the fast subset stays under 2.5 min
def test_a_model_process_that_dies_fails_turns_at_once(tiny_checkpoint, speech):
    failures = []
    told = threading.Event()

    def on_failure(error):
        failures.append(error)
        told.set()

    engine = load_engine(EngineOptions(model=tiny_checkpoint, device="cpu", slots=2, max_tokens=2048,
                                       model_process=True), on_failure=on_failure)
    try:
        chat = engine.open_chat()
        reply = chat.start(speech[: 2 * SAMPLE_RATE], sampling=Sampling(max_new_tokens=1500))
        assert reply.next_piece(timeout=60) is not None  # streaming
        os.kill(engine.decoder.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert told.wait(10) and "model process exited" in str(failures[0])
        with pytest.raises(RuntimeError):
            while reply.next_piece(timeout=10) is not None:
                pass
        assert time.monotonic() - killed < 10
        assert not engine.healthy
        with pytest.raises(EngineFailed):
            engine.open_chat()
    finally:
        engine.close()
