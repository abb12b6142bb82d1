import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no DNS lookups from gradio
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub

import glob
import importlib.util

import numpy as np
import pytest

from voxtral_app import checkpoint
from voxtral_app.audio import SAMPLE_RATE, prepare, read_wav
from voxtral_app.engine import EngineOptions
from voxtral_app.loading import load_engine
from servers import BackgroundServer


def package_file(package: str, *parts: str) -> str:
    return os.path.join(os.path.dirname(importlib.util.find_spec(package).origin), *parts)


SPEECH_WAV = package_file("fastrtc", "speech_to_text", "test_file.wav")  # ~ a spoken sentence
GRADIO_WAVS = sorted(glob.glob(package_file("gradio", "media_assets", "audio", "*.wav")))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny random Voxtral and a real Tekken tokenizer, saved as a checkpoint directory."""
    return checkpoint.build_tiny(str(tmp_path_factory.mktemp("tiny-voxtral")))


def serving(checkpoint_dir: str, slots: int, max_tokens: int):
    """The tiny checkpoint loaded through the same code users hit (CPU, eager), closed afterwards."""
    engine = load_engine(EngineOptions(model=checkpoint_dir, device="cpu", slots=slots, max_tokens=max_tokens))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    yield from serving(tiny_checkpoint, slots=4, max_tokens=2048)


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """Real speech, mono float32 at 16 kHz."""
    rate, samples = read_wav(SPEECH_WAV)
    return prepare(rate, samples, max_seconds=300)


@pytest.fixture(scope="session")
def other_speech() -> np.ndarray:
    rate, samples = read_wav(GRADIO_WAVS[0])
    return prepare(rate, samples, max_seconds=300)[: 4 * SAMPLE_RATE]


@pytest.fixture(scope="session")
def app_engine(tiny_checkpoint):
    """A separate engine for the served app, so server tests never share slots with engine tests."""
    yield from serving(tiny_checkpoint, slots=3, max_tokens=4096)


@pytest.fixture(scope="session")
def live_server(app_engine):
    from voxtral_app.conversation import ConversationOptions
    from voxtral_app.server import create_app
    from voxtral_app.tts import VoiceOptions, load_speaker

    options = ConversationOptions(reply_tokens=48)  # short replies keep the tests quick
    server = BackgroundServer(create_app(app_engine, options, speaker=load_speaker(VoiceOptions(engine="espeak"))))
    yield server
    server.stop()


def espeak(text: str) -> np.ndarray:
    """espeak-ng speech, float32 16 kHz, with its leading/trailing silence trimmed."""
    import io
    import subprocess

    import soundfile as sf

    wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", text], capture_output=True, check=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    audio = prepare(rate, samples, max_seconds=300)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[loud[0]: loud[-1] + 1]
