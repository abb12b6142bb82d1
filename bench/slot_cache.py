"""What reading a slot's KV rows in place saves against gathering them into a copy, per decode step.

    python bench/slot_cache.py                 # CPU: the tiny model's steps, then one full-size layer
    python bench/slot_cache.py --device cuda   # the same on a GPU

Two measurements, each the median of --repeats alternating runs of both ways:
1. `Decoder.step` of the tiny random Voxtral (eager) at batch 1 and 8, windows 256 to 8192: rows read
   as a view (`first_row`, what contiguous rows get) against the gathered copy (what scattered rows get).
2. One attention layer at Voxtral-Mini-3B's KV shapes (8 KV heads x 128, 32 query heads, bf16 on GPU,
   float32 on CPU): SlotCache.update + SDPA, view against copy. Multiply by 30 layers for a step.
"""

import argparse
import copy as copying
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results  # noqa: E402  (bench/results.py)

from voxtral_app.model import checkpoint
from voxtral_app.model.decoder import ROW_OFFSET, Decoder, SlotCache, causal_mask

SLOTS = 8
MAX_TOKENS = 8192


def timed(device, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def compare(device, repeats: int, view, copy) -> tuple[float, float]:
    """Median seconds of (view, copy), alternating so that load on a shared machine hits both alike."""
    view(), copy()
    times = []
    for i in range(repeats):  # which goes first alternates too
        pair = (timed(device, view), timed(device, copy)) if i % 2 else tuple(reversed((timed(device, copy),
                                                                                          timed(device, view))))
        times.append(pair)
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def step_rows(decoder, batch: int, window: int):
    """-> (view, copy): one eager decode step of rows 0..batch-1 at position window - 1, read both ways."""
    device = decoder.device
    rows = torch.arange(batch, device=device)
    tokens = torch.zeros(batch, dtype=torch.long, device=device)
    positions = torch.full((batch,), window - 1, device=device)
    temperature = torch.zeros(batch, device=device)
    top_p = torch.ones(batch, device=device)

    def run(first_row):
        return lambda: decoder.step_eager(rows, tokens, positions, window, temperature, top_p, first_row)
    return run(ROW_OFFSET), run(None)


def layer_rows(config, device, dtype, batch: int, window: int):
    """-> (view, copy): one layer's cache write + attention at full-size shapes, read both ways."""
    cache = SlotCache(config, SLOTS, MAX_TOKENS, dtype, device)
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    query = torch.randn(batch, heads, 1, head_dim, dtype=dtype, device=device)
    key = torch.randn(batch, kv_heads, 1, head_dim, dtype=dtype, device=device)
    positions = torch.full((batch, 1), window - 1, device=device)
    mask = causal_mask(positions, window)
    rows = torch.arange(batch, device=device)[:, None]

    def run(first_row):
        def attend():
            cache.route(rows, positions, window, first_row)
            keys, values = cache.update(key, key, 0)
            return torch.nn.functional.scaled_dot_product_attention(query, keys, values, mask, enable_gqa=True)
        return attend
    return run(ROW_OFFSET), run(None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    with results.recording() as printed:
        data = run(args)
    results.write("slot-cache", printed.text, data, argv)


def run(args: argparse.Namespace) -> dict:
    """Time both reads at each batch and window, printing the table; -> its rows (seconds)."""
    device = torch.device(args.device)
    windows = (256, 2048, 8192)
    rows = []
    print(f"**{device}** · torch {torch.__version__} · {torch.get_num_threads()} threads · median of {args.repeats}\n")
    print("| what | batch | window | view (in place) | gathered copy | copy / view |\n|---|---|---|---|---|---|")
    with torch.no_grad():
        model = checkpoint.random_model(checkpoint.tiny_config(), device=str(device))
        decoder = Decoder(model, SLOTS, MAX_TOKENS, compile=False)
        for batch in (1, SLOTS):
            for window in windows:
                view, copy = compare(device, args.repeats, *step_rows(decoder, batch, window))
                rows.append({"what": "tiny model, decode step", "batch": batch, "window": window, "view_s": view,
                             "copy_s": copy})
                print(f"| tiny model, decode step | {batch} | {window} | {view * 1e3:.2f} ms | {copy * 1e3:.2f} ms "
                      f"| {copy / view:.2f} |")
        text = copying.deepcopy(checkpoint.full_size_config().text_config)
        text.num_hidden_layers = 1  # one layer's cache: 0.6 GB in float32
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for batch in (1, SLOTS):
            for window in windows:
                view, copy = compare(device, args.repeats, *layer_rows(text, device, dtype, batch, window))
                rows.append({"what": "full-size shapes, one layer", "batch": batch, "window": window, "view_s": view,
                             "copy_s": copy})
                print(f"| full-size shapes, one layer | {batch} | {window} | {view * 1e3:.2f} ms | "
                      f"{copy * 1e3:.2f} ms | {copy / view:.2f} |")
    return {"device": str(device), "rows": rows}


if __name__ == "__main__":
    main()
