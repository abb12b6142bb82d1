"""Soak: N WebRTC clients take turns for M minutes against `python app.py` on 127.0.0.1.

    python bench/soak.py --clients 8 --minutes 10      # the full run (results: docs/benchmarks/)
    python bench/soak.py --clients 2 --minutes 1       # a quick look
    python bench/soak.py --clients 4 --minutes 3 --stagger   # turns that do not all end at once

The app runs in its own process (tiny random Voxtral unless --model); the clients are aiortc
clients in this one, each speaking an espeak-ng sentence every --every-s seconds, all at once (the
same sentences, so every turn ends at the same moment for all: the worst case) or with --stagger,
spread evenly over --every-s. Prints the server's
RSS, threads and open file descriptors (its model process included) every 30 s, then one table: turns sent and answered, end of
speech -> first reply text at the client (p50/p90/p99), and growth after warm-up. "Early": a reply came
before the sentence ended: the server took a pause inside it for the end of the turn, or (when it
falls behind) the reply to the turn before came that late; either way it counts as answered.
--app-args passes flags to app.py, e.g. --app-args="--log-level INFO" to log each turn's timings.
"""

import argparse
import asyncio
import contextlib
import os
import shlex
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import uvloop

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results  # noqa: E402  (bench/results.py)
import turn_latency  # noqa: E402  (bench/, next to this script)

from voxtral_app.audio.pcm import SAMPLE_RATE  # noqa: E402
from voxtral_app.client import Client  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def speech_clips() -> list[np.ndarray]:
    """espeak-ng sentences (2-3 s, no pause inside, trimmed to where speech ends): what a turn says."""
    return [turn_latency.espeak(text) for text in turn_latency.SENTENCES]


@contextlib.contextmanager
def app_process(model: str, sessions: int, extra: list[str] = ()):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(os.path.join(ROOT, "test-output", f"bench-app-{port}.log"), "w")
    process = subprocess.Popen([sys.executable, "app.py", "--model", model, "--port", str(port), "--max-sessions",
                                str(sessions), "--log-level", "WARNING", *extra], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if httpx.get(f"{url}/health", timeout=1).json()["status"] == "healthy":
                    break
            if process.poll() is not None:
                raise RuntimeError(f"the app exited; see {log.name}")
            time.sleep(0.1)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def usage(pid: int, url: str) -> dict:
    """The server's resident memory (MB), threads, open file descriptors and CPU seconds, from /proc:
    the app's process and its model process (app.py's --model-process) together."""
    out = {"rss_mb": 0.0, "threads": 0, "fds": 0, "cpu_s": 0.0}
    for process in [pid] + children(pid):
        status = open(f"/proc/{process}/status").read().split("\n")
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        ticks = open(f"/proc/{process}/stat").read().rsplit(")", 1)[1].split()[11:13]  # utime, stime
        out["rss_mb"] += int(fields["VmRSS"].split()[0]) / 1024
        out["threads"] += int(fields["Threads"])
        out["fds"] += len(os.listdir(f"/proc/{process}/fd"))
        out["cpu_s"] += sum(map(int, ticks)) / os.sysconf("SC_CLK_TCK")
    return {**out, "clients_cpu_s": sum(os.times()[:2]), **engine_time(url)}


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def engine_time(url: str) -> dict:
    """The decode thread's prefill and decode-step counts and seconds so far, from the app's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "engine_generations_in_flight":
            out["in_flight"] = family.samples[0].value
        if family.name == "model_inference_duration_seconds":
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    out[f"{sample.labels['phase']}{sample.name[len(family.name):]}"] = sample.value
    return out


def window(a: dict, b: dict) -> str:
    """What the server did between two samples: its CPU, and the decode thread's work."""
    seconds = max(1e-9, b["t"] - a["t"])
    steps = b.get("decode_count", 0) - a.get("decode_count", 0)
    prefills = b.get("prefill_count", 0) - a.get("prefill_count", 0)
    step_ms = 1000 * (b.get("decode_sum", 0) - a.get("decode_sum", 0)) / max(1, steps)
    prefill_ms = 1000 * (b.get("prefill_sum", 0) - a.get("prefill_sum", 0)) / max(1, prefills)
    return (f"server cpu={100 * (b['cpu_s'] - a['cpu_s']) / seconds:.0f}% clients cpu="
            f"{100 * (b['clients_cpu_s'] - a['clients_cpu_s']) / seconds:.0f}% decode {steps / seconds:.0f} "
            f"steps/s x {step_ms:.1f} ms, {prefills:.0f} prefills x {prefill_ms:.0f} ms, in flight {b.get('in_flight', 0):.0f}")


def users(history: list[dict]) -> int:
    """The person's turns in a page history: user messages but the captions (what Voxtral heard, in
    quotes, placed under a turn's clip when its transcript arrives, which may be after its reply)."""
    return sum(m["role"] == "user" and not (isinstance(m["content"], str) and m["content"].startswith("“"))
               for m in history)


async def talk(url: str, clips: list[np.ndarray], every_s: float, until: float, name: str, heard: dict,
               delay_s: float = 0.0) -> None:
    """One client: after `delay_s`, a turn every `every_s` until `until`. Records, per turn, end of speech
    -> the first text of its reply (s), None if none came within `every_s` + 10 s, "cut" if a reply came
    before the speech ended (a split sentence, or a late reply to the turn before), or "lost" (and
    stops) if the connection went dead."""
    client = await Client.connect(url)
    await asyncio.sleep(delay_s)
    silence = np.zeros(int(1.0 * SAMPLE_RATE), np.float32)
    seen = 0  # user turns in the last history this client saw
    try:
        turn = 0
        while time.monotonic() < until:
            started = time.monotonic()
            clip = clips[turn % len(clips)]
            before = seen
            try:  # the end of speech goes out in real time, unless the server has dropped the connection
                sent = await asyncio.wait_for(client.say(np.concatenate([clip, silence]), len(clip) / SAMPLE_RATE),
                                              len(clip) / SAMPLE_RATE + 10)
            except (TimeoutError, asyncio.TimeoutError):
                heard.setdefault(name, []).append("lost")
                return
            outcome = None
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                while outcome is None:
                    at, event = await client.next_event(max(0.1, started + every_s + 10 - time.monotonic()))
                    history = event["history"]
                    seen = users(history)
                    if seen > before and history[-1]["role"] == "assistant" and history[-1]["content"]:
                        outcome = at - sent if at >= sent else "cut"
            heard.setdefault(name, []).append(outcome)
            turn += 1
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                history = await client.reply(timeout=max(0.1, started + every_s - time.monotonic()), quiet_s=0.3)
                seen = users(history)
            await asyncio.sleep(max(0.0, started + every_s - time.monotonic()))
    finally:
        await client.close()


def percentile(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.0f}" if values else "-"


async def soak(url: str, pid: int, clients: int, minutes: float, every_s: float,
               stagger: bool = False) -> tuple[dict, list[dict]]:
    clips = speech_clips()
    until = time.monotonic() + minutes * 60
    heard: dict = {}
    samples = [{"t": 0, **usage(pid, url)}]
    started = time.monotonic()

    async def monitor():
        while time.monotonic() < until + 5:
            await asyncio.sleep(30)
            samples.append({"t": round(time.monotonic() - started), **(await asyncio.to_thread(usage, pid, url))})
            print(f"  t={samples[-1]['t']:>4}s rss={samples[-1]['rss_mb']:.0f} MB threads={samples[-1]['threads']} "
                  f"fds={samples[-1]['fds']} {window(samples[-2], samples[-1])}", flush=True)

    watcher = asyncio.create_task(monitor())
    delays = [i * every_s / clients if stagger else 0.0 for i in range(clients)]
    await asyncio.gather(*[talk(url, clips, every_s, until, f"client{i}", heard, delay)
                           for i, delay in enumerate(delays)])
    watcher.cancel()
    samples.append({"t": round(time.monotonic() - started), **usage(pid, url)})
    return heard, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every-s", type=float, default=6.0, help="each client speaks this often")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--stagger", action="store_true",
                        help="client i starts i * every-s / clients later (default: all at once, so every client's "
                             "sentence ends at the same moment as the others', each turn: the worst case)")
    parser.add_argument("--nice", type=int, default=0, help="run the clients at this niceness (the app keeps 0)")
    parser.add_argument("--app-args", default="", help="more flags for app.py, in one string")
    args = parser.parse_args()
    with results.recording() as printed:
        data = run(args)
    results.write("soak", printed.text, data)


