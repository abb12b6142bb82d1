"""Floods against `python app.py` on 127.0.0.1 while a live client keeps talking.

    python bench/abuse.py --seconds 60        # baseline minute, then a minute under every flood
    python bench/abuse.py --v1 --seconds 30   # a /v1 streaming user alone, then beside a long-prompt flood

A live WebRTC client speaks a sentence every 6 s throughout. First alone (baseline), then while
this process floods the server, all at once: idle phone sockets that only say `start` (each holds
a slot until its 10 s media deadline), WebRTC offers that never connect, 20 MB request bodies,
/outputs readers guessing tokens, and WebSocket junk. Prints the live client's end of speech ->
first reply text p50/p90, whether it was ever refused or missed a reply, and what the floods got.

`--v1`: a /v1 client streams short replies (its first token and tokens/s measured) alone, then while
attackers loop ~7,500-token prompts with `max_tokens: 1` (the engine must keep stepping its reply
and let its short prompt in between the long ones' prefill pieces).
"""

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter

import httpx
import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import results  # noqa: E402  (bench/results.py)
from soak import ROOT, app_process, percentile, speech_clips, talk  # noqa: E402


async def idle_phone_sockets(ws_url: str, until: float, tally: Counter) -> None:
    while time.monotonic() < until:
        try:
            async with websockets.connect(ws_url + "/telephone/handler") as ws:
                await ws.send(json.dumps({"event": "start", "streamSid": f"MZflood{os.urandom(6).hex()}",
                                          "start": {"callSid": "CAflood"}}))
                try:
                    while time.monotonic() < until:
                        message = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, until - time.monotonic())))
                        if message.get("meta", {}).get("error") == "concurrency_limit_reached":
                            tally["idle socket refused: server full"] += 1
                except websockets.ConnectionClosed:
                    tally["idle socket closed by the server"] += 1
        except (OSError, websockets.WebSocketException, asyncio.TimeoutError, TimeoutError):
            tally["idle socket failed to open"] += 1


async def ghost_offers(url: str, until: float, tally: Counter) -> None:
    from aiortc import RTCPeerConnection

    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < until:
            pc = RTCPeerConnection()
            pc.addTransceiver("audio", direction="sendrecv")
            await pc.setLocalDescription(await pc.createOffer())
            response = await http.post(f"{url}/webrtc/offer", json={
                "sdp": pc.localDescription.sdp, "type": "offer", "webrtc_id": f"ghost{os.urandom(6).hex()}"})
            await pc.close()
            tally[f"ghost offer: {response.status_code}"] += 1
            await asyncio.sleep(0.5)


async def big_bodies(url: str, until: float, tally: Counter) -> None:
    host, port = url.split("//")[1].split(":")
    while time.monotonic() < until:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST /webrtc/offer HTTP/1.1\r\nHost: {host}\r\nContent-Length: {20 * 1_048_576}\r\n\r\n".encode()
                     + b"x" * 65_536)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        status = await reader.readline()
        tally[f"20 MB offer: {status.decode().split(' ')[1] if status else 'no answer'}"] += 1
        writer.close()
        await asyncio.sleep(0.2)


async def token_guesses(url: str, until: float, tally: Counter) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < until:
            response = await http.get(f"{url}/outputs", params={"webrtc_id": f"guess{os.urandom(4).hex()}",
                                                                "token": "guess"})
            tally[f"/outputs guess: {response.status_code}"] += 1
            await asyncio.sleep(0.1)


async def junk(ws_url: str, until: float, tally: Counter) -> None:
    while time.monotonic() < until:
        with contextlib.suppress(OSError, websockets.WebSocketException):
            async with websockets.connect(ws_url + "/websocket/offer") as ws:
                for message in (b"\x00" * 1000, "{not json", json.dumps({"event": "stop"}), "x" * 100_000):
                    await ws.send(message)
                    tally["junk answered"] += bool(await asyncio.wait_for(ws.recv(), 5))
        await asyncio.sleep(0.2)


LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 230  # ~2,500 tokens (a message may have 32,000
LONG_PROMPT = [{"role": role, "content": LONG_TEXT} for role in ("user", "assistant", "user")]  # characters)


async def long_prompts(url: str, model: str, until: float, tally: Counter, outside: bool = False) -> None:
    """`outside`: from one address beyond the proxy (X-Forwarded-For), where the per-address limits apply."""
    headers = {"X-Forwarded-For": "203.0.113.99"} if outside else {}
    async with httpx.AsyncClient(timeout=120, headers=headers) as http:
        while time.monotonic() < until:
            response = await http.post(f"{url}/v1/chat/completions", json={
                "model": model, "max_tokens": 1, "messages": LONG_PROMPT})
            tally[f"long prompt: {response.status_code}"] += 1


