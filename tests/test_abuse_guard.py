"""The front door against hostile clients (issue 29): auth on every route, throttled guesses, trusted
proxies, JSON depth, NaN, compressed-audio bombs, phone call tokens. Real servers, real clients."""

import asyncio
import io
import json
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets
from conftest import app_options
from servers import BackgroundServer

from voxtral_app.serving.app import ServerOptions, create_app
from voxtral_app.serving.guard import GuardOptions
from voxtral_app.serving.sockets import call_token

DEEP = ("[" * 1500 + "]" * 1500).encode()  # Python's json module gives up (RecursionError) ~1000 down


def client(address: str = "127.0.0.1", **headers) -> httpx.Client:
    return httpx.Client(timeout=30, headers=headers, transport=httpx.HTTPTransport(local_address=address))


@pytest.fixture(scope="module")
def server(app_engine):
    served = BackgroundServer(create_app(app_engine, app_options(app_engine, reply_tokens=8)))
    yield served
    served.stop()


async def first_answer(url: str, message: str):
    """The first message the server sends back (or the close code if it closes first)."""
    try:
        async with websockets.connect(url) as ws:
            await ws.send(message)
            return json.loads(await asyncio.wait_for(ws.recv(), 10))
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code


def test_an_address_has_two_v1_requests_in_flight_at_most(server, app_engine):
    """A client looping long /v1 prompts gets a bounded share of the engine: its third request in flight
    gets 429, while another address is served and its own next one is served once one has ended."""
    body = {"model": app_engine.options.model, "stream": True, "max_tokens": 2000, "temperature": 1.0,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    url = server.url + "/v1/chat/completions"
    for _ in range(300):  # the slots earlier tests' sessions held are free again (unconnected ones expire in 10 s)
        if len(app_engine.free_slots) == app_engine.options.slots:
            break
        time.sleep(0.05)
    with client(**{"X-Forwarded-For": "203.0.113.60"}) as greedy, \
            client(**{"X-Forwarded-For": "203.0.113.61"}) as other:
        with greedy.stream("POST", url, json=body) as first, greedy.stream("POST", url, json=body) as second:
            assert (first.status_code, second.status_code) == (200, 200)
            third = greedy.post(url, json=body | {"stream": False, "max_tokens": 1})
            assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_requests"
            answered = other.post(url, json=body | {"stream": False, "max_tokens": 1})
            assert answered.status_code == 200, answered.text
        for _ in range(100):  # both streams were closed: the server sees them go
            again = greedy.post(url, json=body | {"stream": False, "max_tokens": 1})
            if again.status_code != 429:
                break
        assert again.status_code == 200
    front_end = GuardOptions(front_end_ips=("203.0.113.0/28",))  # --front-end-ips: many people's turns each
    served = BackgroundServer(create_app(app_engine, app_options(app_engine), options=ServerOptions(guard=front_end)))
    url = served.url + "/v1/chat/completions"
    try:
        with client(**{"X-Forwarded-For": "203.0.113.7"}) as http, http.stream("POST", url, json=body) as first, \
                http.stream("POST", url, json=body) as second:
            third = http.post(url, json=body | {"stream": False, "max_tokens": 1})
            assert (first.status_code, second.status_code, third.status_code) == (200, 200, 200)
    finally:
        served.stop()


def test_json_nested_thousands_deep_gets_400_or_an_error_event(server, app_engine):
    with client() as http:
        codes = {path: http.post(server.url + path, content=DEEP, headers={"content-type": "application/json"})
                 for path in ("/input", "/session/create", "/v1/chat/completions", "/webrtc/offer")}
        session = http.post(server.url + "/session/create").json()["session_id"]
    ws = server.url.replace("http", "ws")
    offer = asyncio.run(first_answer(ws + "/websocket/offer", DEEP.decode()))
    audio = asyncio.run(first_answer(f"{ws}/ws/audio/{session}", DEEP.decode()))
    assert {path: r.status_code for path, r in codes.items()} == dict.fromkeys(codes, 400)
    assert all("Traceback" not in r.text for r in codes.values())
    assert offer["event"] == "error" and "nested" in offer["message"], offer
    assert audio["type"] == "error" and audio["code"] == "bad_json", audio


def test_a_nan_temperature_is_refused_without_taking_a_slot(server):
    sessions = server.app.state.sessions.sessions
    before = set(sessions)
    with client() as http:
        nan = http.post(server.url + "/session/create", content=b'{"temperature": NaN}',
                        headers={"content-type": "application/json"})
        infinite = http.post(server.url + "/session/create", content=b'{"temperature": Infinity}',
                             headers={"content-type": "application/json"})
        opened = set(sessions) - before
        created = http.post(server.url + "/session/create", json={}).json()
    assert (nan.status_code, infinite.status_code) == (400, 400)
    assert not opened  # no session, so no slot, for either
    assert created["session_id"] in sessions and created["expires_in_s"] <= 10


def test_a_compressed_audio_bomb_is_refused_from_its_header(server):
    """237 kB of FLAC held 10 minutes of 8-channel silence: ~920 MB decoded. Refused unread now."""
    flac = io.BytesIO()
    sf.write(flac, np.zeros((16_000 * 600, 8), np.float32), 16_000, format="FLAC")
    with client() as http:
        model = http.get(server.url + "/v1/models").json()["data"][0]["id"]
        transcribed = http.post(server.url + "/v1/audio/transcriptions", files={"file": ("a.flac", flac.getvalue())},
                                data={"model": model})
    assert transcribed.status_code == 400
    assert "600 s long" in transcribed.json()["error"]["message"]


def test_with_an_auth_token_every_route_but_health_needs_it(app_engine):
    secret = "s3cret-token"
    served = BackgroundServer(create_app(app_engine, app_options(app_engine),
                                         options=ServerOptions(guard=GuardOptions(auth_token=secret))))
    ws = served.url.replace("http", "ws")
    try:
        start = json.dumps({"event": "start", "streamSid": "MZforged0001", "start": {"callSid": "CA1"}})
        forged = asyncio.run(first_answer(ws + "/telephone/handler", start))
        with client() as http:
            health = http.get(served.url + "/health").status_code
            page_api = http.post(served.url + "/gradio_api/queue/join", json={}).status_code
            incoming = http.post(served.url + "/telephone/incoming", data={"CallSid": "CA1"}).status_code
            guesses = [http.get(served.url + "/metrics", headers={"Authorization": f"Bearer guess{i}"}).status_code
                       for i in range(11)]
            right_but_throttled = http.get(served.url + "/metrics",
                                           headers={"Authorization": f"Bearer {secret}"}).status_code
        with client("127.0.0.2", Authorization=f"Bearer {secret}") as elsewhere:
            right = elsewhere.get(served.url + "/metrics").status_code
        with client(**{"X-Forwarded-For": "203.0.113.50"}) as visitor:  # through the trusted local proxy
            logins = [visitor.post(served.url + "/login", data={"username": "me", "password": f"guess{i}"}).status_code
                      for i in range(11)]
    finally:
        served.stop()
    assert health == 200
    assert page_api in (401, 403)  # gradio's own login
    assert incoming == 401 and forged == 4401  # no Twilio signing configured: the phone needs the token
    assert guesses == [401] * 8 + [429] * 3  # 10 wrong a minute: the two phone requests were the first two
    assert right_but_throttled == 429 and right == 200  # throttled per address, without an oracle
    assert all(400 <= code < 500 and code != 429 for code in logins[:10]) and logins[10] == 429, logins


def test_one_call_token_opens_one_stream(app_engine):
    served = BackgroundServer(create_app(app_engine, app_options(app_engine),
                                         options=ServerOptions(twilio_auth_token="twilio-secret")))
    url = served.url.replace("http", "ws") + "/telephone/handler"

    async def run():
        params = {"token": call_token("twilio-secret", "CA77")}
        start = {"event": "start", "start": {"callSid": "CA77", "customParameters": params}}
        async with websockets.connect(url) as first:
            await first.send(json.dumps({**start, "streamSid": "MZfirst00001"}))
            await asyncio.sleep(0.5)
            return await first_answer(url, json.dumps({**start, "streamSid": "MZsecond0001"}))

    try:
        second = asyncio.run(run())
    finally:
        served.stop()
    assert second["event"] == "error" and "already has its stream" in second["message"], second


def test_the_rate_limit_keys_on_x_forwarded_for_only_from_a_trusted_proxy(app_engine):
    guard = GuardOptions(opens_per_minute=2)  # trusts loopback proxies, as by default
    served = BackgroundServer(create_app(app_engine, app_options(app_engine), options=ServerOptions(guard=guard)))
    try:
        def opens(address: str, forwarded: str) -> list[int]:
            with client(address, **{"X-Forwarded-For": forwarded}) as http:
                return [http.post(served.url + "/session/create", content=b"not json").status_code
                        for _ in range(3)]

        via_proxy = opens("127.0.0.1", "203.0.113.5")
        other_visitor = opens("127.0.0.1", "198.51.100.1, 203.0.113.6")  # a forged first hop: the proxy's counts
        untrusted = opens("127.0.0.2", "203.0.113.7")  # not a proxy: its own (loopback, exempt) address counts
    finally:
        served.stop()
    assert via_proxy == [400, 400, 429]  # one visitor behind the proxy, limited by its own address
    assert other_visitor == [400, 400, 429]  # another visitor has its own bucket
    assert untrusted == [400, 400, 400]


def test_the_pages_own_offer_route_is_capped_checked_off_the_loop_and_counted(app_engine):
    from voxtral_app.compat.fastrtc import page_components

    guard = GuardOptions(opens_per_minute=2, limit_loopback=True)
    served = BackgroundServer(create_app(app_engine, app_options(app_engine), options=ServerOptions(guard=guard)))
    component = page_components(served.app.state.ui)[0]._id

    def offer(sdp: str):
        return {"session_hash": "abcdef1234", "component_id": component, "fn_name": "offer",
                "data": {"sdp": sdp, "type": "offer", "webrtc_id": "pageoffer0001"}}

    try:
        with client() as http:
            url = served.url + "/gradio_api/component_server"
            huge = http.post(url, json=offer("v=0\r\n" + "a=x\r\n" * 20_000)).status_code
            malformed = [http.post(url, json=offer("not an sdp")) for _ in range(2)]
            third = http.post(url, json=offer("not an sdp")).status_code
    finally:
        served.stop()
    assert huge == 413  # the cap of /webrtc/offer, not 1 MB
    assert all(r.status_code == 200 and r.json()["status"] == "failed" and "Malformed offer" in r.json()["message"]
               for r in malformed), [r.text for r in malformed]
    assert third == 429  # counted against the address like any offer


def test_forwarded_for_is_trusted_from_loopback_by_default_and_from_anywhere_on_a_space():
    import app

    assert app.parse_args([], environ={}).forwarded_allow_ips == "127.0.0.1,::1"
    assert app.parse_args([], environ={"SPACE_ID": "someone/voxtral"}).forwarded_allow_ips == "*"
    assert app.parse_args(["--forwarded-allow-ips", "10.0.0.0/8"], environ={"SPACE_ID": "x"}).forwarded_allow_ips == \
        "10.0.0.0/8"
