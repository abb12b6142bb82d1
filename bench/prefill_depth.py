"""What a turn costs the model deep into a conversation: audio encode, prefill and decode step by position.

    python bench/prefill_depth.py                  # tiny random Voxtral, eager, one CPU thread (as the model process runs)
    python bench/prefill_depth.py --threads 2

A spoken turn is one 30 s clip through the audio encoder, then ~380 prompt tokens prefilled after
everything the conversation already holds; a trimmed conversation re-prefills its history in
512-token pieces; replies are batched decode steps. Each is timed at several start positions, with
attention reading exactly the positions in use (what eager code does now) and reading a power-of-two
window (what it did before, and what compiled code still does: one graph per window). Median of
--repeats.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results  # noqa: E402  (bench/results.py)

from voxtral_app.model import checkpoint  # noqa: E402
from voxtral_app.model.checkpoint import load_model  # noqa: E402
from voxtral_app.model.decoder import Decoder, window_for  # noqa: E402

STARTS = (0, 2000, 4000, 7000)  # positions a turn starts at (a conversation's tokens so far)
SLOTS = 8  # app.py's --max-sessions default
MAX_TOKENS = 8192  # the engine's KV cache per conversation


def median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the model process uses half the cores)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with results.recording() as printed:
        data = run(args)
    results.write("prefill-depth", printed.text, data)


def run(args: argparse.Namespace) -> dict:
    """Time each start position both ways, printing the table; -> its rows (ms)."""
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as workdir:
        model = load_model(checkpoint.build_tiny(os.path.join(workdir, "tiny")), torch.device("cpu"))
    decoder = Decoder(model, SLOTS, MAX_TOKENS, compile=False)
    features = torch.randn(1, model.config.audio_config.num_mel_bins, 3000)
    audio = decoder.encode_audio(features)
    turn = [decoder.audio_token_id] * audio.shape[0] + list(range(100, 105))  # a spoken turn's prompt
    piece = list(range(100, 612))  # 512 tokens of a history being re-prefilled
    exact = decoder.window

    def padded(length: int) -> int:
        return window_for(length, MAX_TOKENS)

    print(f"tiny random Voxtral, eager, {args.threads} torch thread(s), {os.cpu_count()} cores, torch "
          f"{torch.__version__}; median of {args.repeats}\n")
    encoder_ms = median_ms(lambda: decoder.encode_audio(features), args.repeats)
    print(f"audio encoder, one 30 s clip: {encoder_ms:.1f} ms\n")
    print("| start position | window read (exact / padded) | 380-token turn prefill, exact / padded (ms) "
          "| 512-token piece, exact / padded (ms) | batch-8 decode step, exact / padded (ms) |")
    print("|---|---|---|---|---|")
    rows = []
    for start in STARTS:
        row = []
        for window in (exact, padded):
            decoder.window = window
            row.append((median_ms(lambda: decoder.prefill(0, turn, start, None, audio), args.repeats),
                        median_ms(lambda: decoder.prefill(0, piece, start, None, None), args.repeats),
                        median_ms(lambda: decoder.step(list(range(SLOTS)), [5] * SLOTS, [start + 380] * SLOTS,
                                                       [0.2] * SLOTS, [0.95] * SLOTS), args.repeats)))
        decoder.window = exact
        (turn_e, piece_e, step_e), (turn_p, piece_p, step_p) = row
        rows.append({"start": start, "exact": row[0], "padded": row[1]})
        print(f"| {start} | {start + len(turn)} / {padded(start + len(turn))} | {turn_e:.1f} / {turn_p:.1f} | "
              f"{piece_e:.1f} / {piece_p:.1f} | {step_e:.1f} / {step_p:.1f} |")
    return {"audio_encoder_ms": encoder_ms, "rows": rows}  # exact / padded: (turn prefill, piece, decode step)


if __name__ == "__main__":
    main()
