"""A long spoken conversation, turn by turn: first-token latency, prompt tokens and clips in the prompt
for turns 1..N, with every spoken turn kept as audio or only the last K (older ones as transcripts).

    python bench/long_talk.py                          # tiny model on CPU, 20 turns, ~4 min
    python bench/long_talk.py --model mistralai/Voxtral-Mini-3B-2507 --device cuda   # the real model

Configurations:
- all-audio: every spoken turn stays audio (the prompt grows by 375+ tokens a turn, until the cache trims it);
- k3: the last 3 spoken turns stay audio (the default `--audio-turns 3`); older ones become their
  transcripts, made in the background when they age out;
- k3-captions: the same, with captions on (every spoken turn is transcribed beside its reply), which
  is also what the captions cost a reply on this machine.
Each turn, the person "speaks" for --speak-s (turn-taking's `speech` event comes first, as it does live,
which is when old turns age and the trimmed prompt is prefilled in the background), then the turn ends.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results  # noqa: E402  (bench/results.py)
from turn_latency import SENTENCES, espeak, machine  # noqa: E402

from voxtral_app.conversation.conversation import (  # noqa: E402
    Conversation,
    ConversationOptions,
    Settings,
)
from voxtral_app.conversation.events import ReplyFinished, ReplyStarted, TurnFailed  # noqa: E402
from voxtral_app.model import checkpoint, loading  # noqa: E402
from voxtral_app.model.engine import EngineOptions  # noqa: E402
from voxtral_app.turns.taker import TurnEvent  # noqa: E402

CONFIGS = {"all-audio": (1_000, False), "k3": (3, False), "k3-captions": (3, True)}  # name -> (audio_turns, captions)


def run_config(name: str, args, clips) -> list[dict]:
    audio_turns, captions = CONFIGS[name]
    model = loading.checkpoint_path(checkpoint.TINY) if args.model == checkpoint.TINY else args.model
    engine = loading.load_engine(EngineOptions(model=model, device=args.device, slots=2, audio_turns=audio_turns,
                                               transcript_tokens=args.transcript_tokens))
    conversation = Conversation(engine, ConversationOptions(reply_tokens=args.reply_tokens, captions=captions),
                                settings=Settings(temperature=0.0), name=name).open()
    rows = []
    try:
        for turn in range(args.turns):
            clip = clips[turn % len(clips)]
            conversation.post("speech", TurnEvent("speech"))
            time.sleep(args.speak_s)  # they speak: old turns age and are prefilled in the background now
            conversation.post("end", TurnEvent("end", clip, time.perf_counter()))
            first, finished = None, None
            while finished is None:
                event = conversation.outbox.get(timeout=600)
                if isinstance(event, ReplyStarted):
                    first = event.latency_s
                elif isinstance(event, (ReplyFinished, TurnFailed)):
                    finished = event
            if isinstance(finished, TurnFailed) or finished.error:
                raise RuntimeError(f"{name}: turn {turn + 1} failed: {finished}")
            ids = conversation.chat.prompt_ids
            rows.append({"turn": turn + 1, "first_token_ms": round(first * 1000) if first is not None else None,
                         "prompt_tokens": len(ids), "prefill_tokens": finished.stats.prefill_tokens,
                         "clips": ids.count(engine.begin_audio_id), "tokens_per_s": finished.stats.tokens_per_s})
            time.sleep(args.listen_s)  # they read the reply
    finally:
        conversation.close()
        conversation.closed.wait(30)
        engine.close()
    return rows


def p50(values) -> float:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else float("nan")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=checkpoint.TINY)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--speak-s", type=float, default=1.5, help="how long the person speaks before each turn ends")
    parser.add_argument("--listen-s", type=float, default=0.5, help="pause after each reply")
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--transcript-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    clips = [espeak(sentence) for sentence in SENTENCES]
    with results.recording() as printed:
        print(f"# {machine()}")
        print(f"# {args.model} on {args.device}; {args.turns} spoken turns of {len(clips)} espeak-ng sentences "
              f"({min(len(c) for c in clips) / 16000:.1f}-{max(len(c) for c in clips) / 16000:.1f} s); "
              f"reply {args.reply_tokens} tokens, greedy")
        runs = {name: run_config(name, args, clips) for name in args.configs}
        names = list(runs)
        print()
        print("| turn | " + " | ".join(f"{n}: first token ms · prompt tokens · clips" for n in names) + " |")
        print("|---:|" + "---|" * len(names))
        for k in range(args.turns):
            cells = [f"{r[k]['first_token_ms']} · {r[k]['prompt_tokens']} · {r[k]['clips']}"
                     for r in (runs[n] for n in names)]
            print(f"| {k + 1} | " + " | ".join(cells) + " |")
        print()
        print("| config | first token p50, turns 1-5 (ms) | p50, turns 6+ (ms) | max clips | max prompt tokens "
              "| decode tok/s p50 |")
        print("|---|---:|---:|---:|---:|---:|")
        summary = {}
        for name in names:
            rows = runs[name]
            summary[name] = {"early_p50_ms": p50(r["first_token_ms"] for r in rows[:5]),
                             "late_p50_ms": p50(r["first_token_ms"] for r in rows[5:]),
                             "max_clips": max(r["clips"] for r in rows),
                             "max_prompt_tokens": max(r["prompt_tokens"] for r in rows),
                             "tokens_per_s_p50": p50(r["tokens_per_s"] for r in rows)}
            s = summary[name]
            print(f"| {name} | {s['early_p50_ms']} | {s['late_p50_ms']} | {s['max_clips']} | {s['max_prompt_tokens']} "
                  f"| {s['tokens_per_s_p50']} |")
    results.write("long-talk", printed.text, {"runs": runs, "summary": summary, "args": vars(args)}, argv)


if __name__ == "__main__":
    main()
