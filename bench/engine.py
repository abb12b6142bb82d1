"""Benchmark the Voxtral engine against plain transformers `generate`, on real speech.

    python bench/engine.py --config tiny   # tiny random Voxtral on CPU, about half a minute
    python bench/engine.py --config full   # Voxtral-Mini-3B-2507 shapes, random bf16 weights, GPU
    bench/gpu/run.sh --config full         # the same on the GPU machine, with the wheels it lacks (bench/gpu/README.md)

Prints one markdown table: audio encode, time to first token, decode speed against the memory
bandwidth floor, peak memory, KV reuse across turns and throughput of concurrent conversations.
Every timing is the median of --repeats runs after one untimed run (which also compiles).
Progress goes to stderr with timestamps; --json writes the raw timings (seconds) too.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # random weights: nothing to download
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # fastrtc imports gradio: no DNS lookups

import argparse
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
import wave
from dataclasses import replace
from functools import partial

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from voxtral_app.backends.contract import Sampling
from voxtral_app.model import checkpoint, prompt
from voxtral_app.model.checkpoint import resolve_device
from voxtral_app.model.engine import Engine, EngineOptions
from voxtral_app.model.loading import load_engine, warm_up

SPEECH_WAV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "speech-16k.wav")  # espeak-ng, 9 s
SAMPLE_RATE = 16_000  # Hz, the WAV's and Voxtral's
CLIP_S = 5  # seconds of speech in a short turn
LONG_S = 30  # seconds in a long turn: 480000 samples, still one encoder chunk
TURNS = 8  # turns in the KV-reuse conversation
CONCURRENCY = (1, 4, 8)  # conversations decoding at once
SLOTS = 8  # engine conversation slots
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}  # tensor size for the bandwidth measurement


STARTED = time.perf_counter()


def progress(message: str, *args) -> None:
    """A timestamped line on stderr, so that a run cut off still says how far it got."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - STARTED:5.0f} s] {message % args}",
          file=sys.stderr, flush=True)


def speech_clips() -> tuple[np.ndarray, np.ndarray]:
    """Speech from assets/speech-16k.wav (mono 16-bit 16 kHz; the stdlib reads it) -> (5 s, 30 s) clips."""
    with wave.open(SPEECH_WAV) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (SAMPLE_RATE, 1, 2), SPEECH_WAV
        speech = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    return speech[: CLIP_S * SAMPLE_RATE], np.resize(speech, LONG_S * SAMPLE_RATE)  # 9 s, repeated to 30 s


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    return f"{cpu} ({torch.get_num_threads()} threads)"


def elapsed(device: torch.device, fn, *args) -> float:
    """Seconds `fn(*args)` takes, queued device work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def median_of(measure, repeats: int) -> float:
    """Median of `measure()` over `repeats` runs, after one untimed run (warm-up, compilation)."""
    measure()
    return statistics.median(measure() for _ in range(repeats))


def timed(device: torch.device, repeats: int, fn, *args) -> float:
    return median_of(partial(elapsed, device, fn, *args), repeats)


def copy_bandwidth(device: torch.device) -> float:
    """Device memory bandwidth, bytes/s: a large copy reads and writes every byte once (best of 10)."""
    source = torch.ones(COPY_BYTES[device.type], dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() / min(elapsed(device, target.copy_, source) for _ in range(10))


def decode_step_bytes(model) -> int:
    """Weight bytes one decode step reads: decoder layers, final norm, lm_head, one embedding row."""
    text = model.model.language_model
    embed = text.get_input_embeddings().weight
    decoder = sum(p.numel() * p.element_size() for p in text.parameters()) - embed.numel() * embed.element_size()
    head = model.lm_head.weight
    return decoder + head.numel() * head.element_size() + embed.shape[1] * embed.element_size()


def peak_memory(device: torch.device) -> int:
    """Bytes: peak GPU allocation since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build(config: str, device: torch.device, compile: bool | None, workdir: str):
    """-> (model, processor, make_engine); the engine is made after generate's memory is measured."""
    options = EngineOptions(device=str(device), compile=compile, slots=SLOTS)
    if config == "tiny":
        loaded = load_engine(replace(options, model=checkpoint.build_tiny(os.path.join(workdir, "tiny")),
                                     warmup=False))
        loaded.close()  # its model and processor serve the engine made below, timed with its warm-up
        model, processor = loaded.model, loaded.processor
    else:
        from transformers import AutoProcessor

        full = checkpoint.full_size_config()
        checkpoint.save_processor(workdir)  # the tiny checkpoint's processor: the real Tekken tokenizer
        full.save_pretrained(workdir)  # without config.json the tokenizer loads as TokenizersBackend: no chat template
        processor = AutoProcessor.from_pretrained(workdir)
        model = checkpoint.random_model(full, dtype=torch.bfloat16, device=str(device))

    def make_engine():
        engine = Engine(model, processor, options)
        warm_up(engine)  # as load_engine does: compile (and capture CUDA graphs) before the first turn
        return engine

    return model, processor, make_engine


