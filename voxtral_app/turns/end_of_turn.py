"""End of turn: has the person finished, or only paused? Smart Turn v3.2, a learned audio model.

Pipecat's Smart Turn v3.2 (BSD-2, 8.7 MB ONNX, a Whisper-tiny encoder and a classifier) reads the last
8 s of 16 kHz audio as Whisper log-mel features and gives the probability that the speaker is done.
The ONNX file comes from the pipecat-ai 1.14.0 wheel, installed without its dependencies
(`pip install --no-deps -r requirements-models.txt`: pipecat pins soundfile and soxr below ours); it is
located on disk and never imported, so none of pipecat's dependencies are needed. Where the wheel is
absent (a Space installs requirements.txt only), the same file comes from the Hub repo
pipecat-ai/smart-turn-v3 into the Hugging Face cache, as the Voxtral model does.

One decision costs ~100 ms of one core on a 2-core Xeon VM (the encoder over 8 s; features are ~5
ms), too long for the audio thread: `EndOfTurnModel.check()` runs it on a small shared thread pool
and returns a Future, which turn-taking starts at the first silent window and reads at the end-of-turn pause.
"""

import importlib.util
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import librosa
import numpy as np
import onnxruntime

from ..audio.pcm import SAMPLE_RATE

logger = logging.getLogger(__name__)

MODEL_NAME = "smart-turn-v3.2-cpu.onnx"
MODEL_FILE = ("audio", "turn", "smart_turn", "data", MODEL_NAME)  # inside the pipecat package
HUB_REPO = "pipecat-ai/smart-turn-v3"  # holds MODEL_NAME at its root: the fallback without the wheel
INPUT_SAMPLES = 8 * SAMPLE_RATE  # 128000 samples = 8 s: the model reads the last 8 s, zero-padded in front
N_FFT, HOP, N_MELS = 400, 160, 80  # Whisper's log-mel: 25 ms windows every 10 ms, 80 mel bands
MEL_FILTERS = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, norm="slaney").astype(np.float64)
HANN = np.hanning(N_FFT + 1)[:-1]  # periodic, as torch.hann_window


@dataclass(frozen=True)
class EndOfTurnOptions:
    enabled: bool = True  # False: every pause_s of silence ends the turn (the behaviour before the model)
    threshold: float = 0.5  # probability of "finished" that ends the turn at pause_s
    start_s: float = 0.032  # silence after which the model starts deciding: its ~0.1 s of CPU overlaps the pause
    hold_s: float = 1.0  # silence that ends a turn the model called unfinished
    recheck_s: float = 0.3  # while holding, ask the model again after this much more silence (0: never)
    wait_s: float = 0.5  # longest feed() blocks at pause_s for a decision still running (then: hold)
    workers: int = 2  # threads running decisions, shared by all connections
    tail_s: float = 0.2  # silence the model's input ends with, zeros added if the pause is shorter so far: its answer
    # swings with the tail, and pipecat asks it after its VAD's 0.2 s stop


def model_path() -> str:
    """The pipecat wheel's file, else the Hugging Face cache's copy (fetched unless HF_HUB_OFFLINE is set)."""
    spec = importlib.util.find_spec("pipecat")  # locate without importing (pipecat's dependencies are absent)
    path = os.path.join(os.path.dirname(spec.origin), *MODEL_FILE) if spec and spec.origin else ""
    if os.path.exists(path):
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(HUB_REPO, MODEL_NAME)
    except Exception as error:  # offline and not cached, no network, hub down: all end the same way
        raise RuntimeError(f"Smart Turn's model file is missing ({HUB_REPO} {MODEL_NAME} is not in the Hugging Face "
                           f"cache and could not be fetched: {type(error).__name__}): pip install --no-deps -r "
                           "requirements-models.txt (or turn the end-of-turn model off: --no-end-of-turn)") from error


def features(audio: np.ndarray) -> np.ndarray:
    """The last 8 s of float32 16 kHz audio -> Whisper log-mel [80, 800], as WhisperFeatureExtractor(chunk_length=8)
    with do_normalize=True computes it (zero padding in front, the waveform normalised before the STFT)."""
    x = audio[-INPUT_SAMPLES:].astype(np.float32)
    x = np.pad(x, (INPUT_SAMPLES - len(x), 0))
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]  # [801, 400]
    power = np.abs(np.fft.rfft(frames * HANN, axis=-1)) ** 2  # [801, 201]
    log_spec = np.log10(np.maximum(MEL_FILTERS @ power.T, 1e-10))[:, :-1]  # [80, 800]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


class EndOfTurnModel:
    """Smart Turn v3.2 on onnxruntime: one session and thread pool for the process (session.run is thread-safe)."""

    def __init__(self, options: EndOfTurnOptions = EndOfTurnOptions()):
        session_options = onnxruntime.SessionOptions()
        session_options.intra_op_num_threads = 1  # one decision per thread: connections decide in parallel
        session_options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(model_path(), sess_options=session_options,
                                                    providers=["CPUExecutionProvider"])
        self.pool = ThreadPoolExecutor(options.workers, thread_name_prefix="end-of-turn")

    def probability(self, audio: np.ndarray) -> float:
        """Float32 16 kHz audio ending now -> probability that the speaker has finished their turn."""
        (out,) = self.session.run(None, {"input_features": features(audio)[None]})  # [1, 1], a sigmoid output
        return float(out.ravel()[0])

    def check(self, audio: np.ndarray) -> Future:
        """probability(audio) on the pool: a Future of the probability."""
        return self.pool.submit(self.probability, audio)


_model: EndOfTurnModel | None = None
_loading = threading.Lock()  # connections start on several threads


def shared_model(options: EndOfTurnOptions = EndOfTurnOptions()) -> EndOfTurnModel:
    """The process's one model, loaded and warmed up on first use (~0.5 s; the first runs are twice as slow)."""
    global _model
    with _loading:
        if _model is None:
            model = EndOfTurnModel(options)
            model.probability(np.zeros(SAMPLE_RATE, dtype=np.float32))
            _model = model
    return _model
