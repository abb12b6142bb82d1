"""More conversations than KV slots: first-token time of a hot, a restored and a re-prefilled turn.

    python bench/offload.py                      # the tiny random Voxtral on the CPU, ~1-2 min
    python bench/offload.py --turns 800 --model-process
    python bench/offload.py --device cuda         # on a GPU: also the copy of a full-size 4k-token cache

32 conversations (--conversations) share 4 KV slots (--slots), one turn at a time. Each first speaks a
few seconds of real speech (its history: ~400 prompt tokens with the audio), then they take typed turns:
mostly one of the last 4 speakers (whose cache is likely still on the device: a *hot* turn), otherwise
any of them: its cache comes back from host memory (*restored*) or, when the host budget
(--host-conversations worth of caches) pushed it out, its whole history is prefilled again
(*re-prefilled*, audio encoding included). Each turn is classed by what the engine told its listeners
(model/rows.py). Greedy replies of --reply-tokens tokens, so every turn does the same work after its
first token. The process's RSS is sampled as the turns go: after the first round it should stay flat.
"""

import argparse
import os
import random
import statistics
import sys
import threading
import time
from collections import deque

import psutil
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results  # noqa: E402  (bench/results.py)

from voxtral_app.audio.pcm import prepare, read_wav  # noqa: E402
from voxtral_app.backends.contract import Sampling  # noqa: E402
from voxtral_app.model import checkpoint, loading  # noqa: E402
from voxtral_app.model.decoder import Decoder, SlotCache  # noqa: E402
from voxtral_app.model.engine import EngineOptions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEECH = os.path.join(ROOT, "tests", "data", "fastrtc-test_file.wav")  # a spoken sentence
HISTORY_TOKENS = 600  # a conversation's cache here, about: the host budget is counted in these


