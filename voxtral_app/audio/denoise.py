"""Noise suppression and automatic gain: WebRTC's own (webrtc-noise-gain), before the VAD and Voxtral.

`Cleaner` is one connection's streaming processor: feed float32 16 kHz samples in any sizes, get the
cleaned samples back in whole 10 ms frames (the leftover < 10 ms waits for the next call; WebRTC's
20 ms frames pass through without delay). Turn-taking runs it first, so the VAD, the end-of-turn
model and the turn's audio that reaches Voxtral all hear the same cleaned signal (its level tests, which
compare a window with the room's level, read the audio before cleaning).
"""

import logging
from dataclasses import dataclass

import numpy as np

from .pcm import SAMPLE_RATE

logger = logging.getLogger(__name__)

FRAME = SAMPLE_RATE // 100  # 160 samples = 10 ms, WebRTC's audio processing frame


@dataclass(frozen=True)
class CleanOptions:
    noise_reduction: bool = False  # WebRTC noise suppression (ENABLE_NOISE_REDUCTION / --noise-reduction)
    auto_gain: bool = False  # WebRTC automatic gain control (ENABLE_AUTO_GAIN / --auto-gain)
    suppression_level: int = 2  # WebRTC suppression 1 (mild) .. 4 (strongest)
    target_dbfs: int = 3  # AGC target: peaks this many dB below full scale (1-31)

    @property
    def enabled(self) -> bool:
        return self.noise_reduction or self.auto_gain


class Cleaner:
    """One connection's WebRTC noise suppression + gain; state (noise estimate, gain) carries across calls.

    Owned by the thread that feeds the connection's audio (fastrtc's receive thread).
    """

    def __init__(self, options: CleanOptions):
        from webrtc_noise_gain import AudioProcessor

        if not 1 <= options.suppression_level <= 4 or not 1 <= options.target_dbfs <= 31:
            raise ValueError("suppression_level must be 1-4 and target_dbfs 1-31")
        self.options = options
        self.processor = AudioProcessor(options.target_dbfs if options.auto_gain else 0,
                                        options.suppression_level if options.noise_reduction else 0)
        self.pending = np.zeros(0, dtype=np.int16)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Float32 16 kHz -> cleaned float32 16 kHz, whole 10 ms frames only."""
        pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)
        self.pending = np.concatenate([self.pending, pcm])
        count = len(self.pending) // FRAME
        out = b"".join(self.processor.Process10ms(self.pending[i * FRAME:(i + 1) * FRAME].tobytes()).audio
                       for i in range(count))
        self.pending = self.pending[count * FRAME:]
        return np.frombuffer(out, dtype=np.int16).astype(np.float32) / 32768.0
