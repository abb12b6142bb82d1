"""Benchmark the Voxtral engine against plain transformers `generate`, on real speech.

    python bench/engine.py --config tiny               # tiny random Voxtral on CPU, well under a minute
    python bench/engine.py --config full --tokens 128  # Voxtral-Mini-3B-2507 architecture, random bf16 weights, GPU

Prints one markdown table: audio encode, time to first token, decode speed against the memory
bandwidth floor, peak memory, KV reuse across turns and throughput with concurrent conversations.
Every timing is the median of --repeats runs after one untimed run (which also compiles).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # random weights: nothing to download
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # fastrtc imports gradio; no DNS lookups

import argparse
import importlib.util
import logging
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from voxtral_app import checkpoint, prompt  # noqa: E402
from voxtral_app.audio import SAMPLE_RATE, prepare, read_wav  # noqa: E402
from voxtral_app.engine import Engine, EngineOptions, Sampling, load_engine, resolve_device  # noqa: E402

CLIP_S = 5  # seconds of speech in a "short" turn
LONG_S = 30  # seconds in a "long" turn: 480000 samples, still one encoder chunk
TURNS = 8  # turns in the KV-reuse conversation
CONCURRENCY = (1, 4, 8)  # conversations decoding at once
SLOTS = 8  # engine conversation slots
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}  # tensor size for the bandwidth measurement


def speech_clips() -> tuple[np.ndarray, np.ndarray]:
    """Real speech from fastrtc's test file -> (5 s clip, 30 s clip) at 16 kHz."""
    path = os.path.join(os.path.dirname(importlib.util.find_spec("fastrtc").origin), "speech_to_text", "test_file.wav")
    speech = prepare(*read_wav(path), max_seconds=300)  # ~21 s of one speaker
    long = np.resize(speech, LONG_S * SAMPLE_RATE)  # repeats the speech up to exactly 30 s
    return speech[: CLIP_S * SAMPLE_RATE], long


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    return f"{model} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(device: torch.device, fn) -> float:
    """Seconds `fn()` takes, with the device's queued work included."""
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def median_of(measure, repeats: int) -> float:
    """Median of `measure()` over `repeats` runs, after one untimed run (warm-up, compilation)."""
    measure()
    return statistics.median(measure() for _ in range(repeats))


def copy_bandwidth(device: torch.device) -> float:
    """Device memory bandwidth, bytes/s: a large copy reads and writes every byte once."""
    nbytes = COPY_BYTES[device.type]
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = median_of(lambda: elapsed(device, lambda: target.copy_(source)), 5)
    return 2 * nbytes / seconds


def decode_step_bytes(model) -> int:
    """Weight bytes one decode step must read: decoder layers, final norm, lm_head, one embedding row."""
    text = model.model.language_model
    embed = text.get_input_embeddings().weight
    layers = sum(p.numel() * p.element_size() for p in text.parameters()) - embed.numel() * embed.element_size()
    head = model.lm_head.weight
    return layers + head.numel() * head.element_size() + embed.shape[1] * embed.element_size()


def peak_memory(device: torch.device) -> int:
    """Bytes: peak GPU allocation since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def build(config: str, device: torch.device, compile: bool | None, workdir: str):
    """-> (model, processor, make_engine). The engine is made later so generate's memory is measured alone."""
    options = EngineOptions(device=str(device), compile=compile, slots=SLOTS)
    if config == "tiny":
        path = checkpoint.build_tiny(os.path.join(workdir, "tiny"))
        engine = load_engine(EngineOptions(model=path, device=str(device), compile=compile, slots=SLOTS))
        return engine.model, engine.processor, lambda: engine
    from transformers import AutoProcessor

    checkpoint.save_processor(os.path.join(workdir, "processor"))
    processor = AutoProcessor.from_pretrained(os.path.join(workdir, "processor"))
    model = checkpoint.random_model(checkpoint.full_size_config(), dtype=torch.bfloat16, device=str(device))
    return model, processor, lambda: Engine(model, processor, options)


# -- eager: transformers' own generate on processor-made inputs ------------------------------------


def generate_inputs(processor, model, messages):
    inputs = processor.apply_chat_template(messages, return_dict=True)
    return inputs.to(model.device, dtype=model.dtype)  # casts only the float tensors (log-mel features)


def generate(model, inputs, tokens: int) -> list[int]:
    """Greedy generate of exactly `tokens` tokens (EOS cannot end it early)."""
    out = model.generate(**inputs, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                         pad_token_id=0)
    return out[0].tolist()  # the host copy waits for the device


