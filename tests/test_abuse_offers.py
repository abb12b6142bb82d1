"""Offers and sockets against hoarding (issue 29): at most 2 unconnected offers, unstarted or quiet
sockets per client address on every route, and SDP within bounds. Real servers, aiortc offers,
websockets; other addresses come through the trusted local proxy (X-Forwarded-For)."""

import asyncio
import json
import secrets
import time

import httpx
import pytest
import websockets
from conftest import app_options
from servers import BackgroundServer

from voxtral_app.client import Client
from voxtral_app.serving import offers
from voxtral_app.serving.access import CANDIDATES_PER_CONNECTION, AccessOptions
from voxtral_app.serving.app import ServerOptions, create_app
from voxtral_app.serving.offers import check_offer

HOARDER, NEWCOMER = "203.0.113.21", "203.0.113.22"
SWEEP_EVERY_S = 0.2  # the app's 1 s, shortened: quicker tests


@pytest.fixture(scope="module")
def served(app_engine):
    options = ServerOptions(access=AccessOptions(sweep_every_s=SWEEP_EVERY_S))
    server = BackgroundServer(create_app(app_engine, app_options(app_engine, reply_tokens=8), options))
    now = [time.monotonic()]
    server.app.state.connections.clock = lambda: now[0]  # moved by hand past the deadlines
    server.now = now
    yield server
    server.stop()


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "timed out"
        time.sleep(0.05)


