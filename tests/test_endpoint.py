"""Smart Turn v3.2's end-of-turn decisions, on espeak-ng sentences and a real recording.

espeak-ng's flat, sentence-final prosody fools the model often: "I would like to order a" scores as
finished (~0.85) just like the full sentence. The espeak pair here is one it separates clearly (a
trailing "and then," is read with a continuation tone); the real recording shows what it is for.
"""

import numpy as np
import pytest
from conftest import espeak

from voxtral_app.audio import SAMPLE_RATE
from voxtral_app.endpoint import INPUT_SAMPLES, EndOfTurnOptions, features, shared_model

TRAILING_S = 0.1  # the model is asked after a short pause, as turn-taking asks it


def ask(audio):
    return shared_model().probability(np.concatenate([audio, np.zeros(int(TRAILING_S * SAMPLE_RATE), np.float32)]))


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


def test_complete_and_incomplete_espeak_sentences():
    threshold = EndOfTurnOptions.threshold
    assert ask(espeak("I would like to order a pizza.")) > threshold
    assert ask(espeak("So I went to the store and then,")) < threshold


def test_its_answer_swings_with_the_silence_after_the_speech():
    """Why turn-taking gives it at least EndOfTurnOptions.tail_s of silence: a finished sentence
    followed by 32 ms of silence reads as unfinished, with 0.2 s as finished."""
    sentence = espeak("What is the weather going to be like this weekend")
    model = shared_model()

    def after(seconds):
        return model.probability(np.concatenate([sentence, np.zeros(int(seconds * SAMPLE_RATE), np.float32)]))

    assert after(0.032) < EndOfTurnOptions.threshold < after(EndOfTurnOptions.tail_s)


def test_real_speech_mid_sentence_and_at_its_end(speech):
    """In the recording, 1.67 s and 3.26 s are short gaps between words; 4.64 s ends a sentence."""
    for mid in (1.67, 3.26):
        assert ask(speech[: int(mid * SAMPLE_RATE)]) < 0.2
    assert ask(speech[: int(4.64 * SAMPLE_RATE)]) > 0.8
    assert ask(speech) > 0.8  # the end of the recording


def test_decisions_run_off_the_calling_thread(speech):
    future = shared_model().check(speech[: 2 * SAMPLE_RATE])
    assert 0.0 <= future.result(timeout=30) <= 1.0


@pytest.mark.parametrize("seconds", [0.1, 12.0])
def test_short_and_long_audio(seconds):
    audio = np.random.default_rng(0).normal(0, 0.01, int(seconds * SAMPLE_RATE)).astype(np.float32)
    assert 0.0 <= shared_model().probability(audio) <= 1.0
