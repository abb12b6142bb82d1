"""What the OpenAI-compatible hop costs: a turn on the local engine vs through `--backend openai`.

    python bench/backend.py            # tiny random Voxtral on this machine, about a minute
    python bench/backend.py --turns 10

Both paths run the same model on the same engine in this process: "local" calls the engine
directly; "openai backend" is remote.OpenAIBackend streaming from this app's own
/v1/chat/completions on 127.0.0.1 (uvicorn, JSON, SSE, the 16-bit WAV upload and its decoding).
So the difference is the HTTP/streaming overhead, not the model. Prints one markdown table:
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
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # servers.py

from fastapi import FastAPI  # noqa: E402

from servers import BackgroundServer  # noqa: E402  (tests/servers.py)
from voxtral_app import checkpoint  # noqa: E402
from voxtral_app.audio import SAMPLE_RATE, prepare, read_wav  # noqa: E402
from voxtral_app.engine import EngineOptions, Sampling  # noqa: E402
from voxtral_app.loading import load_engine  # noqa: E402
from voxtral_app.openai_api import add_openai_routes  # noqa: E402
from voxtral_app.remote import OpenAIBackend, RemoteOptions  # noqa: E402

CLIP_S = 5  # seconds of speech per turn
REPLY_TOKENS = 64
SAMPLING = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=REPLY_TOKENS)  # sampled: no early end of sequence
HISTORY_TURNS = 3  # turns before the measured one in the conversation row


def speech() -> np.ndarray:
    package = os.path.dirname(importlib.util.find_spec("fastrtc").origin)
    audio = prepare(*read_wav(os.path.join(package, "speech_to_text", "test_file.wav")), max_seconds=300)
    return audio[: CLIP_S * SAMPLE_RATE]


def timed_turn(chat, audio: np.ndarray) -> tuple[float, float, int]:
    """One turn -> (seconds to the first piece, decode tokens/s, tokens)."""
    started = time.perf_counter()
    reply = chat.start(audio, sampling=SAMPLING)
    first = None
    while (piece := reply.next_piece(timeout=60)) is not None:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    tokens = reply.stats["tokens"]
    return first - started, (tokens - 1) / (end - first) if tokens > 1 else 0.0, tokens


def measure(backend, audio: np.ndarray, turns: int, history: int) -> tuple[float, float, int]:
    """Medians over `turns` conversations of the turn after `history` earlier turns."""
    firsts, rates, tokens = [], [], []
    for _ in range(turns):
        chat = backend.open_chat()
        try:
            for _ in range(history):
                timed_turn(chat, audio)
            first, rate, count = timed_turn(chat, audio)
        finally:
            chat.close()
        firsts.append(first)
        rates.append(rate)
        tokens.append(count)
    return statistics.median(firsts), statistics.median(rates), int(statistics.median(tokens))


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
    engine = load_engine(EngineOptions(model=path, device="cpu", slots=2, max_tokens=4096))
    app = FastAPI()
    add_openai_routes(app, engine)
    server = BackgroundServer(app)
    remote = OpenAIBackend(RemoteOptions(url=server.url, slots=2)).connect()
    audio = speech()
    rows = []
    try:
        for name, backend in (("local engine", engine), ("openai backend -> our /v1, 127.0.0.1", remote)):
            measure(backend, audio, 1, 0)  # untimed: first-request costs
            rows.append((name, measure(backend, audio, args.turns, 0), measure(backend, audio, args.turns,
                                                                             HISTORY_TURNS)))
    finally:
        remote.close()
        server.stop()
        engine.close()
    print(f"{cpu_name()}; torch {torch.__version__} CPU float32, tiny random Voxtral, {CLIP_S} s speech turns, "
          f"{REPLY_TOKENS}-token sampled replies, median of {args.turns}\n")
    print("| path | first turn: first token | first turn: decode tok/s | turn 4: first token | turn 4: decode tok/s |")
    print("|---|---|---|---|---|")
    for name, (first, rate, _), (later, later_rate, _) in rows:
        print(f"| {name} | {first * 1000:.1f} ms | {rate:.0f} | {later * 1000:.1f} ms | {later_rate:.0f} |")


if __name__ == "__main__":
    main()
