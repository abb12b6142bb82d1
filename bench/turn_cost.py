"""CPU cost of turn-taking's parts, per connection: VADs, noise suppression and gain, Smart Turn.

    python bench/turn_cost.py            # ~1 min
    python bench/turn_cost.py --seconds 60 --decisions 50

Streams real speech (espeak-ng sentences in white noise at 20 dB SNR) through each part in 20 ms
frames, as WebRTC delivers it, and reads this thread's CPU time (time.thread_time). "% of a core"
is CPU seconds per second of audio: what one connection costs while it streams. Smart Turn is timed
per decision on 8 s of audio (its input size; it runs once or a few times per pause).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results  # noqa: E402  (bench/results.py)
from turn_latency import SENTENCES, espeak, machine  # noqa: E402

from voxtral_app.audio.denoise import Cleaner, CleanOptions  # noqa: E402
from voxtral_app.audio.pcm import SAMPLE_RATE  # noqa: E402
from voxtral_app.audio.vad import KINDS, VadOptions, detector  # noqa: E402
from voxtral_app.turns.end_of_turn import EndOfTurnModel, EndOfTurnOptions, features  # noqa: E402
from voxtral_app.turns.taker import TurnOptions, TurnTaker  # noqa: E402

FRAME = SAMPLE_RATE // 50  # 20 ms, a WebRTC frame


def speech(seconds: float) -> np.ndarray:
    parts, total, i = [], 0, 0
    while total < seconds * SAMPLE_RATE:
        clip = np.concatenate([espeak(SENTENCES[i % len(SENTENCES)]), np.zeros(SAMPLE_RATE // 2, np.float32)])
        parts.append(clip)
        total, i = total + len(clip), i + 1
    audio = np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]
    noise = np.random.default_rng(0).normal(0, np.sqrt(np.mean(audio ** 2)) / 10, len(audio))  # 20 dB SNR
    return (audio + noise).astype(np.float32)


def cpu_per_audio_second(process, audio: np.ndarray) -> float:
    """CPU seconds per second of audio, streaming in 20 ms frames."""
    started = time.thread_time()
    for i in range(0, len(audio), FRAME):
        process(audio[i:i + FRAME])
    return (time.thread_time() - started) / (len(audio) / SAMPLE_RATE)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="audio streamed through each part")
    parser.add_argument("--decisions", type=int, default=20, help="Smart Turn decisions timed")
    args = parser.parse_args(argv)
    with results.recording() as printed:
        data = run(args)
    results.write("turn-cost", printed.text, data, argv)


def run(args: argparse.Namespace) -> dict:
    """Time each part and print the two tables; -> their numbers."""
    audio = speech(args.seconds)
    print(f"**{machine()}** · {args.seconds:g} s of espeak-ng speech in white noise (20 dB SNR), 20 ms frames\n")
    rows = []
    for kind in KINDS:
        vad = detector(VadOptions(kind=kind))
        rows.append((f"VAD: {kind}", 100 * cpu_per_audio_second(vad.probabilities, audio)))
    for name, options in (("noise suppression", CleanOptions(noise_reduction=True)),
                          ("automatic gain", CleanOptions(auto_gain=True)),
                          ("noise suppression + gain", CleanOptions(noise_reduction=True, auto_gain=True))):
        rows.append((name, 100 * cpu_per_audio_second(Cleaner(options).process, audio)))
    for name, options in (("whole turn-taking, no model (silero, no cleaning)",
                           TurnOptions(end_of_turn=EndOfTurnOptions(enabled=False))),
                          ("whole turn-taking, silero + suppression + gain + Smart Turn",
                           TurnOptions(cleaning=CleanOptions(noise_reduction=True, auto_gain=True)))):
        taker = TurnTaker(options)
        started = time.process_time()  # Smart Turn runs on its own threads: count the whole process
        for i in range(0, len(audio), FRAME):
            taker.feed(audio[i:i + FRAME])
            time.sleep(0)
        rows.append((name, 100 * (time.process_time() - started) / (len(audio) / SAMPLE_RATE)))
    print("| part (one connection) | % of one core while streaming |\n|---|---|")
    for name, percent in rows:
        print(f"| {name} | {percent:.2f} |")

    model = EndOfTurnModel()
    clip = audio[-8 * SAMPLE_RATE:]
    model.probability(clip)  # warm-up: the first runs are slower
    feature_cpu, cpu, wall = [], [], []
    for _ in range(args.decisions):
        started, cpu_started = time.perf_counter(), time.thread_time()
        features(clip)
        feature_cpu.append(time.thread_time() - cpu_started)
        model.probability(clip)
        cpu.append(time.thread_time() - cpu_started)
        wall.append(time.perf_counter() - started)
    print("\n| Smart Turn v3.2, one decision on 8 s | p50 (ms) | p90 (ms) |\n|---|---|---|")
    for name, values in (("log-mel features, CPU", feature_cpu), ("features + ONNX model, CPU", cpu),
                         ("features + ONNX model, wall", wall)):
        print(f"| {name} | {1000 * np.percentile(values, 50):.0f} | {1000 * np.percentile(values, 90):.0f} |")
    return {"percent_of_a_core": dict(rows), "smart_turn_s": {"features_cpu": feature_cpu, "cpu": cpu, "wall": wall}}


if __name__ == "__main__":
    main()