async def sdp_offer() -> str:
    """A real offer, as the tests' WebRTC client makes it: audio and a data channel."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("text")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()  # never answers ICE: the server's side can only wait
    return sdp


def offer_body(sdp: str) -> dict:
    return {"sdp": sdp, "type": "offer", "webrtc_id": secrets.token_hex(6)}


def page_offer(server, body: dict) -> dict:
    component = next(b._id for b in server.app.state.ui.blocks.values() if type(b).__name__ == "WebRTC")
    return {"session_hash": secrets.token_hex(5), "component_id": component, "fn_name": "offer", "data": body}


def visitor(address: str) -> httpx.Client:
    return httpx.Client(timeout=30, headers={"X-Forwarded-For": address})


def test_ghost_offers_count_against_their_address_on_both_offer_routes(served):
    connections = served.app.state.connections
    sdp = asyncio.run(sdp_offer())

    async def connect_for_real():  # an offer that connects holds nothing once it is up
        client = Client(served.url)
        client.http.headers["X-Forwarded-For"] = HOARDER
        await client.start({})
        try:
            await asyncio.to_thread(wait_until, lambda: connections.pending(HOARDER) == 0)
        finally:
            await client.close()

    asyncio.run(connect_for_real())
    with visitor(HOARDER) as hoarder, visitor(NEWCOMER) as newcomer:
        ghost_offer = offer_body(sdp)
        ghost = hoarder.post(served.url + "/webrtc/offer", json=ghost_offer)
        repeated = hoarder.post(served.url + "/webrtc/offer", json=ghost_offer)  # must not free the first's place
        held_after_repeating = connections.pending(HOARDER)
        page = hoarder.post(served.url + "/gradio_api/component_server", json=page_offer(served, offer_body(sdp)))
        third = hoarder.post(served.url + "/webrtc/offer", json=offer_body(sdp))
        third_on_the_page = hoarder.post(served.url + "/gradio_api/component_server",
                                         json=page_offer(served, offer_body(sdp))).json()
        arrived = newcomer.post(served.url + "/webrtc/offer", json=offer_body(sdp))
        wait_until(lambda: all(hold.seen for hold in connections.holds.values()))  # the sweeper's clock starts
        served.now[0] += 11  # past the offer deadline: the sweeper drops the ghosts, and their holds
        wait_until(lambda: connections.pending(HOARDER) == 0 and connections.pending(NEWCOMER) == 0)
        again = hoarder.post(served.url + "/webrtc/offer", json=offer_body(sdp))
        wait_until(lambda: all(hold.seen for hold in connections.holds.values()))
        served.now[0] += 11
        wait_until(lambda: connections.pending(HOARDER) == 0)
    assert page.status_code == 200 and "sdp" in page.json(), page.text
    assert ghost.status_code == 200 and "sdp" in ghost.json()
    assert repeated.status_code in (409, 429) and held_after_repeating == 1
    assert third.status_code == 429 and third.json()["meta"]["error"] == "too_many_pending"
    assert third_on_the_page["status"] == "failed" and third_on_the_page["meta"]["error"] == "too_many_pending"
    assert arrived.status_code == 200 and "sdp" in arrived.json()  # a newcomer still gets in
    assert again.status_code == 200 and "sdp" in again.json()


async def opened(url: str, address: str, path: str = "/websocket/offer"):
    """A socket from `address`, if the server took it (it answers a ping before `start`); else the close code."""
    ws = await websockets.connect(url.replace("http", "ws") + path, additional_headers={"X-Forwarded-For": address})
    try:
        await ws.send(json.dumps({"event": "ping"}))
        while json.loads(await asyncio.wait_for(ws.recv(), 10))["event"] != "pong":
            pass
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code
    return ws


async def start(ws) -> dict:
    await ws.send(json.dumps({"event": "start", "websocket_id": secrets.token_hex(6)}))
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


def test_unstarted_and_quiet_sockets_count_against_their_address(served):
    connections = served.app.state.connections
    audio = {"event": "media", "media": {"payload": "//////////8="}}  # mu-law silence: audio all the same
    said_nothing = {"event": "media", "media": {"payload": ""}}

    async def run():
        url = served.url
        first = await opened(url, HOARDER)
        phone = await opened(url, HOARDER, "/telephone/handler")
        refused = await opened(url, HOARDER)
        newcomer = await opened(url, NEWCOMER)
        newcomer_started = await start(newcomer)
        first_started = await start(first)  # a started socket holds nothing ...
        fourth = await opened(url, HOARDER)
        await first.send(json.dumps(said_nothing))
        served.now[0] += 11  # ... until it has been quiet for 10 s
        refused_quiet = await opened(url, HOARDER)
        await first.send(json.dumps(audio))
        await asyncio.to_thread(wait_until, lambda: connections.pending(HOARDER) == 2)  # the phone, the fourth
        await fourth.close()
        await asyncio.to_thread(wait_until, lambda: connections.pending(HOARDER) == 1)  # a closed socket lets go
        fifth = await opened(url, HOARDER)
        for ws in (first, phone, newcomer, fifth):
            await ws.close()
        return refused, newcomer_started, first_started, fourth, refused_quiet, fifth

    refused, newcomer_started, first_started, fourth, refused_quiet, fifth = asyncio.run(run())
    assert refused == 4429 and refused_quiet == 4429
    assert newcomer_started["event"] == "token" and first_started["event"] == "token"
    assert not isinstance(fourth, int) and not isinstance(fifth, int)
    wait_until(lambda: connections.pending(HOARDER) == 0)  # each closed socket let go


def sdp_with(extra: str, sections: int = 2) -> str:
    """An audio offer of `sections` sections, each ending in `extra`."""
    head = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    section = ("m=audio 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:96 opus/48000/2\r\n"
               "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n")
    return head + (section + extra) * sections


@pytest.mark.parametrize("sdp, why", [
    (sdp_with("", offers.SDP_MEDIA_SECTIONS + 1), "media sections"),
    (sdp_with("".join(f"a=candidate:{i} 1 udp 1 10.0.0.1 {1000 + i} typ host\r\n"  # half in each section
                      for i in range(CANDIDATES_PER_CONNECTION // 2 + 1))), "ICE candidates"),
    (sdp_with("".join(f"a=ssrc:{i} cname:x\r\n" for i in range(offers.SDP_LINES_OF_A_KIND + 1)), 1),
     "'a=ssrc' lines"),
    (sdp_with("".join(f"a=x-{i}:1\r\n" for i in range(offers.SDP_LINES)), 1), "lines"),
    (sdp_with("a=fmtp:96 " + ";".join(f"p{i}=1" for i in range(offers.SDP_CHARS // 5)) + "\r\n", 1), "characters"),
])
def test_offers_past_the_sdp_bounds_are_refused_on_both_routes(served, sdp, why):
    body = offer_body(sdp)
    with pytest.raises(ValueError, match=why):
        check_offer(json.dumps(body).encode())
    with visitor(NEWCOMER) as http:
        direct = http.post(served.url + "/webrtc/offer", json=body)
        page = http.post(served.url + "/gradio_api/component_server", json=page_offer(served, body)).json()
    assert direct.status_code == 400 and why in direct.json()["message"]
    assert page["status"] == "failed" and why in page["message"]


def test_real_offers_are_within_the_bounds_and_trickled_candidates_are_counted(served):
    sdp = asyncio.run(sdp_offer())
    body = offer_body(sdp)
    assert check_offer(json.dumps(body).encode()).sdp == sdp
    named = sdp.count("a=candidate:")
    with httpx.Client(timeout=30) as http:  # loopback: candidates are counted for every address
        assert http.post(served.url + "/webrtc/offer", json=body).status_code == 200

        def trickle(i: int):
            return http.post(served.url + "/webrtc/offer", json={"type": "ice-candidate", "webrtc_id": body["webrtc_id"],
                             "candidate": {"candidate": f"candidate:{i} 1 udp 1 192.0.2.9 {2000 + i} typ host generation 0 ufrag x",
                                           "sdpMid": "0", "sdpMLineIndex": 0}})

        taken = [trickle(i) for i in range(CANDIDATES_PER_CONNECTION - named)]
        over = trickle(99)
    assert all(r.status_code == 200 and r.json()["status"] == "success" for r in taken), [r.text for r in taken]
    assert over.status_code == 400 and over.json()["meta"]["error"] == "too_many_candidates"


def test_sessions_offers_and_sockets_share_one_count_and_a_quiet_session_socket_counts(served):
    connections = served.app.state.connections
    visitor_address = "203.0.113.23"

    async def run():
        async with httpx.AsyncClient(timeout=30, headers={"X-Forwarded-For": visitor_address}) as http:
            create = lambda: http.post(served.url + "/session/create")  # noqa: E731
            created = (await create()).json()
            session = await websockets.connect(served.url.replace("http", "ws") + created["websocket_url"],
                                               additional_headers={"X-Forwarded-For": visitor_address})
            unstarted = [await opened(served.url, visitor_address) for _ in range(2)]
            over_by_sockets = (await create()).status_code  # two sockets not started: the session route refuses
            served.now[0] += 11  # the session's socket has said nothing for 10 s: it counts too
            await unstarted[0].close()
            await asyncio.sleep(3 * SWEEP_EVERY_S)  # the sweeper passes meanwhile: it must not forget the session
            held = connections.pending(visitor_address)  # the quiet session socket and the other unstarted one
            over_by_quiet = (await create()).status_code
            await session.send(b"\x00\x00" * 1600)  # 0.1 s of 16 kHz audio (silence all the same)
            await asyncio.to_thread(wait_until, lambda: connections.pending(visitor_address) == 1)
            again = await create()
            for ws in (session, unstarted[1]):
                await ws.close()
            return over_by_sockets, held, over_by_quiet, again

    over_by_sockets, held, over_by_quiet, again = asyncio.run(run())
    assert over_by_sockets == 429 and over_by_quiet == 429 and held == 2
    assert again.status_code == 200, again.text
