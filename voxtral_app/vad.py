"""Voice activity: the silero-vad package's bundled Silero model, run offline with onnxruntime.

`SpeechDetector` is the streaming form: feed any number of 16 kHz samples, get one speech
probability per 32 ms window, with the model's recurrent state and context kept across calls.
`SileroPauseModel` is fastrtc's PauseDetectionModel over the same model (what ReplyOnPause's
default algorithm calls once per 0.6 s chunk), so fastrtc never downloads its own VAD.
The ONNX file is loaded directly: `import silero_vad` would set torch to one thread process-wide.
"""

import importlib.util
import logging
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime

from .audio import SAMPLE_RATE, to_float, to_mono

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