# -- eager: transformers' own generate on processor-made inputs ---------------------------------


def generate_inputs(processor, model, messages):
    inputs = processor.apply_chat_template(messages, return_dict=True)
    return inputs.to(model.device, dtype=model.dtype)  # casts only the float tensors (log-mel features)


def generate(model, inputs, tokens: int) -> list[int]:
    """Greedy generate of exactly `tokens` tokens (random weights: EOS must not end it early)."""
    out = model.generate(**inputs, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
    return out[0].tolist()  # the host copy waits for the device


def eager_column(model, processor, features, clips, tokens: int, repeats: int) -> dict:
    device, row = model.device, {}
    for name, feats in features.items():
        row[f"encode {name}"] = timed(device, repeats, model.get_audio_features, feats)
    for name, audio in clips.items():
        inputs = generate_inputs(processor, model, [prompt.user_message(audio)])
        row[f"ttft {name}"] = timed(device, repeats, generate, model, inputs, 1)
    messages = [prompt.user_message(clips["5 s"])]
    row["ttft e2e"] = median_of(lambda: elapsed(
        device, lambda: generate(model, generate_inputs(processor, model, messages), 1)), repeats)
    inputs = generate_inputs(processor, model, messages)
    row["decode"] = (timed(device, repeats, generate, model, inputs, tokens) - row["ttft 5 s"]) / (tokens - 1)
    return row


# -- ours: the Engine, driven the way the app drives it ------------------------------------------


def greedy(tokens: int) -> Sampling:
    return Sampling(temperature=0.0, top_p=1.0, max_new_tokens=tokens)


def one_turn(engine, audio, tokens: int):
    """A fresh conversation's first turn -> its finished Reply (iterated for text, as the app does)."""
    chat = engine.open_chat()
    try:
        reply = chat.start(audio, sampling=greedy(tokens))
        "".join(reply)
        return reply
    finally:
        chat.close()


def first_token_s(engine, audio) -> float:
    generation = one_turn(engine, audio, 1).generation
    return generation.first_token - generation.queued  # handed to the decode thread -> first token


def first_token_end_to_end(engine, audio) -> float:
    """chat.start -> first token: the prompt, its log-mel features and the prefill."""
    chat = engine.open_chat()
    started = time.perf_counter()
    reply = chat.start(audio, sampling=greedy(1))
    "".join(reply)
    chat.close()
    return reply.generation.first_token - started


def conversation(engine, audio, tokens: int) -> tuple[list, list]:
    """TURNS turns of one chat -> (their Replies, the messages its last turn answered)."""
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


def aggregate_tokens_per_s(engine, audio, chats: int, tokens: int) -> float:
    """`chats` conversations start at once -> all their tokens over the wall time, prefills included."""
    opened = [engine.open_chat() for _ in range(chats)]
    try:
        started = time.perf_counter()
        replies = [chat.start(audio, sampling=greedy(tokens)) for chat in opened]
        for reply in replies:
            "".join(reply)
    finally:
        for chat in opened:
            chat.close()
    return sum(r.generation.count for r in replies) / (max(r.generation.finished for r in replies) - started)


def ours_column(engine, features, clips, tokens: int, repeats: int) -> dict:
    device, row = engine.device, {}
    for name, feats in features.items():
        row[f"encode {name}"] = timed(device, repeats, engine.decoder._encode, feats)
    for name, audio in clips.items():
        row[f"ttft {name}"] = median_of(partial(first_token_s, engine, audio), repeats)
    row["ttft e2e"] = median_of(partial(first_token_end_to_end, engine, clips["5 s"]), repeats)
    row["decode"] = median_of(lambda: 1 / one_turn(engine, clips["5 s"], tokens).stats["tokens_per_s"], repeats)
    for chats in CONCURRENCY:
        row[f"aggregate {chats}"] = median_of(partial(aggregate_tokens_per_s, engine, clips["5 s"], chats, tokens),
                                              repeats)
    return row


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


def measure(config: str, device: torch.device, compile: bool | None, tokens: int, repeats: int):
    """Build, measure both columns -> (header line, [(measurement, eager generate, ours)])."""
    started = time.perf_counter()
    progress("building the %s model on %s", config, device)
    with tempfile.TemporaryDirectory() as workdir:
        model, processor, make_engine = build(config, device, compile, workdir)
    progress("built: %.2fB parameters, %s", sum(p.numel() for p in model.parameters()) / 1e9, model.dtype)
    short, long = speech_clips()
    clips = {"5 s": short, "30 s": long}
    features = {name: prompt.audio_features(processor.feature_extractor, [audio], device).to(model.dtype)
                for name, audio in clips.items()}  # [1, 128, 3000] each: one 30 s chunk
    ours = {}
    bandwidth = copy_bandwidth(device)
    floor = decode_step_bytes(model) / bandwidth  # s/token if the weights stream at copy speed

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress("copy bandwidth %.1f GB/s; eager generate column", bandwidth / 1e9)
    with torch.no_grad():  # as inside generate; the engine's own paths are no_grad already
        eager = eager_column(model, processor, features, clips, tokens, repeats)
    eager["peak"] = peak_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress("eager column done; making the engine (warm-up: compilation, CUDA graphs)")
    warm_up_started = time.perf_counter()
    engine = make_engine()
    ours["warm-up"] = time.perf_counter() - warm_up_started
    progress("engine warm-up took %.1f s; engine column", ours["warm-up"])
    engine.eos_id = -1  # random weights: no reply ends at EOS, each is exactly `tokens` long
    ours.update(ours_column(engine, features, clips, tokens, repeats))
    progress("engine column done; %d conversations of %d turns", repeats + 1, TURNS)
    chats = [conversation(engine, short, tokens) for _ in range(repeats + 1)][1:]  # first: warm-up
    ours["peak"] = peak_memory(device)
    with torch.no_grad():
        inputs = generate_inputs(processor, model, chats[0][1])
        eager["turn 8"] = timed(device, repeats, generate, model, inputs, 1)
    progress("measured; closing the engine")
    engine.close()
    turns = [[{"first_token_s": r.generation.first_token - r.generation.queued, **r.stats} for r in replies]
             for replies, _ in chats]

    def turn(i: int) -> str:
        stats = [replies[i].stats for replies, _ in chats]
        first = statistics.median(r[i].generation.first_token - r[i].generation.queued for r, _ in chats)
        decode = statistics.median(1 / s["tokens_per_s"] for s in stats)
        return (f"{ms(first)} (prefill {stats[0]['prefill_tokens']}, cached {stats[0]['cached_tokens']}; "
                f"then {ms(decode)}/token)")

    cache = sum(t.numel() * t.element_size() for t in engine.decoder.cache.keys + engine.decoder.cache.values)
    if device.type == "cuda":
        memory = ("peak GPU memory allocated", f"{eager['peak'] / 2**30:.2f} GiB")
    else:  # RSS only grows and the tiny engine is loaded first: no separate number for generate
        memory = ("peak RSS of the process", "n/a: one process-wide number on CPU")
    floor_name = (f"% of bandwidth floor ({ms(floor)}/token: {decode_step_bytes(model) / 1e9:.3f} GB "
                  f"of weights at {bandwidth / 1e9:.1f} GB/s copy)")
    one_at_a_time = "n/a: generate serves one request at a time"
    rows = [
        ("engine warm-up at start-up (compilation, CUDA graphs)", "n/a", f"{ours['warm-up']:.1f} s"),
        ("audio encode, 5 s clip (one 30 s chunk)", ms(eager["encode 5 s"]), ms(ours["encode 5 s"])),
        ("audio encode, 30 s clip (one 30 s chunk)", ms(eager["encode 30 s"]), ms(ours["encode 30 s"])),
        ("time to first token, 5 s speech (inputs ready)", ms(eager["ttft 5 s"]), ms(ours["ttft 5 s"])),
        ("time to first token, 30 s speech (inputs ready)", ms(eager["ttft 30 s"]), ms(ours["ttft 30 s"])),
        ("time to first token, 5 s speech, incl. prompt + log-mel", ms(eager["ttft e2e"]), ms(ours["ttft e2e"])),
        (f"decode ms/token, batch 1, greedy, {tokens} tokens", ms(eager["decode"]), ms(ours["decode"])),
        ("decode tok/s, batch 1", f"{1 / eager['decode']:.0f}", f"{1 / ours['decode']:.0f}"),
        (floor_name, f"{100 * floor / eager['decode']:.0f}%", f"{100 * floor / ours['decode']:.0f}%"),
        (*memory, f"{ours['peak'] / 2**30:.2f} GiB (KV cache for {SLOTS} chats: {cache / 2**30:.2f} GiB)"),
        ("time to first token, turn 1 of a chat (5 s clips, inputs ready)", ms(eager["ttft 5 s"]), turn(0)),
        (f"time to first token, turn {TURNS} of the same chat (inputs ready)",
         f"{ms(eager['turn 8'])} (prefills it all)", turn(TURNS - 1)),
    ]
    for n in CONCURRENCY:
        rows.append((f"aggregate tok/s, {n} concurrent chat{'s' * (n > 1)} ({tokens} tokens each)",
                     one_at_a_time, f"{ours[f'aggregate {n}']:.0f}"))

    header = (f"**{device_name(device)}** · torch {torch.__version__} · {str(model.dtype).removeprefix('torch.')} · "
              f"config {config} · compiled: {engine.decoder.compiled} · median of {repeats} · "
              f"{time.perf_counter() - started:.0f} s")
    raw = {"header": header, "tokens": tokens, "repeats": repeats, "bandwidth_bytes_per_s": bandwidth,
           "floor_s_per_token": floor, "eager": eager, "ours": ours, "turns": turns,
           "versions": {"torch": torch.__version__, "transformers": transformers_version()}}
    return header, rows, raw


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "full"), default="tiny",
                        help="tiny: the test checkpoint (CPU); full: Voxtral-Mini-3B-2507 shapes, random bf16")
    parser.add_argument("--device", default=None, help="default: cpu for tiny, cuda for full")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the engine's hot path (default: on with CUDA, off on CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per reply (default: 16 tiny, 128 full)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per number; the median is shown")
    parser.add_argument("--json", default=None, help="also write the raw timings (seconds) to this file")
    args = parser.parse_args(argv)
    tokens = args.tokens or (16 if args.config == "tiny" else 128)
    if tokens < 2:
        parser.error("--tokens must be at least 2: decode speed is measured after the first token")
    device = resolve_device(args.device or ("cpu" if args.config == "tiny" else "cuda"))
    if args.config == "full" and device.type != "cuda":
        parser.error("--config full needs a GPU: 4.7B parameters are 9.4 GB in bf16, plus the KV cache")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # generate's notices about its flags
    header, rows, raw = measure(args.config, device, args.compile, tokens, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**raw, "rows": rows}, f, indent=1)
    import results  # bench/results.py; here, not at the top, where tests/test_gpu_kit.py would take it for a package

    with results.recording() as printed:
        print(header + "\n")
        print("| measurement | eager generate | ours |\n|---|---|---|")
        for name, eager_cell, ours_cell in rows:
            print(f"| {name} | {eager_cell} | {ours_cell} |")
    results.write(f"engine-{args.config}", printed.text, {**raw, "rows": rows}, argv)


if __name__ == "__main__":
    main()
