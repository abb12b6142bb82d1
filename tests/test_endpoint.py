"""Smart Turn v3.2's end-of-turn decisions: golden scores on a real recording, far from the threshold.

Only real speech here: the model's scores of espeak-ng sentences change with espeak-ng's version (a
sentence it called finished on one machine scored 0.03 on another), and its flat prosody fools the model
("I would like to order a" scores as finished). tests/test_turn.py scripts the model instead.
"""

import threading

import numpy as np
import pytest

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.turns.end_of_turn import INPUT_SAMPLES, features, shared_model


def ask(audio, trailing_s):
    """The model's verdict on `audio` followed by `trailing_s` of silence (a short pause)."""
    return shared_model().probability(np.concatenate([audio, np.zeros(int(trailing_s * SAMPLE_RATE), np.float32)]))


def test_features_are_whispers_log_mel(speech):
    from transformers import WhisperFeatureExtractor

    clip = speech[: 5 * SAMPLE_RATE]
    padded = np.pad(clip, (INPUT_SAMPLES - len(clip), 0))  # Smart Turn pads in front
    expected = WhisperFeatureExtractor(chunk_length=8)(
        padded, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=INPUT_SAMPLES, truncation=True,
        do_normalize=True, return_tensors="np").input_features[0]
    ours = features(clip)
    assert ours.shape == (80, 800) and np.abs(ours - expected).max() < 1e-4
    assert np.array_equal(features(speech)[:, -100:], features(speech[-INPUT_SAMPLES:])[:, -100:])  # last 8 s only


@pytest.mark.parametrize("trailing_s", [0.05, 0.1])
def test_real_speech_mid_sentence_and_at_its_end(speech, trailing_s):
    """In the recording, 1.67 s and 3.26 s are short gaps between words (scored 0.01-0.1); 4.64 s ends a
    sentence (0.99), as does the recording's end."""
    for mid in (1.67, 3.26):
        assert ask(speech[: int(mid * SAMPLE_RATE)], trailing_s) < 0.2
    assert ask(speech[: int(4.64 * SAMPLE_RATE)], trailing_s) > 0.8
    assert ask(speech, trailing_s) > 0.8  # the end of the recording


def test_decisions_run_on_the_pool_and_equal_probability(speech, monkeypatch):
    model, clip = shared_model(), speech[: 2 * SAMPLE_RATE]
    probability, threads = model.probability, []

    def watched(audio):
        threads.append(threading.current_thread())
        return probability(audio)

    monkeypatch.setattr(model, "probability", watched)
    assert model.check(clip).result(timeout=30) == probability(clip)
    assert len(threads) == 1 and threads[0] is not threading.current_thread()
    assert threads[0].name.startswith("end-of-turn")


@pytest.mark.parametrize("seconds", [0.1, 12.0])
def test_short_audio_is_padded_in_front_and_long_audio_read_from_its_last_8_s(seconds):
    audio = np.random.default_rng(0).normal(0, 0.01, int(seconds * SAMPLE_RATE)).astype(np.float32)
    model = shared_model()
    exact = np.pad(audio, (INPUT_SAMPLES - len(audio), 0)) if len(audio) < INPUT_SAMPLES else audio[-INPUT_SAMPLES:]
    assert model.probability(audio) == model.probability(exact)