def eager_column(model, processor, features, clip, long, tokens, repeats) -> dict:
    device = model.device
    row = {}
    for name, feats in features.items():
        row[f"encode {name}"] = median_of(lambda: elapsed(device, lambda: model.get_audio_features(feats)), repeats)
    for name, audio in (("5 s", clip), ("30 s", long)):
        inputs = generate_inputs(processor, model, [prompt.user_message(audio)])
        row[f"ttft {name}"] = median_of(lambda: elapsed(device, lambda: generate(model, inputs, 1)), repeats)
    messages = [prompt.user_message(clip)]
    row["ttft e2e"] = median_of(lambda: elapsed(
        device, lambda: generate(model, generate_inputs(processor, model, messages), 1)), repeats)
    inputs = generate_inputs(processor, model, messages)
    full = median_of(lambda: elapsed(device, lambda: generate(model, inputs, tokens)), repeats)
    row["decode"] = (full - row["ttft 5 s"]) / (tokens - 1)  # the first token comes from the prefill
    return row


# -- ours: the Engine, exactly as the app drives it ------------------------------------------------


def greedy(tokens: int) -> Sampling:
    return Sampling(temperature=0.0, top_p=1.0, max_new_tokens=tokens)


def one_turn(engine, audio, tokens: int):
    """A fresh conversation's first turn -> its finished Reply (iterated like the app does)."""
    chat = engine.open_chat()
    try:
        reply = chat.start(audio, sampling=greedy(tokens))
        "".join(reply)
        return reply
    finally:
        chat.close()


def conversation(engine, audio, tokens: int) -> tuple[list, list]:
    """TURNS turns of one chat -> (their Replies, the messages the last turn answered)."""
    chat = engine.open_chat()
    replies = []
    try:
        for _ in range(TURNS):
            replies.append(chat.start(audio, sampling=greedy(tokens)))
            messages = list(chat.messages)
            "".join(replies[-1])
    finally:
        chat.close()
    return replies, messages


def concurrent(engine, audio, chats: int, tokens: int) -> tuple[float, float]:
    """`chats` conversations start at once -> (tokens/s over the wall time, tokens/s while decoding)."""
    opened = [engine.open_chat() for _ in range(chats)]
    try:
        started = time.perf_counter()
        replies = [chat.start(audio, sampling=greedy(tokens)) for chat in opened]
        for reply in replies:
            "".join(reply)
    finally:
        for chat in opened:
            chat.close()
    gens = [reply.generation for reply in replies]
    total = sum(g.count for g in gens)
    end = max(g.finished for g in gens)
    decoding_from = max(g.first_token for g in gens)  # every prefill is done
    decoded = sum(len(g.fed) for g in gens)  # a conservative count: some decoded before `decoding_from`
    return total / (end - started), decoded / max(end - decoding_from, 1e-9)


