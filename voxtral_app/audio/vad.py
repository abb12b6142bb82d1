"""Voice activity: one streaming interface over four detectors, all offline.

Every detector takes any number of 16 kHz samples and returns one speech probability per completed
32 ms window, keeping its state (and leftover samples) across calls, so turn-taking does not care
which one runs (`detector(VadOptions)`):
- "silero" (`SpeechDetector`): the silero-vad package's bundled Silero model, run with onnxruntime;
- "webrtc" (`WebRtcDetector`): Google's WebRTC VAD (webrtcvad-wheels) on 10 ms frames, aggressiveness 0-3;
  a window's probability is the share of its frames called speech;
- "energy" (`EnergyDetector`): level above an adaptive noise floor (minimum of the last few seconds).
`SileroPauseModel` is fastrtc's PauseDetectionModel over the same model (what ReplyOnPause's
default algorithm calls once per 0.6 s chunk), so fastrtc never downloads its own VAD.
The ONNX file is loaded directly: `import silero_vad` would set torch to one thread process-wide.
"""

import importlib.util
import logging
import os
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnxruntime

from .pcm import SAMPLE_RATE, to_float, to_mono

logger = logging.getLogger(__name__)

WINDOW = 512  # samples per VAD step at 16 kHz = 32 ms
CONTEXT = 64  # samples of the previous window the model sees with each step
WINDOW_S = WINDOW / SAMPLE_RATE


def model_path() -> str:
    spec = importlib.util.find_spec("silero_vad")  # locate without importing (torch thread side effect)
    if spec is None or spec.origin is None:
        raise RuntimeError("the silero-vad package is not installed: pip install -r requirements.txt")
    return os.path.join(os.path.dirname(spec.origin), "data", "silero_vad.onnx")


_session: onnxruntime.InferenceSession | None = None


def session() -> onnxruntime.InferenceSession:
    """One shared ONNX session (thread-safe for run); each stream keeps its own state."""
    global _session
    if _session is None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # one 32 ms window is ~0.1 ms of work: threads only add overhead
        options.inter_op_num_threads = 1
        _session = onnxruntime.InferenceSession(model_path(), sess_options=options,
                                                providers=["CPUExecutionProvider"])
    return _session


class SpeechDetector:
    """Streaming Silero VAD over 16 kHz audio: state and leftover samples carry across calls."""

    def __init__(self):
        self.session = session()
        self.reset()

    def reset(self) -> None:
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)
        self.pending = np.zeros(0, dtype=np.float32)

    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        """Float32 16 kHz samples -> speech probability of each completed 32 ms window."""
        self.pending = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        count = len(self.pending) // WINDOW
        out = np.empty(count, dtype=np.float32)
        for i in range(count):
            window = self.pending[i * WINDOW:(i + 1) * WINDOW]
            x = np.concatenate([self.context, window])[None]  # [1, 576]
            prob, self.state = self.session.run(
                None, {"input": x, "state": self.state, "sr": np.array(SAMPLE_RATE, dtype=np.int64)})
            self.context = window[-CONTEXT:]
            out[i] = prob[0, 0]
        self.pending = self.pending[count * WINDOW:]
        return out


@dataclass(frozen=True)
class VadOptions:
    kind: str = "silero"  # "silero", "webrtc" or "energy"
    aggressiveness: int = 2  # WebRTC VAD: 0 (calls most things speech) .. 3 (calls the least speech)
    margin_db: float = 9.0  # energy VAD: a window this far above the noise floor is speech (p = 0.5)
    floor_s: float = 3.0  # energy VAD: the noise floor is the quietest window of this last stretch
    floor_quantile: float = 0.0  # ... or this quantile of its windows' levels (0: the quietest)
    silence_dbfs: float = -60.0  # energy VAD: quieter windows are silence whatever the floor


KINDS = ("silero", "webrtc", "energy")


def detector(options: VadOptions = VadOptions()):
    """A fresh streaming detector (one per connection): .probabilities(samples) -> one per 32 ms window."""
    if options.kind == "silero":
        return SpeechDetector()
    if options.kind == "webrtc":
        return WebRtcDetector(options.aggressiveness)
    if options.kind == "energy":
        return EnergyDetector(options)
    raise ValueError(f"unknown VAD {options.kind!r}; choose one of {', '.join(KINDS)}")


