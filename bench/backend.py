"""What the OpenAI-compatible hop costs: a turn on the local engine vs through `--backend openai`.

    python bench/backend.py            # tiny random Voxtral on this machine, about a minute
    python bench/backend.py --turns 10

Both paths run the same tiny model with the same engine options: "local" calls an engine in this
process; "openai backend" is remote.OpenAIBackend streaming from `python app.py --model tiny-random`
started in a second process on 127.0.0.1 (uvicorn, JSON, SSE, the 16-bit WAV upload and its
decoding), as a front end and a GPU box would run. So the difference is the HTTP/streaming overhead. Prints one markdown table:
time to first token (from start() to the first piece) and decode tokens/s, medians over --turns,
for a first turn and for turn 4 of a conversation (the local engine keeps the KV cache between
turns; our /v1 route keeps nothing between requests and prefills the whole history again).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import argparse
import importlib.util
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # servers.py

import httpx  # noqa: E402
import results  # noqa: E402  (bench/results.py)

from voxtral_app.audio.pcm import SAMPLE_RATE, prepare, read_wav  # noqa: E402
from voxtral_app.backends.contract import Sampling  # noqa: E402
from voxtral_app.backends.openai import OpenAIBackend, RemoteOptions  # noqa: E402
from voxtral_app.model import checkpoint  # noqa: E402
from voxtral_app.model.engine import EngineOptions
from voxtral_app.model.loading import load_engine  # noqa: E402

CLIP_S = 5  # seconds of speech per turn
REPLY_TOKENS = 64
SAMPLING = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=REPLY_TOKENS)  # sampled: no early end of sequence
HISTORY_TURNS = 3  # turns before the measured one in the conversation row
SLOTS = 2
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def start_server() -> tuple[subprocess.Popen, str]:
    """app.py on the tiny model in its own process; -> (process, URL) once /health says healthy."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "app.py", "--model", "tiny-random", "--device", "cpu", "--no-compile",
                                "--max-sessions", str(SLOTS), "--port", str(port), "--log-level", "WARNING"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).json().get("status") == "healthy":
                return process, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError("app.py did not become healthy in 10 min")


def speech() -> np.ndarray:
    package = os.path.dirname(importlib.util.find_spec("fastrtc").origin)
    audio = prepare(*read_wav(os.path.join(package, "speech_to_text", "test_file.wav")), max_seconds=300)
    return audio[: CLIP_S * SAMPLE_RATE]


def timed_turn(chat, audio: np.ndarray) -> tuple[float, float, int]:
    """One turn -> (seconds to the first piece, decode tokens/s, tokens)."""
    started = time.perf_counter()
    reply = chat.start(audio, sampling=SAMPLING)
    first = None
    while reply.next_piece(timeout=60) is not None:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    tokens = reply.stats["tokens"]
    return first - started, (tokens - 1) / (end - first) if tokens > 1 else 0.0, tokens


def conversation(backend, audio: np.ndarray, history: int) -> tuple[float, float, int]:
    """The turn after `history` earlier turns of a new conversation -> timed_turn's numbers."""
    chat = backend.open_chat()
    try:
        for _ in range(history):
            timed_turn(chat, audio)
        return timed_turn(chat, audio)
    finally:
        chat.close()


def measure(backends: dict, audio: np.ndarray, turns: int) -> dict:
    """name -> medians of (first turn, turn 4) numbers; the paths take turns, so load from other
    processes on a shared machine falls on both alike."""
    runs = {name: ([], []) for name in backends}
    for _ in range(turns):
        for name, backend in backends.items():
            runs[name][0].append(conversation(backend, audio, 0))
            runs[name][1].append(conversation(backend, audio, HISTORY_TURNS))
    return {name: [tuple(statistics.median(column) for column in zip(*rows)) for rows in pair]
            for name, pair in runs.items()}


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=5, help="conversations per row (median)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    path = checkpoint.build_tiny(os.path.join(tempfile.gettempdir(), "voxtral-bench-tiny"))
    engine = load_engine(EngineOptions(model=path, device="cpu", slots=SLOTS))  # app.py's options: same cache
    process, url = start_server()
    remote = OpenAIBackend(RemoteOptions(url=url, slots=SLOTS)).connect()
    audio = speech()
    backends = {"local engine": engine, "openai backend -> app.py's /v1 (2nd process, 127.0.0.1)": remote}
    try:
        for backend in backends.values():
            conversation(backend, audio, 0)  # untimed: first-request costs
        timings = measure(backends, audio, args.turns)
    finally:
        remote.close()
        process.terminate()
        process.wait(30)
        engine.close()
    with results.recording() as printed:
        print(f"{cpu_name()}; torch {torch.__version__} CPU float32, tiny random Voxtral, {CLIP_S} s speech turns, "
              f"{REPLY_TOKENS}-token sampled replies, median of {args.turns}\n")
        print("| path | first turn: first token | decode tok/s | turn 4: first token | decode tok/s | tokens per reply |")
        print("|---|---|---|---|---|---|")
        for name, ((first, rate, tokens), (later, later_rate, _)) in timings.items():
            print(f"| {name} | {first * 1000:.1f} ms | {rate:.0f} | {later * 1000:.1f} ms | {later_rate:.0f} | "
                  f"{tokens:.0f} |")
    results.write("backend", printed.text, {"timings": timings}, argv)


if __name__ == "__main__":
    main()