def ours_column(engine, features, clip, long, tokens, repeats) -> dict:
    device = engine.device
    decoder = engine.decoder
    row = {}
    for name, feats in features.items():
        row[f"encode {name}"] = median_of(lambda: elapsed(device, lambda: decoder._encode(feats)), repeats)
    for name, audio in (("5 s", clip), ("30 s", long)):
        row[f"ttft {name}"] = median_of(lambda: one_turn(engine, audio, 1).stats["first_token_s"], repeats)

    def end_to_end():
        chat = engine.open_chat()
        started = time.perf_counter()
        reply = chat.start(clip, sampling=greedy(1))  # includes the prompt and log-mel features
        "".join(reply)
        chat.close()
        return reply.generation.first_token - started

    row["ttft e2e"] = median_of(end_to_end, repeats)
    row["decode"] = median_of(lambda: 1 / one_turn(engine, clip, tokens).stats["tokens_per_s"], repeats)
    for chats in CONCURRENCY:
        runs = [concurrent(engine, clip, chats, tokens) for _ in range(repeats + 1)][1:]
        row[f"aggregate {chats}"] = tuple(statistics.median(r[i] for r in runs) for i in range(2))
    return row


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "full"), default="tiny",
                        help="tiny: the test checkpoint (CPU); full: Voxtral-Mini-3B-2507 shapes, random bf16")
    parser.add_argument("--device", default=None, help="default: cpu for tiny, cuda for full")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the engine's hot path (default: on with CUDA, off on CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per reply (default: 32 tiny, 128 full)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per number (median reported)")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (32 if args.config == "tiny" else 128)
    if args.tokens < 2:
        parser.error("--tokens must be at least 2 (decode speed is measured after the first token)")
    device = resolve_device(args.device or ("cpu" if args.config == "tiny" else "cuda"))
    if args.config == "full" and device.type != "cuda":
        parser.error("--config full needs a GPU: 4.7B parameters are 9.4 GB in bf16, plus the KV cache")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # generate's flag notices

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        model, processor, make_engine = build(args.config, device, args.compile, workdir)
        clip, long = speech_clips()
        features = {name: prompt.audio_features(processor, [audio], device).to(model.dtype)
                    for name, audio in (("5 s", clip), ("30 s", long))}
        bandwidth = copy_bandwidth(device)
        floor = decode_step_bytes(model) / bandwidth  # seconds per token if weights stream at copy speed

        reset_peak(device)
        with torch.no_grad():  # generate runs without autograd; so does the eager encode here
            eager = eager_column(model, processor, features, clip, long, args.tokens, args.repeats)
            eager["peak"] = peak_memory(device)
        reset_peak(device)
        engine = make_engine()
        engine.eos_id = -1  # random weights: no reply ends at EOS, each is exactly --tokens long
        ours = ours_column(engine, features, clip, long, args.tokens, args.repeats)
        turns = [conversation(engine, clip, args.tokens) for _ in range(args.repeats + 1)][1:]
        ours["peak"] = peak_memory(device)
        last_messages = turns[0][1]
        inputs = generate_inputs(processor, model, last_messages)
        with torch.no_grad():
            eager["turn 8"] = median_of(lambda: elapsed(device, lambda: generate(model, inputs, 1)), args.repeats)

    def turn(i):
        stats = [replies[i].stats for replies, _ in turns]
        first = statistics.median(s["first_token_s"] for s in stats)
        return f"{ms(first)} (prefill {stats[0]['prefill_tokens']}, cached {stats[0]['cached_tokens']})"

    cache = sum(t.numel() * t.element_size() for t in engine.decoder.cache.keys + engine.decoder.cache.values)
    if device.type == "cuda":
        memory = ("peak GPU memory allocated", f"{eager['peak'] / 2**30:.2f} GiB")
    else:  # RSS only grows and the tiny engine is loaded first: no separate number for generate
        memory = ("peak RSS of the process", "n/a: one process-wide number on CPU")
    n_a = "n/a: generate serves one request at a time"
    rows = [
        ("audio encode, 5 s clip (one 30 s chunk)", ms(eager["encode 5 s"]), ms(ours["encode 5 s"])),
        ("audio encode, 30 s clip (one 30 s chunk)", ms(eager["encode 30 s"]), ms(ours["encode 30 s"])),
        ("time to first token, 5 s speech (inputs ready)", ms(eager["ttft 5 s"]), ms(ours["ttft 5 s"])),
        ("time to first token, 30 s speech (inputs ready)", ms(eager["ttft 30 s"]), ms(ours["ttft 30 s"])),
        ("time to first token, 5 s speech, incl. prompt + log-mel", ms(eager["ttft e2e"]), ms(ours["ttft e2e"])),
        (f"decode ms/token, batch 1, greedy, {args.tokens} tokens", ms(eager["decode"]), ms(ours["decode"])),
        ("decode tok/s, batch 1", f"{1 / eager['decode']:.0f}", f"{1 / ours['decode']:.0f}"),
        (f"% of bandwidth floor ({ms(floor)}/token: {decode_step_bytes(model) / 1e9:.3f} GB of weights "
         f"at {bandwidth / 1e9:.1f} GB/s copy)", f"{100 * floor / eager['decode']:.0f}%",
         f"{100 * floor / ours['decode']:.0f}%"),
        (*memory, f"{ours['peak'] / 2**30:.2f} GiB (KV cache for {SLOTS} chats: {cache / 2**30:.2f} GiB)"),
        ("time to first token, turn 1 of a chat (5 s clips)", ms(eager["ttft 5 s"]), turn(0)),
        (f"time to first token, turn {TURNS} of the same chat", f"{ms(eager['turn 8'])} (re-prefills all)",
         turn(TURNS - 1)),
    ]
    for chats in CONCURRENCY:
        wall, decoding = ours[f"aggregate {chats}"]
        rows.append((f"aggregate tok/s, {chats} concurrent chat{'s' * (chats > 1)} (wall incl. prefill; decode only)",
                     n_a, f"{wall:.0f}; {decoding:.0f}"))

    dtype = str(model.dtype).removeprefix("torch.")
    print(f"**{device_name(device)}** · torch {torch.__version__} · {dtype} · config {args.config} · "
          f"compiled: {engine.decoder.compiled} · median of {args.repeats} · {time.perf_counter() - started:.0f} s\n")
    print("| measurement | eager generate | ours |\n|---|---|---|")
    for name, eager_cell, ours_cell in rows:
        print(f"| {name} | {eager_cell} | {ours_cell} |")


if __name__ == "__main__":
    main()
