"""Flat tail: what the turn after a history trim costs, trimmed at that turn or between turns.

    python bench/flat_tail.py                 # 24 turns, 4096-token cache, tiny random Voxtral
    python bench/flat_tail.py --turns 40

One conversation of 5 s spoken turns (fastrtc's test recording) on the engine alone, greedy replies
of 48 tokens. Once the conversation nears its cache, its oldest turns are dropped and the rest is
prefilled again. "At the turn" is how it was: the person's next turn waits for that re-prefill.
"Between turns" is what the app does now: `Chat.tidy()` when the person starts speaking again (here:
then 0.5 s of speech before the turn ends), so the re-prefill runs while they speak. Prints one
table: first token after the end of the turn (prompt, audio features, prefill) p50/p90/p99/max,
and the largest prefill a person waited for.
"""

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results  # noqa: E402  (bench/results.py)

from voxtral_app.audio.pcm import SAMPLE_RATE, prepare, read_wav  # noqa: E402
from voxtral_app.backends.contract import Sampling  # noqa: E402
from voxtral_app.model.engine import EngineOptions
from voxtral_app.model.loading import load_engine  # noqa: E402

SAMPLING = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=48)
SPEAKING_S = 0.5  # between `tidy()` (speech began) and the end of the turn


def clips() -> list[np.ndarray]:
    path = os.path.join(os.path.dirname(importlib.util.find_spec("fastrtc").origin), "speech_to_text", "test_file.wav")
    speech = prepare(*read_wav(path), max_seconds=300)
    return [speech[i * SAMPLE_RATE: (i + 5) * SAMPLE_RATE] for i in range(0, len(speech) // SAMPLE_RATE - 5, 5)]


def conversation(engine, turns: int, tidy: bool) -> list[dict]:
    chat = engine.open_chat()
    stats, pieces = [], clips()
    for turn in range(turns):
        if tidy:
            chat.tidy(SAMPLING)
            time.sleep(SPEAKING_S)
        reply = chat.start(pieces[turn % len(pieces)], sampling=SAMPLING)
        "".join(reply)
        stats.append(reply.stats)
    chat.close()
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=4096)
    args = parser.parse_args()
    engine = load_engine(EngineOptions(model="tiny-random", device="cpu", slots=1, max_tokens=args.max_tokens))
    rows = []
    for name, tidy in (("at the turn (before)", False), ("between turns (`tidy`, now)", True)):
        stats = conversation(engine, args.turns, tidy)
        first = np.array([s["first_token_s"] for s in stats]) * 1000
        rows.append((name, *np.percentile(first, [50, 90, 99]), first.max(), max(s["prefill_tokens"] for s in stats)))
    engine.close()
    with results.recording() as printed:
        print(f"\n{args.turns} turns of 5 s speech, {args.max_tokens}-token cache, tiny random Voxtral, CPU, "
              f"{os.cpu_count()} CPUs\n")
        print("| trim | first token p50 / p90 / p99 / max (ms) | largest prefill waited for (tokens) |")
        print("|---|---|---|")
        for name, p50, p90, p99, worst, prefill in rows:
            print(f"| {name} | {p50:.0f} / {p90:.0f} / {p99:.0f} / {worst:.0f} | {prefill} |")
    results.write("flat-tail", printed.text, {"rows": rows})


if __name__ == "__main__":
    main()
