"""What a busy Python thread does to the decode thread, by GIL switch interval.

    python bench/gil.py

The engine's decode thread releases the GIL in every torch op and must take it back after; any
thread running Python meanwhile (in the app: the event loop, with aiortc for every connection)
holds it for up to one switch interval. This runs batch-8 decode steps of the tiny random Voxtral
(at position 3000) alone, then next to one thread that only runs Python, for several intervals,
and prints one table: ms per decode step. app.py uses 0.5 ms (`fair_gil`).
"""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from voxtral_app.engine import EngineOptions  # noqa: E402
from voxtral_app.loading import load_engine  # noqa: E402

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
    engine.close()
    print(f"\nbatch-8 decode step, tiny random Voxtral, torch {__import__('torch').__version__}, "
          f"{os.cpu_count()} CPUs\n")
    print("| decode thread | switch interval | ms per step |")
    print("|---|---|---|")
    for who, interval, ms in rows:
        print(f"| {who} | {interval} | {ms:.1f} |")


if __name__ == "__main__":
    main()
