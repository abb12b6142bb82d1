"""What an accepted offer's SDP costs the event loop: aiortc parses it there a second time.

    python bench/sdp_parse.py

`check_offer` (serving/offers.py) parses an offer off the event loop and refuses one past the bounds
(SDP_MEDIA_SECTIONS, SDP_LINES_OF_A_KIND, SDP_LINES, SDP_CHARS, CANDIDATES_PER_CONNECTION); fastrtc then hands
the accepted SDP to aiortc, which parses it again on the loop. This times that parse for a real
aiortc offer, for offers made to sit at the bounds with the lines aiortc parses most slowly, and for
64 kB offers (the body cap) that the bounds now refuse, and prints a table.
"""

import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import results  # noqa: E402  (bench/results.py)
from aiortc import RTCPeerConnection  # noqa: E402
from aiortc.sdp import SessionDescription  # noqa: E402

from voxtral_app.serving import offers  # noqa: E402

REPEATS = 50
BODY_CAP = 65_536  # GuardOptions' cap of an offer's body
HEAD = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1 2 3\r\n"
LINES = {  # the attribute lines aiortc does the most work for
    "rtpmap": lambda k: f"a=rtpmap:{96 + k % 32} opus/48000/2\r\n",
    "fmtp": lambda k: f"a=fmtp:{96 + k % 32} minptime=10;useinbandfec=1;stereo=1;" + ";".join(
        f"p{i}={i}" for i in range(12)) + "\r\n",
    "long fmtp": lambda k: f"a=fmtp:{96 + k % 32} " + ";".join(f"p{i}={i}" for i in range(36)) + "\r\n",
    "rtcp-fb": lambda k: f"a=rtcp-fb:{96 + k % 32} nack pli\r\n",
    "ssrc": lambda k: f"a=ssrc:{1000 + k} cname:{'x' * 40}\r\n",
    "candidate": lambda k: f"a=candidate:{k} 1 udp 2130706431 10.0.0.{k % 250} {40000 + k} typ host\r\n",
}


def section(i: int, kinds: list[str], each: int) -> str:
    payloads = " ".join(str(96 + k) for k in range(32))
    body = "".join(LINES[kind](k) for kind in kinds for k in range(
        offers.CANDIDATES_PER_CONNECTION // 4 if kind == "candidate" else 32 if kind == "rtpmap" else each))
    return (f"m=audio 9 UDP/TLS/RTP/SAVPF {payloads}\r\nc=IN IP4 0.0.0.0\r\na=mid:{i}\r\na=ice-ufrag:abcd\r\n"
            "a=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=setup:actpass\r\na=fingerprint:sha-256 "
            + ":".join(["AB"] * 32) + "\r\n" + body)


def offer(kinds: list[str], sections: int, each: int, max_lines: int | None, max_chars: int = BODY_CAP) -> str:
    sdp = HEAD + "".join(section(i, kinds, each) for i in range(sections))
    lines = sdp.splitlines()[:max_lines]
    sdp = "\r\n".join(lines) + "\r\n"
    while len(json.dumps({"sdp": sdp, "type": "offer", "webrtc_id": "x" * 12})) > BODY_CAP or len(sdp) > max_chars:
        sdp = sdp[:sdp.rfind("\r\n", 0, len(sdp) - 2) + 2]
    return sdp


async def real_offer() -> str:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("text")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def parse_ms(sdp: str) -> tuple[float, float]:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        SessionDescription.parse(sdp)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


def main() -> None:
    kind = offers.SDP_LINES_OF_A_KIND
    cases = [("aiortc's own offer (audio, data channel)", asyncio.run(real_offer()))]
    for kinds in (["rtpmap", "rtcp-fb"], ["rtpmap", "fmtp", "rtcp-fb", "ssrc"], ["rtpmap", "fmtp", "ssrc", "candidate"],
                  ["rtpmap", "long fmtp"]):
        cases.append((f"at the bounds: {offers.SDP_MEDIA_SECTIONS} sections, up to {kind} lines each of "
                      f"{', '.join(kinds)}",
                      offer(kinds, offers.SDP_MEDIA_SECTIONS, kind, offers.SDP_LINES, offers.SDP_CHARS)))
    cases.append(("64 kB of a=ssrc lines in one section", offer(["ssrc"], 1, 2_000, None)))
    cases.append(("64 kB of a=rtcp-fb lines in one section", offer(["rtpmap", "rtcp-fb"], 1, 3_000, None)))
    cases.append(("64 kB of long a=fmtp lines in 4 sections", offer(["rtpmap", "long fmtp"], 4, kind, None)))
    rows = []
    for label, sdp in cases:
        try:
            offers.check_sdp(sdp)
            verdict = "accepted"
        except ValueError as error:
            verdict = f"refused ({error})"
        rows.append((label, len(sdp), len(sdp.splitlines()), verdict, *parse_ms(sdp)))
    with results.recording() as printed:
        print(f"\naiortc's SessionDescription.parse, {REPEATS} runs each, {os.cpu_count()} CPUs\n")
        print("| offer | bytes | lines | check_offer | parse median ms | parse max ms |")
        print("|---|---|---|---|---|---|")
        for label, size, lines, verdict, median, top in rows:
            print(f"| {label} | {size} | {lines} | {verdict} | {median:.2f} | {top:.2f} |")
    results.write("sdp-parse", printed.text, {"rows": rows})


if __name__ == "__main__":
    main()
