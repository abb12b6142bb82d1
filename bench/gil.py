"""What a busy Python thread does to the decode thread, by GIL switch interval.

    python bench/gil.py

The engine's decode thread releases the GIL in every torch op and must take it back after; any
thread running Python meanwhile (in the app: the event loop, with aiortc for every connection)
holds it for up to one switch interval. This runs batch-8 decode steps of the tiny random Voxtral
(at position 3000) alone, then next to one thread that only runs Python, for several intervals,
and prints a table: ms per decode step. app.py uses 0.5 ms (`fair_gil`).

A second table: log-mel features of a 3 s turn (padded to 30 s, as each turn's prompt holds it; one
torch thread, as in the app's process) alone, then next to one, two and three such Python threads at
0.5 ms. That is why app.py's model process makes them (`Decoder.encode_clips`): alone there.
"""

import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import results  # noqa: E402  (bench/results.py)
import torch  # noqa: E402

from voxtral_app.model import prompt  # noqa: E402
from voxtral_app.model.engine import EngineOptions  # noqa: E402
from voxtral_app.model.loading import load_engine  # noqa: E402

ROWS = list(range(8))
STEPS = 20


def step_ms(decoder) -> float:
    for _ in range(3):
        decoder.step(ROWS, [5] * 8, [3000] * 8, [0.2] * 8, [0.95] * 8)
    started = time.perf_counter()
    for _ in range(STEPS):
        decoder.step(ROWS, [5] * 8, [3000] * 8, [0.2] * 8, [0.95] * 8)
    return (time.perf_counter() - started) / STEPS * 1000


def spin(stop: threading.Event) -> None:
    """Python and nothing else until `stop`: what a busy event loop looks like to the GIL."""
    total = 0
    while not stop.is_set():
        for i in range(1000):
            total += i


def log_mel_ms(extractor) -> tuple[float, float]:
    """(median, max) ms of one 3 s turn's log-mel features, over 20."""
    clip = np.zeros(prompt.CHUNK_SAMPLES, np.float32)
    clip[: 3 * 16000] = np.random.default_rng(0).normal(0, 0.1, 3 * 16000)
    times = []
    for _ in range(20):
        started = time.perf_counter()
        prompt.audio_features(extractor, [clip], "cpu")
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


def log_mel_rows(extractor) -> list[tuple[int, float, float]]:
    torch.set_num_threads(1)
    sys.setswitchinterval(0.0005)
    rows, stop, spinners = [(0, *log_mel_ms(extractor))], threading.Event(), []
    for busy in (1, 2, 3):
        spinners.append(threading.Thread(target=spin, args=(stop,), daemon=True))
        spinners[-1].start()
        rows.append((busy, *log_mel_ms(extractor)))
    stop.set()
    for spinner in spinners:
        spinner.join()
    return rows


def main() -> None:
    engine = load_engine(EngineOptions(model="tiny-random", device="cpu", warmup=False))
    rows = [("alone", "5 ms (Python's default)", step_ms(engine.decoder))]
    for interval in (0.005, 0.001, 0.0005, 0.0002):
        sys.setswitchinterval(interval)
        stop = threading.Event()

        spinner = threading.Thread(target=spin, args=(stop,), daemon=True)
        spinner.start()
        rows.append(("next to a Python thread", f"{interval * 1000:g} ms", step_ms(engine.decoder)))
        stop.set()
        spinner.join()
    mel_rows = log_mel_rows(engine.processor.feature_extractor)
    engine.close()
    with results.recording() as printed:
        print(f"\nbatch-8 decode step, tiny random Voxtral, torch {__import__('torch').__version__}, "
              f"{os.cpu_count()} CPUs\n")
        print("| decode thread | switch interval | ms per step |")
        print("|---|---|---|")
        for who, interval, ms in rows:
            print(f"| {who} | {interval} | {ms:.1f} |")
        print("\n3 s turn's log-mel features, 1 torch thread, switch interval 0.5 ms\n")
        print("| Python threads busy next to it | median ms | max ms |")
        print("|---|---|---|")
        for busy, median, top in mel_rows:
            print(f"| {busy} | {median:.1f} | {top:.1f} |")
    results.write("gil", printed.text, {"decode_step_ms": rows, "log_mel_ms": mel_rows})


if __name__ == "__main__":
    main()
