"""WebRTC noise suppression and gain (webrtc-noise-gain), streaming, on espeak-ng speech (tests/data/)."""

import numpy as np
import pytest
from conftest import espeak

from voxtral_app.audio.denoise import FRAME, Cleaner, CleanOptions
from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.audio.vad import level_dbfs


@pytest.fixture(scope="module")
def sentence():
    return espeak("Please tell me a short joke about computers")


def noisy(sentence, snr_db, seed=0):
    """1 s of white noise, the sentence in the same noise at `snr_db`, 2 s more noise."""
    noise_rms = np.sqrt(np.mean(sentence ** 2)) / 10 ** (snr_db / 20)
    audio = np.random.default_rng(seed).normal(0, noise_rms, 3 * SAMPLE_RATE + len(sentence)).astype(np.float32)
    audio[SAMPLE_RATE: SAMPLE_RATE + len(sentence)] += sentence
    return audio


def clean(options, audio, pieces=97):
    cleaner = Cleaner(options)
    out = [cleaner.process(piece) for piece in np.array_split(audio, pieces)]  # odd sizes, as a client sends
    assert all(len(o) % FRAME == 0 for o in out)  # whole 10 ms frames come out
    return np.concatenate(out)


def test_noise_suppression_lowers_noise_and_keeps_speech(sentence):
    audio = noisy(sentence, snr_db=10)
    out = clean(CleanOptions(noise_reduction=True), audio)
    assert len(audio) - FRAME < len(out) <= len(audio)
    speech = slice(SAMPLE_RATE, SAMPLE_RATE + len(sentence))
    assert level_dbfs(out[-SAMPLE_RATE:]) < level_dbfs(audio[-SAMPLE_RATE:]) - 8  # the noise after the speech
    assert abs(level_dbfs(out[speech]) - level_dbfs(audio[speech])) < 3  # the speech itself


def test_auto_gain_lifts_a_quiet_speaker(sentence):
    quiet = np.concatenate([np.zeros(SAMPLE_RATE, np.float32), sentence, np.zeros(SAMPLE_RATE, np.float32)])
    quiet = quiet * (10 ** (-35 / 20) / np.sqrt(np.mean(sentence ** 2)))  # -35 dBFS while speaking
    out = clean(CleanOptions(auto_gain=True), np.tile(quiet, 2))
    second = slice(len(quiet) + SAMPLE_RATE, len(quiet) + SAMPLE_RATE + len(sentence))  # the gain has adapted
    assert level_dbfs(out[second]) > -35 + 6


def test_options_are_checked():
    assert not CleanOptions().enabled and CleanOptions(auto_gain=True).enabled
    with pytest.raises(ValueError):
        Cleaner(CleanOptions(noise_reduction=True, suppression_level=9))
