"""The README and the docs stay true: every app flag they name exists in `python app.py --help`, every
relative link (and its #anchor) resolves, the README stays short enough to read in five minutes, its
Python blocks compile, and its OpenAI example runs as written against a live server (the session API
example runs in tests/test_api.py)."""

import contextlib
import glob
import io
import os
import re

import pytest
import soundfile as sf
from conftest import app_options
from servers import BackgroundServer

import app
from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.serving.app import create_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README, os.path.join(ROOT, "SECURITY.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# where links are checked too: the benchmark results (written by bench/results.py) and the GPU kit's page
LINKED = PAGES + sorted(glob.glob(os.path.join(ROOT, "docs", "benchmarks", "*.md"))) + [
    os.path.join(ROOT, "bench", "gpu", "README.md")]
MAX_README_LINES = 300
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")  # may wrap onto the next line
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Commands whose flags are their own, not app.py's: a code line or span starting with one is skipped.
OTHER_COMMANDS = ("pip", ".venv/bin/pip", "python3 -m venv", "docker", "hf ", "vllm", "pytest", "uvicorn",
                  "python -m pytest", ".venv/bin/python -m pytest", "python bench/", "bench/", "git ")
OTHER_FLAGS = {"--include": "hf download's", "--no-deps": "pip's"}  # named alone in prose
IMAGE = "voxtral-realtime"  # the Docker image: flags after it go to app.py


def read(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def app_help() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        app.parse_args(["--help"], environ={})
    return out.getvalue()


def app_flags_in(command: str) -> list[str]:
    """The flags one command line (or inline span) gives app.py: those after `app.py` or the image name;
    none for another tool's command; all of them for a bare span such as `--pause-ms 128`."""
    command = command.split(" #", 1)[0].strip()  # a shell comment
    command = re.sub(r"^(\w+=\S*\s+)+", "", command)  # VAR=value before the command
    for marker in ("app.py", IMAGE + " "):
        if marker in command and not command.startswith("docker build"):
            return FLAG.findall(command[command.rindex(marker):])
    if command.startswith(OTHER_COMMANDS) or re.match(r"-[a-z]", command):  # -e, -v, -p: docker's
        return []
    return FLAG.findall(command)


def flags_mentioned(text: str) -> set[str]:
    found = set()
    for language, block in FENCE.findall(text):
        if language != "python":
            for line in block.replace("\\\n", " ").splitlines():
                found.update(app_flags_in(line))
    prose = FENCE.sub("", text)
    for span in SPAN.findall(prose):
        found.update(app_flags_in(" ".join(span.split())))
    found.update(FLAG.findall(SPAN.sub(" ", prose)))
    return found - set(OTHER_FLAGS)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    prose = FENCE.sub("", read(path))
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", prose, re.M)}


def test_the_readme_reads_in_five_minutes():
    lines = read(README).splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_app_flag_the_docs_name_is_in_app_help():
    known = set(FLAG.findall(app_help()))
    assert {"--model", "--no-end-of-turn", "--help"} <= known
    for path in PAGES:
        unknown = flags_mentioned(read(path)) - known
        assert not unknown, f"{os.path.relpath(path, ROOT)} names {sorted(unknown)}: not in `python app.py --help`"


def test_the_flag_reader_tells_app_flags_from_other_tools():
    text = ("Run `python app.py --pause-ms 96` or `--vad webrtc`; `pip install --no-deps x`.\n"
            "```bash\nOUT=x docker run --gpus all -e A=1 voxtral-realtime --max-sessions 4\n"
            "vllm serve m --enable-prefix-caching \\\n    --port 8000\n.venv/bin/python app.py --modle x  # typo\n```\n")
    assert flags_mentioned(text) == {"--pause-ms", "--vad", "--max-sessions", "--modle"}


def test_every_relative_link_resolves():
    broken = []
    for path in LINKED:
        for target in LINK.findall(FENCE.sub("", read(path))):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            where = os.path.relpath(path, ROOT)
            if not os.path.exists(resolved):
                broken.append(f"{where}: {target} (no such file)")
            elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
                broken.append(f"{where}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def python_blocks(text: str) -> list[str]:
    return [block for language, block in FENCE.findall(text) if language == "python"]


def test_the_python_in_the_readme_and_docs_compiles():
    blocks = [(path, block) for path in PAGES for block in python_blocks(read(path))]
    assert len(blocks) >= 3  # the session client, the OpenAI client, embedding in FastAPI
    for path, block in blocks:
        compile(block, os.path.relpath(path, ROOT), "exec")


def readme_block(heading: str) -> str:
    """The first python block after `heading` in the README."""
    text = read(README)
    return python_blocks(text[text.index(heading):])[0]


@pytest.fixture(scope="module")
def openai_server(app_engine):
    server = BackgroundServer(create_app(app_engine, app_options(app_engine), speaker=None))
    yield server
    server.stop()


def test_the_readme_openai_example_runs_as_written(openai_server, speech, tmp_path, capsys, monkeypatch):
    code = readme_block("### OpenAI-compatible")
    assert "http://127.0.0.1:7860" in code
    sf.write(tmp_path / "question.wav", speech[: 2 * SAMPLE_RATE], SAMPLE_RATE, subtype="PCM_16")
    monkeypatch.chdir(tmp_path)  # the example reads question.wav and talks to the app on :7860
    code = code.replace("http://127.0.0.1:7860", openai_server.url)
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.strip()  # the reply, streamed
