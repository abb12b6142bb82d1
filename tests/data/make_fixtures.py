"""Regenerates the audio fixtures in tests/data/ (run from anywhere: `.venv/bin/python tests/data/make_fixtures.py`).

The tests read these files and never synthesise speech themselves: end-of-turn and VAD scores of
espeak-ng speech change between espeak-ng versions, so the speech is made once, here, and committed.
- espeak-ng phrases: 16 kHz mono int16 (tests/conftest.py `espeak()`), the speaker's with the silence at either
  end trimmed, the babble voices whole (their pauses between repeats are part of the room's sound);
- real recordings: byte-for-byte copies of the files shipped in fastrtc's and gradio's wheels (README.md).
"""

import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import soundfile as sf

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # voxtral_app, when run as a script
from voxtral_app.audio import SAMPLE_RATE, prepare  # noqa: E402

TRIM = 0.01  # full scale; quieter samples at either end of a phrase are cut
PHRASES = [  # (espeak-ng voice, text, trimmed): every phrase a test speaks
    ("en-us", "I was thinking about going to the beach tomorrow", True),
    ("en-us", "I was thinking about", True),
    ("en-us", "going to the beach tomorrow", True),
    ("en-us", "Please tell me a short joke about computers", True),
    # four other voices talking at once (tests/test_turn.py `babble()`)
    ("en-us+m3", "What is the weather going to be like this weekend", False),
    ("en+f2", "Explain how a rainbow forms in simple words", False),
    ("en-gb+m1", "Remind me to call my sister after lunch tomorrow", False),
    ("en+f4", "Which planet in our solar system has the most moons", False),
]
RECORDINGS = [  # (package, path inside it, file here)
    ("fastrtc", "speech_to_text/test_file.wav", "fastrtc-test_file.wav"),
    ("gradio", "media_assets/audio/audio_sample.wav", "gradio-audio_sample.wav"),
]


def phrase_file(text: str, voice: str = "en-us") -> str:
    """Where the phrase's fixture lives: its voice and words, lower case, joined by dashes."""
    return os.path.join(HERE, re.sub(r"[^a-z0-9]+", "-", f"{voice} {text}".lower()).strip("-") + ".wav")


def speak(text: str, voice: str, trimmed: bool) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    audio = prepare(rate, samples, max_seconds=60)
    loud = np.flatnonzero(np.abs(audio) > TRIM) if trimmed else [0, len(audio) - 1]
    return audio[loud[0]: loud[-1] + 1]


def package_file(package: str, path: str) -> str:
    return str(importlib.metadata.distribution(package).locate_file(os.path.join(package, path)))


def main() -> None:
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    print(version)
    for voice, text, trimmed in PHRASES:
        path = phrase_file(text, voice)
        sf.write(path, speak(text, voice, trimmed), SAMPLE_RATE, subtype="PCM_16")
        print(f"{os.path.basename(path)}: {os.path.getsize(path)} bytes")
    for package, inside, name in RECORDINGS:
        shutil.copyfile(package_file(package, inside), os.path.join(HERE, name))
        print(f"{name}: {package} {importlib.metadata.version(package)} {inside}")


if __name__ == "__main__":
    main()