class Windowed:
    """Cuts a stream into 32 ms windows and asks `window_probability` about each."""

    def __init__(self):
        self.pending = np.zeros(0, dtype=np.float32)

    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        self.pending = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        count = len(self.pending) // WINDOW
        out = np.array([self.window_probability(self.pending[i * WINDOW:(i + 1) * WINDOW]) for i in range(count)],
                       dtype=np.float32)
        self.pending = self.pending[count * WINDOW:]
        return out

    def window_probability(self, window: np.ndarray) -> float:
        raise NotImplementedError


def to_int16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)


class WebRtcDetector(Windowed):
    """WebRTC's VAD over 10 ms frames; a 32 ms window's probability is the share of speech frames in it."""

    FRAME = SAMPLE_RATE // 100  # 160 samples = 10 ms

    def __init__(self, aggressiveness: int = 2):
        import webrtcvad

        super().__init__()
        if not 0 <= aggressiveness <= 3:
            raise ValueError(f"WebRTC VAD aggressiveness must be 0-3, got {aggressiveness}")
        self.vad = webrtcvad.Vad(aggressiveness)
        self.frames = np.zeros(0, dtype=np.int16)  # samples not yet in a whole 10 ms frame
        self.last = 0.0  # the previous window's probability (a window always completes 3 or 4 frames)

    def window_probability(self, window: np.ndarray) -> float:
        self.frames = np.concatenate([self.frames, to_int16(window)])
        count = len(self.frames) // self.FRAME
        calls = [self.vad.is_speech(self.frames[i * self.FRAME:(i + 1) * self.FRAME].tobytes(), SAMPLE_RATE)
                 for i in range(count)]
        self.frames = self.frames[count * self.FRAME:]
        self.last = float(np.mean(calls)) if calls else self.last
        return self.last


class EnergyDetector(Windowed):
    """Level above an adaptive noise floor: the quietest 32 ms window of the last `floor_s` seconds."""

    def __init__(self, options: VadOptions = VadOptions()):
        super().__init__()
        self.options = options
        self.levels: deque[float] = deque(maxlen=max(1, round(options.floor_s / WINDOW_S)))  # dBFS

    def window_probability(self, window: np.ndarray) -> float:
        level = level_dbfs(window)
        self.levels.append(level)
        if level < self.options.silence_dbfs:
            return 0.0
        q = self.options.floor_quantile
        floor = min(self.levels) if q <= 0 else float(np.quantile(np.fromiter(self.levels, float), q))
        above = level - floor - self.options.margin_db
        return float(1.0 / (1.0 + np.exp(-above / 2.0)))  # 0.5 at the margin, ~0.9 at 4 dB above it


def level_dbfs(window: np.ndarray) -> float:
    """RMS level of a stretch of float samples, dB below full scale."""
    return float(10 * np.log10(np.mean(np.square(window, dtype=np.float64)) + 1e-12))


def to_16k(rate: int, samples: np.ndarray) -> np.ndarray:
    """Frames as fastrtc hands them ((1, N) int16 at `rate`) -> float32 16 kHz mono."""
    audio = to_mono(to_float(np.asarray(samples)))
    if rate != SAMPLE_RATE:
        import soxr

        audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    return audio


@dataclass(frozen=True)
class SileroOptions:
    threshold: float = 0.5  # speech probability above which a window counts as speech


class SileroPauseModel:
    """fastrtc PauseDetectionModel: (rate, chunk) -> (seconds of speech in it, speech chunks)."""

    def vad(self, audio: tuple[int, np.ndarray], options: SileroOptions | None = None):
        rate, samples = audio
        threshold = (options or SileroOptions()).threshold
        probs = SpeechDetector().probabilities(to_16k(rate, samples))
        chunks, start = [], None
        for i, speech in enumerate(np.append(probs > threshold, False)):
            if speech and start is None:
                start = i
            elif not speech and start is not None:
                chunks.append({"start": start * WINDOW, "end": i * WINDOW})
                start = None
        return float((probs > threshold).sum() * WINDOW_S), chunks

    def warmup(self) -> None:
        self.vad((SAMPLE_RATE, np.zeros(SAMPLE_RATE, dtype=np.float32)))