class Moves:
    """The engine's cache moves during one turn (a listener, called on the decode thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def __call__(self, phase: str, seconds: float) -> None:
        with self.lock:
            self.counts[phase] = self.counts.get(phase, 0) + 1

    def take(self) -> dict[str, int]:
        with self.lock:
            counts, self.counts = self.counts, {}
        return counts


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bytes_per_token(path: str, device: str) -> int:
    """KV-cache bytes per token: keys and values of every layer (load_model's dtype: bf16 on CUDA, else float32)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path).text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * (2 if "cuda" in device else 4)


def rss_mib(process: psutil.Process) -> float:
    """This process's resident memory and its children's (the model process, when there is one)."""
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2 ** 20


def copy_times(device_name: str, tokens: int, repeats: int) -> dict:
    """Offload and restore one conversation's cache of `tokens` at Voxtral-Mini-3B's size (bf16), through
    Decoder.offload/restore on a one-row SlotCache: median milliseconds of `repeats`."""
    device = torch.device(device_name)
    config = checkpoint.full_size_config().text_config
    cache = SlotCache(config, 1, tokens, torch.bfloat16, device)
    decoder = Decoder.__new__(Decoder)  # only the cache and the device: no weights
    decoder.cache, decoder.device = cache, device

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started, result

    offloads, restores, kept = [], [], None
    for _ in range(repeats + 1):  # the first is a warm-up (pinned memory, allocator)
        seconds, kept = timed(lambda: decoder.offload(0, tokens))
        offloads.append(seconds)
        seconds, _ = timed(lambda: decoder.restore(0, kept))
        restores.append(seconds)
    return {"tokens": tokens, "mib": round(kept.nbytes / 2 ** 20, 1),
            "offload_ms": round(statistics.median(offloads[1:]) * 1000, 2),
            "restore_ms": round(statistics.median(restores[1:]) * 1000, 2)}


def run(args) -> dict:
    path = loading.checkpoint_path(checkpoint.TINY) if args.model == "tiny-random" else args.model
    host_bytes = args.host_conversations * HISTORY_TOKENS * bytes_per_token(path, args.device)
    engine = loading.load_engine(EngineOptions(
        model=path, device=args.device, slots=args.conversations, kv_slots=args.slots, max_tokens=4096,
        kv_host_gb=host_bytes / 1e9, warmup=False, model_process=args.model_process))
    moves = Moves()
    engine.listen(moves)
    rate, samples = read_wav(SPEECH)
    speech = prepare(rate, samples, max_seconds=300)
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=args.reply_tokens)
    process = psutil.Process()
    rng = random.Random(0)
    chats = [engine.open_chat() for _ in range(args.conversations)]
    first: dict[str, list[float]] = {"hot": [], "restored": [], "re-prefilled": []}
    rss: list[tuple[int, float]] = []
    started = time.perf_counter()
    try:
        for chat in chats:  # histories: a spoken turn each (not timed: every one is a first prefill)
            "".join(chat.start(speech, text="What was said?", sampling=sampling))
            chat.settle()
        moves.take()
        rss.append((0, rss_mib(process)))
        recent: deque[int] = deque(maxlen=args.slots)
        for turn in range(1, args.turns + 1):
            n = rng.choice(recent) if recent and rng.random() < args.hot_share else rng.randrange(len(chats))
            recent.append(n)
            reply = chats[n].start(None, text=f"Turn {turn}: and then?", sampling=sampling)
            "".join(reply)
            chats[n].settle()  # the reply joins its conversation now, not at the start of the next turn
            counts = moves.take()
            kind = "restored" if counts.get("restore") else "re-prefilled" if counts.get("reprefill") else "hot"
            first[kind].append(reply.stats["first_token_s"])
            if turn % args.sample_every == 0:
                rss.append((turn, rss_mib(process)))
        elapsed = time.perf_counter() - started
        cached = [len(chat.cached) for chat in chats]
        kept = engine.kept_on_host
    finally:
        for chat in chats:
            chat.close()
        engine.close()

    print(f"{args.conversations} conversations on {args.slots} KV slots, {args.model} on {args.device}"
          f"{' (model process)' if args.model_process else ''}; host budget {host_bytes / 2 ** 20:.1f} MiB "
          f"(~{args.host_conversations} caches); {args.turns} turns in {elapsed:.0f} s; caches "
          f"{min(cached)}-{max(cached)} tokens at the end, {kept} on the host")
    print()
    hot_p50 = statistics.median(first["hot"]) if first["hot"] else float("nan")
    print("| turn | turns | first token p50 (ms) | p90 (ms) | p50 / hot p50 |")
    print("|---|---|---|---|---|")
    table = {}
    for kind, values in first.items():
        if not values:
            print(f"| {kind} | 0 | - | - | - |")
            continue
        p50, p90 = statistics.median(values), percentile(values, 0.9)
        table[kind] = {"turns": len(values), "p50_ms": round(p50 * 1000, 2), "p90_ms": round(p90 * 1000, 2),
                       "vs_hot": round(p50 / hot_p50, 2)}
        print(f"| {kind} | {len(values)} | {p50 * 1000:.1f} | {p90 * 1000:.1f} | {p50 / hot_p50:.2f}x |")
    print()
    print("| after turn | RSS (MiB, the model process's included) |")
    print("|---|---|")
    for turn, mib in rss:
        print(f"| {turn} | {mib:.0f} |")
    half = [mib for turn, mib in rss if turn >= args.turns // 2]
    growth = half[-1] - half[0] if len(half) > 1 else 0.0
    print()
    print(f"RSS from turn {args.turns // 2} to the end: {growth:+.0f} MiB")
    copies = None
    if args.copy_tokens:
        copies = copy_times(args.device, args.copy_tokens, args.copy_repeats)
        print()
        print(f"One cache at Voxtral-Mini-3B's size (bf16, {args.device}), median of {args.copy_repeats}:")
        print()
        print("| tokens | MiB | offload (ms) | restore (ms) |")
        print("|---|---|---|---|")
        print(f"| {copies['tokens']} | {copies['mib']} | {copies['offload_ms']} | {copies['restore_ms']} |")
    return {"conversations": args.conversations, "slots": args.slots, "turns": args.turns, "device": args.device,
            "model_process": args.model_process, "host_bytes": host_bytes, "first_token": table,
            "rss_mib": rss, "rss_growth_second_half_mib": round(growth, 1), "seconds": round(elapsed, 1),
            "full_size_copy": copies}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random", help="checkpoint directory (default: the tiny random one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--slots", type=int, default=4, help="KV slots on the device (--kv-slots)")
    parser.add_argument("--host-conversations", type=int, default=12, help="host budget, in caches of "
                        f"~{HISTORY_TOKENS} tokens")
    parser.add_argument("--turns", type=int, default=400)
    parser.add_argument("--hot-share", type=float, default=0.5, help="share of turns by one of the last speakers")
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--sample-every", type=int, default=50, help="turns between RSS samples")
    parser.add_argument("--copy-tokens", type=int, help="then time offloading and restoring one cache of this many "
                        "tokens at full size (default: 4096 on CUDA; 0, not, on the CPU: 1.5 GB of memory)")
    parser.add_argument("--copy-repeats", type=int, default=5)
    parser.add_argument("--model-process", action="store_true", help="the model in its own process (app.py's default)")
    args = parser.parse_args(argv)
    if args.copy_tokens is None:
        args.copy_tokens = 4096 if args.device.startswith("cuda") else 0
    with results.recording() as printed:
        data = run(args)
    results.write("offload", printed.text, data, argv)


if __name__ == "__main__":
    main()
