"""Whatever clients send becomes mono float32 at 16 kHz, or a clear AudioError."""

import numpy as np
import pytest

from voxtral_app.audio.pcm import SAMPLE_RATE, AudioError, prepare


def tone(rate, seconds=1.0, amplitude=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.mark.parametrize("rate", [8_000, 16_000, 24_000, 44_100, 48_000])
def test_any_rate_becomes_16_khz(rate):
    audio = prepare(rate, tone(rate), max_seconds=300)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - SAMPLE_RATE) <= 2


def test_int16_stereo_and_fastrtc_shapes():
    mono = (tone(48_000) * 32767).astype(np.int16)
    stereo = np.stack([mono, mono], axis=1)  # [N, 2]
    fastrtc = mono[None, :]  # fastrtc hands (1, N) int16
    a, b = prepare(48_000, stereo, 300), prepare(48_000, fastrtc, 300)
    assert np.allclose(a, b, atol=1e-4)
    assert 0.45 < np.abs(a).max() < 0.55


def test_nan_and_clipping_are_repaired():
    audio = tone(16_000) * 4
    audio[100:200] = np.nan
    audio[300] = np.inf
    out = prepare(16_000, audio, 300)
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
    assert (out[100:200] == 0).all()


@pytest.mark.parametrize("rate, samples, message", [
    (16_000, np.zeros(0, np.float32), "no audio"),
    (16_000, np.zeros(16_000, np.float32), "silent"),
    (16_000, np.full(16_000, np.nan, np.float32), "silent"),
    (4_000, tone(4_000), "not supported"),
    (96_000, tone(96_000), "not supported"),
    (16_000, np.zeros((2, 2, 2), np.float32), "1-D or 2-D"),
    (16_000, np.array(["a", "b"]), "sample type"),
])
def test_unusable_audio_gets_a_clear_error(rate, samples, message):
    with pytest.raises(AudioError, match=message):
        prepare(rate, samples, 300)


def test_over_long_audio_keeps_the_last_part(speech):
    audio = prepare(16_000, np.concatenate([speech] * 4), max_seconds=30)  # 83 s -> 30 s
    assert len(audio) == 30 * SAMPLE_RATE
    assert np.array_equal(audio[-len(speech):], speech)


def test_real_speech_file_reads(speech):
    assert 20 < len(speech) / SAMPLE_RATE < 21


@pytest.mark.slow  # 40 s of audio: two encoder chunks through the engine
def test_over_long_audio_through_the_engine(engine, speech):
    chat = engine.open_chat()
    try:
        five_minutes = prepare(16_000, np.tile(speech, 16), max_seconds=engine.options.max_audio_s)
        reply = chat.start(five_minutes[: 40 * SAMPLE_RATE])  # 40 s: two encoder chunks
        "".join(reply)
        assert reply.stats["prefill_tokens"] > 750
    finally:
        chat.close()
