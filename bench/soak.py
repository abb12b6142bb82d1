"""Soak: N WebRTC clients take turns for M minutes against `python app.py` on 127.0.0.1.

    python bench/soak.py --clients 8 --minutes 10      # the README's table
    python bench/soak.py --clients 2 --minutes 1       # a quick look

The app runs in its own process (tiny random Voxtral unless --model); the clients are aiortc
clients in this one, each speaking a real sentence every --every-s seconds. Prints the server's
RSS, threads and open file descriptors every 30 s, then one table: turns sent and answered, end of
speech -> first reply text at the client (p50/p90/p99), and growth after warm-up.
"""

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from voxtral_app.audio import SAMPLE_RATE, prepare, read_wav  # noqa: E402
from voxtral_app.client import Client  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def speech_clips() -> list[np.ndarray]:
    import importlib.util

    path = os.path.join(os.path.dirname(importlib.util.find_spec("fastrtc").origin), "speech_to_text", "test_file.wav")
    speech = prepare(*read_wav(path), max_seconds=300)
    return [speech[i * SAMPLE_RATE: (i + 2) * SAMPLE_RATE] for i in range(0, 8, 2)]  # 2 s sentences


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


def usage(pid: int) -> dict:
    """The server's resident memory (MB), threads and open file descriptors, from /proc."""
    status = open(f"/proc/{pid}/status").read().split("\n")
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


async def talk(url: str, clips: list[np.ndarray], every_s: float, until: float, name: str, results: dict) -> None:
    """One client: a turn every `every_s` until `until`; records (sent, first-text latency or None)."""
    client = await Client.connect(url)
    silence = np.zeros(int(1.0 * SAMPLE_RATE), np.float32)
    try:
        turn = 0
        while time.monotonic() < until:
            started = time.monotonic()
            clip = clips[turn % len(clips)]
            sent = await client.say(np.concatenate([clip, silence]), len(clip) / SAMPLE_RATE)
            latency = None
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                while latency is None:
                    at, event = await client.next_event(max(0.1, started + every_s + 10 - time.monotonic()))
                    history = event["history"]
                    users = sum(m["role"] == "user" for m in history)
                    if users > turn and history[-1]["role"] == "assistant" and history[-1]["content"]:
                        latency = at - sent
            results.setdefault(name, []).append(latency)
            turn += 1
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await client.reply(timeout=max(0.1, started + every_s - time.monotonic()), quiet_s=0.3)
            await asyncio.sleep(max(0.0, started + every_s - time.monotonic()))
    finally:
        await client.close()


def percentile(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.0f}" if values else "-"


async def soak(url: str, pid: int, clients: int, minutes: float, every_s: float) -> tuple[dict, list[dict]]:
    clips = speech_clips()
    until = time.monotonic() + minutes * 60
    results: dict = {}
    samples = [{"t": 0, **usage(pid)}]
    started = time.monotonic()

    async def monitor():
        while time.monotonic() < until + 5:
            await asyncio.sleep(30)
            samples.append({"t": round(time.monotonic() - started), **usage(pid)})
            print(f"  t={samples[-1]['t']:>4}s rss={samples[-1]['rss_mb']:.0f} MB threads={samples[-1]['threads']} "
                  f"fds={samples[-1]['fds']}", flush=True)

    watcher = asyncio.create_task(monitor())
    await asyncio.gather(*[talk(url, clips, every_s, until, f"client{i}", results) for i in range(clients)])
    watcher.cancel()
    samples.append({"t": round(time.monotonic() - started), **usage(pid)})
    return results, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every-s", type=float, default=6.0, help="each client speaks this often")
    parser.add_argument("--model", default="tiny-random")
    args = parser.parse_args()
    os.makedirs(os.path.join(ROOT, "test-output"), exist_ok=True)
    with app_process(args.model, args.clients) as (url, pid):
        results, samples = asyncio.run(soak(url, pid, args.clients, args.minutes, args.every_s))
    latencies = [x for values in results.values() for x in values if x is not None]
    sent = sum(len(values) for values in results.values())
    warm = samples[min(1, len(samples) - 1)]
    print(f"\n{args.clients} clients, a turn every {args.every_s:g} s each, {args.minutes:g} min, {args.model}\n")
    print("| turns sent | answered | first text p50 / p90 / p99 (ms) | RSS start -> 30 s -> end (MB) "
          "| threads 30 s -> end | fds 30 s -> end |")
    print("|---|---|---|---|---|---|")
    print(f"| {sent} | {len(latencies)} | {percentile(latencies, 50)} / {percentile(latencies, 90)} / "
          f"{percentile(latencies, 99)} | {samples[0]['rss_mb']:.0f} -> {warm['rss_mb']:.0f} -> "
          f"{samples[-1]['rss_mb']:.0f} | {warm['threads']} -> {samples[-1]['threads']} | "
          f"{warm['fds']} -> {samples[-1]['fds']} |")


if __name__ == "__main__":
    main()
