"""Every VAD, offline and streaming: speech is found where the speech is, silence stays silent."""

import sys

import numpy as np
import pytest
from conftest import espeak

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.audio.vad import (
    KINDS,
    WINDOW,
    SileroPauseModel,
    SpeechDetector,
    VadOptions,
    detector,
)


@pytest.mark.parametrize("kind", KINDS)
def test_each_vad_streams_one_probability_per_window_where_the_speech_is(kind, speech):
    """1 s of silence, 3 s of real speech, 1 s of silence, fed in odd-sized pieces."""
    sentence = espeak("Please tell me a short joke about computers")
    quiet = np.zeros(SAMPLE_RATE, np.float32)
    for talk in (speech[: 3 * SAMPLE_RATE], sentence):
        audio = np.concatenate([quiet, talk, quiet])
        vad = detector(VadOptions(kind=kind))
        probs = np.concatenate([vad.probabilities(piece) for piece in np.array_split(audio, 37)])
        assert len(probs) == len(audio) // WINDOW and probs.dtype == np.float32
        assert ((0 <= probs) & (probs <= 1)).all()
        start, end = SAMPLE_RATE // WINDOW, (SAMPLE_RATE + len(talk)) // WINDOW
        assert probs[: start - 1].max() < 0.2  # silence before
        assert (probs[start + 3: end - 3] > 0.5).mean() > 0.6  # most of the speech (words have gaps)
        assert probs[end + 8:].max() < 0.2  # silence after (WebRTC's VAD hangs on ~100 ms)


def test_energy_vad_adapts_to_steady_noise():
    """Steady noise is speech to the energy VAD only until its floor (the last floor_s) catches up."""
    options = VadOptions(kind="energy")
    noise = np.random.default_rng(0).normal(0, 0.02, 6 * SAMPLE_RATE).astype(np.float32)
    probs = detector(options).probabilities(np.concatenate([np.zeros(SAMPLE_RATE, np.float32), noise]))
    settled = int((1 + options.floor_s + 0.2) * SAMPLE_RATE) // WINDOW
    assert probs[SAMPLE_RATE // WINDOW + 2] > 0.5 and probs[settled:].max() < 0.5


def test_webrtc_aggressiveness_is_checked():
    with pytest.raises(ValueError, match="0-3"):
        detector(VadOptions(kind="webrtc", aggressiveness=4))
    with pytest.raises(ValueError, match="unknown VAD"):
        detector(VadOptions(kind="nope"))


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