def run(args: argparse.Namespace) -> dict:
    """The soak itself: prints the samples as they come and the table; -> the raw numbers."""
    os.makedirs(os.path.join(ROOT, "test-output"), exist_ok=True)
    with app_process(args.model, args.clients, shlex.split(args.app_args)) as (url, pid):
        if args.nice:
            os.nice(args.nice)  # the clients yield the CPU to the server (started first, it keeps its priority)
        # the clients' loop too: 8 aiortc peers in one process on asyncio's loop queue their packets the same way
        heard, samples = uvloop.run(soak(url, pid, args.clients, args.minutes, args.every_s, args.stagger))
    outcomes = [x for values in heard.values() for x in values]
    latencies = [x for x in outcomes if isinstance(x, float)]
    cuts = sum(x == "cut" for x in outcomes)
    lost = sum(x == "lost" for x in outcomes)
    sent = len(outcomes)
    warm = samples[min(1, len(samples) - 1)]
    settled = samples[min(4, len(samples) - 1)]  # 2 min: every conversation has a history by then
    print(f"\n{args.clients} clients, a turn every {args.every_s:g} s each{' (staggered)' if args.stagger else ''}, "
          f"{args.minutes:g} min, {args.model}"
          f"{f', {lost} connections lost' if lost else ''}\n")
    print("| turns sent | answered | early | first text p50 / p90 / p99 (ms) | RSS start -> 30 s -> 2 min -> end (MB) "
          "| threads 30 s -> end | fds 30 s -> end |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {sent} | {len(latencies) + cuts} | {cuts} | {percentile(latencies, 50)} / {percentile(latencies, 90)} / "
          f"{percentile(latencies, 99)} | {samples[0]['rss_mb']:.0f} -> {warm['rss_mb']:.0f} -> {settled['rss_mb']:.0f} -> "
          f"{samples[-1]['rss_mb']:.0f} | {warm['threads']} -> {samples[-1]['threads']} | "
          f"{warm['fds']} -> {samples[-1]['fds']} |")
    return {"clients": args.clients, "minutes": args.minutes, "every_s": args.every_s, "stagger": args.stagger,
            "model": args.model, "sent": sent, "answered": len(latencies) + cuts, "early": cuts, "lost": lost,
            "turns_by_client": heard, "samples": samples}  # a turn: seconds to first text, "cut", "lost" or None


if __name__ == "__main__":
    main()
