import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no DNS lookups from gradio
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub

import glob
import re
import threading
import wave

import numpy as np
import pytest
from servers import BackgroundServer

from voxtral_app.audio.pcm import SAMPLE_RATE, prepare, read_wav
from voxtral_app.model import checkpoint, loading
from voxtral_app.model import prompt as prompts
from voxtral_app.model.chat import Chat
from voxtral_app.model.engine import EngineOptions
from voxtral_app.model.loading import load_engine

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # committed audio (data/README.md)
SPEECH_WAV = os.path.join(DATA, "fastrtc-test_file.wav")  # ~ a spoken sentence
GRADIO_WAVS = sorted(glob.glob(os.path.join(DATA, "gradio-*.wav")))


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """`--model tiny-random` (app.py in a subprocess too) builds its checkpoint in this run's tmp dir, not ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(loading.CACHE_DIR_ENV, str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(model_cache) -> str:
    """A tiny random Voxtral and a real Tekken tokenizer, saved as a checkpoint directory: `--model tiny-random`'s."""
    return loading.checkpoint_path(checkpoint.TINY)


TRANSCRIPT_TOKENS = 128  # the random model never ends a transcript: the app's 1024 tokens of it took seconds each


def serving(checkpoint_dir: str, slots: int, max_tokens: int):
    """The tiny checkpoint loaded through the same code users hit (CPU, eager), closed afterwards."""
    engine = load_engine(EngineOptions(model=checkpoint_dir, device="cpu", slots=slots, max_tokens=max_tokens,
                                       transcript_tokens=TRANSCRIPT_TOKENS))
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


def app_options(engine, **values):
    """The ConversationOptions app.py builds for `engine` with no flags (its turn-taking: Smart Turn is off
    next to a CPU model, as here), with `values` replaced: what a served test talks to. Captions are off
    unless a test asks for them: each would add a transcript of the tiny model's 128 tokens to every turn."""
    from dataclasses import replace

    import app

    return replace(app.conversation_options(app.parse_args([], environ={}), engine), **({"captions": False} | values))


@pytest.fixture(scope="session")
def live_server(app_engine):
    from voxtral_app.conversation.speech import VoiceOptions, load_speaker
    from voxtral_app.serving.app import create_app

    options = app_options(app_engine, reply_tokens=48)  # short replies keep the tests quick
    server = BackgroundServer(create_app(app_engine, options, speaker=load_speaker(VoiceOptions(engine="espeak"))))
    yield server
    server.stop()


def espeak(text: str, voice: str = "en-us") -> np.ndarray:
    """The committed espeak-ng recording of `text` (data/make_fixtures.py), float32 16 kHz, the en-us phrases with
    their silence at either end trimmed. Read, never synthesised: espeak-ng versions differ, and models hear it."""
    name = re.sub(r"[^a-z0-9]+", "-", f"{voice} {text}".lower()).strip("-")  # as make_fixtures.py names it
    path = os.path.join(DATA, name + ".wav")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no fixture {path} for {text!r} ({voice}): add the phrase to PHRASES in "
                                "tests/data/make_fixtures.py, run it, and commit the WAV it writes")
    rate, samples = read_wav(path)
    return prepare(rate, samples, max_seconds=300)


class SlotShadow:
    """What each slot physically holds, rebuilt from the replies as they start and settle,
    independent of the Chat's own booking."""

    def __init__(self):
        self.slots: dict[int, list[int]] = {}
        self.checked = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def launched(self, reply) -> None:
        """The reply's whole prompt must continue exactly what the slot holds up to its start."""
        g = reply.generation
        with self.lock:
            held = self.slots.get(g.slot, [])
            if g.start > len(held) or held[:g.start] != reply.prompt_ids[:g.start]:
                self.errors.append(f"slot {g.slot}: the kept prefix is not what the slot holds")
            self.checked += 1

    def finished(self, reply) -> None:
        g = reply.generation
        with self.lock:
            self.slots[g.slot] = reply.prompt_ids[:g.start + g.filled] + g.fed if g.error is None else []


@pytest.fixture
def shadowed(engine, monkeypatch):
    """Every reply a Chat launches is checked against the slot shadow when it starts and settles."""
    shadow = SlotShadow()
    launch, settle = Chat.launch, Chat.settle

    def launched(chat, prompt, sampling, record, started, **kwargs):
        reply = launch(chat, prompt, sampling, record, started, **kwargs)
        shadow.launched(reply)
        if record and prompt.ids != prompts.chat_prompt(engine.processor, chat.messages).ids:
            shadow.errors.append("the incremental prompt differs from a re-encode of the messages")
        return reply

    def settled(chat, cancel=False):
        reply = chat.current
        settle(chat, cancel)
        if reply is not None:
            shadow.finished(reply)

    monkeypatch.setattr(Chat, "launch", launched)
    monkeypatch.setattr(Chat, "settle", settled)
    return shadow


def write_wav(path, audio: np.ndarray) -> str:
    """16 kHz float samples -> a 16-bit mono WAV file at `path` (what a person would upload)."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return str(path)
