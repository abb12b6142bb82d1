"""Silero VAD from the silero-vad package, offline: speech is found where the speech is."""

import sys

import numpy as np

from voxtral_app.audio import SAMPLE_RATE
from voxtral_app.vad import WINDOW, SileroPauseModel, SpeechDetector


def test_streaming_detector_finds_speech_and_silence(speech):
    audio = np.concatenate([np.zeros(SAMPLE_RATE, np.float32), speech[: 3 * SAMPLE_RATE]])
    detector = SpeechDetector()
    probs = np.concatenate([detector.probabilities(piece) for piece in np.array_split(audio, 37)])  # odd sizes
    assert len(probs) == len(audio) // WINDOW
    silence, talk = probs[: SAMPLE_RATE // WINDOW - 2], probs[SAMPLE_RATE // WINDOW + 5:]
    assert silence.max() < 0.2
    assert (talk > 0.5).mean() > 0.5


def test_streaming_equals_one_pass(speech):
    clip = speech[: 2 * SAMPLE_RATE]
    whole = SpeechDetector().probabilities(clip)
    detector = SpeechDetector()
    parts = np.concatenate([detector.probabilities(p) for p in np.array_split(clip, 11)])
    assert np.allclose(whole, parts, atol=1e-5)


def test_pause_model_for_fastrtc(speech):
    model = SileroPauseModel()
    model.warmup()
    int16 = (speech[: 2 * SAMPLE_RATE] * 32767).astype(np.int16)[None]  # fastrtc's (1, N) int16 at 48 kHz
    seconds, chunks = model.vad((48_000, np.repeat(int16, 3, axis=1)), None)
    assert 0.5 < seconds <= 2.0 and chunks
    assert model.vad((SAMPLE_RATE, np.zeros((1, SAMPLE_RATE), np.int16)), None)[0] == 0.0


def test_vad_does_not_import_silero_vad():
    """`import silero_vad` would pin torch to one thread for the whole process."""
    SpeechDetector()
    assert "silero_vad" not in sys.modules
