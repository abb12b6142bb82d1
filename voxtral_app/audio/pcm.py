"""Audio in: whatever a browser, a phone or an upload sends, turned into what Voxtral hears.

Voxtral's feature extractor wants mono float32 at 16 kHz. Clients send int16 or float, mono or
stereo, at 8-48 kHz, sometimes with NaNs, clipping, silence or no samples at all; each of those
gets a clear `AudioError` or a logged repair here, never a crash further down.
"""

import io
import logging

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Hz, Voxtral's (Whisper's) input rate
MIN_RATE = 8_000  # Hz, telephone audio
MAX_RATE = 48_000  # Hz, WebRTC's Opus
SILENCE_PEAK = 1e-3  # full scale; quieter than -60 dBFS everywhere is treated as silence


class AudioError(ValueError):
    """Audio that cannot be used for a turn; the message is meant for the user."""


def to_float(samples: np.ndarray) -> np.ndarray:
    """Any integer or float PCM array -> float32 in [-1, 1] (same shape)."""
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    if samples.dtype == np.int32:
        return (samples / 2147483648.0).astype(np.float32)
    if samples.dtype == np.uint8:
        return (samples.astype(np.float32) - 128.0) / 128.0
    if samples.dtype in (np.float32, np.float64, np.float16):
        return samples.astype(np.float32, copy=False)
    raise AudioError(f"unsupported audio sample type {samples.dtype}; send int16 or float32 PCM")


def to_mono(samples: np.ndarray) -> np.ndarray:
    """[N], [1, N], [N, C] or [C, N] -> [N], averaging channels."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise AudioError(f"audio must be 1-D or 2-D (channels x samples), got shape {samples.shape}")
    channels_first = samples.shape[0] < samples.shape[1]  # a few channels, many samples
    return samples.mean(axis=0 if channels_first else 1)


def prepare(rate: int, samples: np.ndarray, max_seconds: float) -> np.ndarray:
    """(rate, PCM array) from any client -> mono float32 at 16 kHz, at most `max_seconds` long.

    Raises AudioError for empty, silent or unusable input. NaN/inf samples become 0 and
    out-of-range floats are clipped (logged); over-long speech keeps its last `max_seconds`.
    """
    samples = np.asarray(samples)
    if samples.size == 0:
        raise AudioError("no audio was received")
    if not MIN_RATE <= int(rate) <= MAX_RATE:
        raise AudioError(f"sample rate {rate} Hz is not supported; send {MIN_RATE}-{MAX_RATE} Hz audio")
    audio = to_mono(to_float(samples))
    bad = ~np.isfinite(audio)
    if bad.any():
        logger.warning("replacing %d NaN/inf samples with silence", int(bad.sum()))
        audio = np.where(bad, 0.0, audio).astype(np.float32)
    if np.abs(audio).max() > 1.0:
        logger.warning("clipping audio outside [-1, 1] (peak %.2f)", float(np.abs(audio).max()))
        audio = np.clip(audio, -1.0, 1.0)
    if int(rate) != SAMPLE_RATE:
        audio = soxr.resample(audio, int(rate), SAMPLE_RATE).astype(np.float32)
    if np.abs(audio).max(initial=0.0) < SILENCE_PEAK:
        raise AudioError("the audio is silent; check the microphone")
    max_samples = int(max_seconds * SAMPLE_RATE)
    if len(audio) > max_samples:
        logger.warning("audio of %.1f s is over the %.0f s cap; keeping the last %.0f s",
                       len(audio) / SAMPLE_RATE, max_seconds, max_seconds)
        audio = audio[-max_samples:]
    return np.ascontiguousarray(audio, dtype=np.float32)


MAX_CHANNELS = 8  # channels a decoded file may have (7.1); more is refused before decoding
BLOCK_FRAMES = 1_048_576  # frames decoded at a time (~22 s at 48 kHz): memory stays ~ the mono result's


def check_header(source, max_seconds: float):
    """soundfile's info for a sound file (path or file object), or AudioError when its header says it
    is over `max_seconds`, has more than `MAX_CHANNELS` or an unusable rate: read before decoding any of it."""
    try:
        info = sf.info(source)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"not a sound file soundfile can read ({error})") from None
    if hasattr(source, "seek"):
        source.seek(0)
    if not 1 <= info.channels <= MAX_CHANNELS:
        raise AudioError(f"the audio has {info.channels} channels; send at most {MAX_CHANNELS}")
    if not MIN_RATE <= info.samplerate <= MAX_RATE:
        raise AudioError(f"sample rate {info.samplerate} Hz is not supported; send {MIN_RATE}-{MAX_RATE} Hz audio")
    if info.frames > max_seconds * info.samplerate:
        raise AudioError(f"the audio is {info.frames / info.samplerate:.0f} s long; the limit is {max_seconds:.0f} s")
    return info


def decode_file(source, max_seconds: float) -> np.ndarray:
    """A sound file (path or file object) -> mono float32 at 16 kHz: refused from its header
    (`check_header`), then decoded, downmixed and resampled in blocks, so a small compressed file
    cannot blow up in memory."""
    info = check_header(source, max_seconds)
    stream = soxr.ResampleStream(info.samplerate, SAMPLE_RATE, 1, dtype="float32")
    pieces = []
    with sf.SoundFile(source) as audio:
        read = 0
        while read <= max_seconds * info.samplerate:  # the header may understate the length: stop anyway
            block = audio.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
            read += len(block)
            last = len(block) < BLOCK_FRAMES
            mono = np.nan_to_num(block.mean(axis=1), nan=0.0, posinf=0.0, neginf=0.0)
            pieces.append(stream.resample_chunk(mono, last=last))
            if last:
                break
        else:
            raise AudioError(f"the audio is over the {max_seconds:.0f} s limit")
    return prepare(SAMPLE_RATE, np.concatenate(pieces), max_seconds)


def wav_bytes(audio: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """Float32 samples -> a lossless (32-bit float) WAV file in memory."""
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def wav_samples(data: bytes) -> np.ndarray:
    """A WAV file this app wrote (`wav_bytes`, or 16-bit mono at 16 kHz) -> float32 samples."""
    samples, _ = sf.read(io.BytesIO(data), dtype="float32")
    return samples


def read_wav(path: str) -> tuple[int, np.ndarray]:
    """A sound file -> (rate, float32 samples [N] or [N, C])."""
    samples, rate = sf.read(path, dtype="float32")
    return rate, samples