async def v1_user(url: str, model: str, until: float, turns: list) -> None:
    """Short streamed replies back to back: (first token s, tokens/s after it) each."""
    async with httpx.AsyncClient(timeout=120) as http:
        while time.monotonic() < until:
            started, first, pieces = time.perf_counter(), None, 0
            async with http.stream("POST", f"{url}/v1/chat/completions", json={
                    "model": model, "max_tokens": 64, "stream": True, "temperature": 0,
                    "messages": [{"role": "user", "content": "Tell me a story."}]}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"] and \
                            json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        first = first or time.perf_counter()
                        pieces += 1
            if first is not None:
                ended = time.perf_counter()
                turns.append((first - started, (pieces - 1) / (ended - first) if ended > first else None))
            await asyncio.sleep(0.5)


async def run_v1(url: str, seconds: float, attackers: int, outside: bool = False) -> tuple[list, Counter]:
    until = time.monotonic() + seconds
    tally: Counter = Counter()
    turns: list = []
    async with httpx.AsyncClient(timeout=10) as http:
        model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]

    async def floods():
        await asyncio.sleep(1)
        await asyncio.gather(*[long_prompts(url, model, until, tally, outside) for _ in range(attackers)])

    await asyncio.gather(v1_user(url, model, until, turns), floods())
    return turns, tally


def v1_table(url: str, seconds: float) -> list:
    rows = []
    for attackers, outside in ((0, False), (1, False), (3, False), (3, True)):
        turns, tally = asyncio.run(run_v1(url, seconds, attackers, outside))
        rates = [rate for _, rate in turns if rate is not None]
        rows.append((f"{attackers} from one outside address" if outside else attackers, len(turns),
                     percentile([first for first, _ in turns], 50),
                     f"{statistics.median(rates):.0f}" if rates else "-", dict(tally)))
    return rows


async def run(url: str, seconds: float, flood: bool) -> tuple[list, Counter]:
    until = time.monotonic() + seconds
    heard: dict = {}
    tally: Counter = Counter()
    ws_url = url.replace("http", "ws")

    async def floods():
        await asyncio.sleep(3)  # the live user connected first; the floods then try to crowd it out
        await asyncio.gather(*[idle_phone_sockets(ws_url, until, tally) for _ in range(4)],
                             ghost_offers(url, until, tally), big_bodies(url, until, tally),
                             token_guesses(url, until, tally), junk(ws_url, until, tally))

    live = talk(url, speech_clips(), 6.0, until, "live", heard)
    outcome = await asyncio.gather(live, *([floods()] if flood else []), return_exceptions=True)
    if isinstance(outcome[0], Exception):  # the live client could not even connect: refused
        tally[f"live client refused: {outcome[0]}"] += 1
    return heard.get("live", []), tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--v1", action="store_true", help="the /v1 long-prompt flood instead")
    args = parser.parse_args()
    os.makedirs(os.path.join(ROOT, "test-output"), exist_ok=True)
    if args.v1:
        return main_v1(args)
    rows = []
    with app_process("tiny-random", args.sessions) as (url, _):
        for name, flood in (("alone", False), ("under every flood", True)):
            latencies, tally = asyncio.run(run(url, args.seconds, flood))
            answered = [x for x in latencies if isinstance(x, float)]  # talk() marks "cut" and "lost" turns too
            refused = any(key.startswith("live client refused") for key in tally)
            cut = sum(x in ("cut", "lost") for x in latencies)
            rows.append((name, len(latencies), len(answered), answered, cut, refused, tally))
    with results.recording() as printed:
        print(f"\nlive client: a turn every 6 s for {args.seconds:g} s; --max-sessions {args.sessions}; tiny-random\n")
        print("| live client | turns | answered | cut or lost | first text p50 / p90 (ms) | ever refused | "
              "what the floods got |")
        print("|---|---|---|---|---|---|---|")
        for name, turns, answered, latencies, cut, refused, tally in rows:
            got = ", ".join(f"{key} x{count}" for key, count in sorted(tally.items())) or "-"
            print(f"| {name} | {turns} | {answered} | {cut} | {percentile(latencies, 50)} / "
                  f"{percentile(latencies, 90)} | {'yes' if refused else 'no'} | {got} |")
    results.write("abuse", printed.text, {"rows": rows})


def main_v1(args) -> None:
    with app_process("tiny-random", args.sessions) as (url, _):
        rows = v1_table(url, args.seconds)
    with results.recording() as printed:
        print(f"\n/v1 user: 64-token streamed replies back to back for {args.seconds:g} s; attackers loop "
              f"~7,500-token prompts with max_tokens 1; --max-sessions {args.sessions}; tiny-random. Attackers "
              "on loopback have no per-address limits (the engine's scheduling alone); from outside (through "
              "the trusted local proxy) --opens-per-minute and --v1-in-flight apply\n")
        print("| attackers | replies | first token p50 (ms) | tok/s p50 | what the attackers got |")
        print("|---|---|---|---|---|")
        for attackers, replies, first, rate, tally in rows:
            got = ", ".join(f"{key} x{count}" for key, count in sorted(tally.items())) or "-"
            print(f"| {attackers} | {replies} | {first} | {rate} | {got} |")
    results.write("abuse-v1", printed.text, {"rows": rows})


if __name__ == "__main__":
    main()
