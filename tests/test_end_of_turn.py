"""Where Smart Turn's ONNX file comes from: the pipecat wheel first, else the Hugging Face cache (as a Space
gets it, with requirements.txt only), else a message that says what to install. Offline throughout: the
hub cache is a directory laid out as huggingface_hub lays it out, named by HF_HUB_CACHE."""

import os
import shutil
import subprocess
import sys

import pytest

from voxtral_app.turns import end_of_turn

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any 40 hex digits: the cache maps refs/main to it
LOOKUP = "from voxtral_app.turns.end_of_turn import model_path; print(model_path())"


def installed_model() -> str:
    path = end_of_turn.model_path()
    if not path.endswith(os.path.join("pipecat", *end_of_turn.MODEL_FILE)):
        pytest.skip("the pipecat wheel is not installed here (pip install --no-deps -r requirements-models.txt)")
    return path


def hub_cache(root, source: str) -> str:
    """A hub cache holding pipecat-ai/smart-turn-v3's model file (a copy of `source`) -> the cached file's path."""
    repo = root / ("models--" + end_of_turn.HUB_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    return str(shutil.copy(source, repo / "snapshots" / COMMIT / end_of_turn.MODEL_NAME))


def without_wheel(root) -> str:
    """A pipecat package without the model file, first on the path: as if the wheel were not installed."""
    (root / "pipecat").mkdir(parents=True)
    (root / "pipecat" / "__init__.py").write_text("")
    return str(root)


def lookup(tmp_path, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([without_wheel(tmp_path / "site"), os.getcwd()])}
    return subprocess.run([sys.executable, "-c", LOOKUP], env=env, capture_output=True, text=True, timeout=120)


def test_without_the_wheel_the_model_comes_from_the_hub_cache(tmp_path):
    cached = hub_cache(tmp_path / "hub", installed_model())
    found = lookup(tmp_path, tmp_path / "hub")
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == cached


def test_without_the_wheel_or_the_cache_offline_the_message_says_what_to_install(tmp_path):
    (tmp_path / "hub").mkdir()
    found = lookup(tmp_path, tmp_path / "hub")
    assert found.returncode != 0
    last = found.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: Smart Turn's model file is missing")
    assert "pip install --no-deps -r requirements-models.txt" in last and "--no-end-of-turn" in last
    assert end_of_turn.HUB_REPO in last


def test_the_wheel_comes_before_the_hub_cache(tmp_path, monkeypatch):
    wheel = installed_model()
    hub_cache(tmp_path / "hub", wheel)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # what HF_HUB_CACHE sets at import
    assert end_of_turn.model_path() == wheel
