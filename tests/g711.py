"""G.711 mu-law, Twilio's phone audio, in numpy: the tests' side of a call (the standard library's
audioop did this until Python 3.13 removed it). The same bytes as audioop.lin2ulaw / ulaw2lin."""

import numpy as np

BIAS = 0x84  # added to the magnitude, so that every segment starts at a power of two
CLIP = 8_159  # largest 14-bit magnitude coded; louder is the top code


def lin2ulaw(pcm: np.ndarray) -> bytes:
    """int16 PCM -> one mu-law byte per sample."""
    value = pcm.astype(np.int32) >> 2  # 14-bit, as the reference coder
    flip = np.where(value < 0, 0x7F, 0xFF)  # the code is sent inverted; its top bit set for positive samples
    magnitude = np.minimum(np.abs(value), CLIP) + (BIAS >> 2)
    segment = np.maximum(np.floor(np.log2(magnitude)).astype(np.int32) - 5, 0)  # 0x3F and below: segment 0
    code = np.where(segment < 8, (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F), 0x7F)
    return (code ^ flip).astype(np.uint8).tobytes()


def ulaw2lin(data: bytes) -> np.ndarray:
    """mu-law bytes -> int16 PCM."""
    code = ~np.frombuffer(data, np.uint8).astype(np.int32) & 0xFF
    magnitude = (((code & 0x0F) << 3) + BIAS) << ((code & 0x70) >> 4)
    return np.where(code & 0x80, BIAS - magnitude, magnitude - BIAS).astype(np.int16)
