"""The session API (serving/session_api.py) on 127.0.0.1 with a real `websockets` client: spoken turns streamed as
16 kHz and 48 kHz PCM in real time, typed turns, cache reuse, every bad message, ids, expiry, the cap,
and the README's client example run as it is written."""

import asyncio
import json
import os
import re
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
import soxr
import websockets
from conftest import app_options
from servers import BackgroundServer
from websockets.exceptions import ConnectionClosed

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.conversation.speech import VoiceOptions, load_speaker
from voxtral_app.serving.app import ServerOptions, create_app
from voxtral_app.serving.session_api import SessionOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK_S = 0.02  # 20 ms of PCM per message, sent in real time
EXPIRY_S = 1.0


@pytest.fixture(scope="module")
def api_server(app_engine):
    options = ServerOptions(sessions=SessionOptions(connect_timeout_s=EXPIRY_S))
    server = BackgroundServer(create_app(app_engine, app_options(app_engine, reply_tokens=24, captions=True), options,
                                         speaker=load_speaker(VoiceOptions(engine="espeak"))))
    yield server
    server.stop()
    wait_for_free_slots(app_engine)


def wait_for_free_slots(engine, timeout_s=15):
    deadline = time.time() + timeout_s
    while time.time() < deadline and engine.active_chats:
        time.sleep(0.05)
    assert engine.active_chats == 0


def create(server, **body):
    response = httpx.post(f"{server.url}/session/create", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def socket_url(server, session) -> str:
    return server.url.replace("http", "ws", 1) + session["websocket_url"]


def pcm(audio: np.ndarray, rate: int) -> bytes:
    """Float32 16 kHz -> little-endian int16 mono at `rate`."""
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, SAMPLE_RATE, rate)
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def stream(ws, audio: np.ndarray, rate: int) -> None:
    data = pcm(np.concatenate([audio, np.zeros(int(1.0 * SAMPLE_RATE), np.float32)]), rate)
    step = int(rate * CHUNK_S) * 2
    started = time.perf_counter()
    for i, at in enumerate(range(0, len(data), step)):
        await ws.send(data[at:at + step])
        await asyncio.sleep(max(0.0, started + (i + 1) * CHUNK_S - time.perf_counter()))


async def until(ws, kind: str, timeout_s: float = 60) -> list:
    """Messages up to and including the first of type `kind` (binary ones as bytes)."""
    seen = []
    while True:
        message = await asyncio.wait_for(ws.recv(), timeout_s)
        seen.append(message if isinstance(message, bytes) else json.loads(message))
        if isinstance(seen[-1], dict) and seen[-1]["type"] == kind:
            return seen


def of_type(messages, kind):
    return [m for m in messages if isinstance(m, dict) and m["type"] == kind]


@pytest.mark.slow  # spoken turns in real time at two rates
def test_spoken_and_typed_turns_at_16_and_48_khz(api_server, app_engine, speech):
    clip = speech[: int(1.5 * SAMPLE_RATE)]  # streamed in real time

    async def talk(rate):
        session = create(api_server, sample_rate=rate, temperature=0.0)
        async with websockets.connect(socket_url(api_server, session)) as ws:
            streaming = asyncio.create_task(stream(ws, clip, rate))
            first = await until(ws, "text_response")
            await streaming
            if not of_type(first, "user_transcript"):  # what was heard comes beside the reply: maybe after it
                first += await until(ws, "user_transcript")
            await ws.send(json.dumps({"type": "text_input", "text": "And in one word?", "timestamp": time.time()}))
            typed = await until(ws, "text_response")
            streaming = asyncio.create_task(stream(ws, clip[:SAMPLE_RATE], rate))
            third = await until(ws, "text_response")
            await streaming
        return session, first, typed, third

    async def both():
        return await asyncio.gather(talk(16_000), talk(48_000))

    for session, first, typed, third in asyncio.run(both()):
        assert session["status"] == "created" and session["websocket_url"] == f"/ws/audio/{session['session_id']}"
        assert len(session["session_id"]) >= 32  # secrets.token_urlsafe(24)
        for turn in (first, third):
            kinds = [m["type"] for m in turn]
            assert "turn_start" in kinds and kinds.index("turn_start") < kinds.index("text_delta")
        caption, = of_type(first, "user_transcript")  # the spoken turn's caption (captions are on)
        assert caption["turn"] == 1 and caption["text"].strip()
        assert not of_type(typed, "user_transcript")  # a typed turn has none
        for turn in (first, typed, third):
            response = of_type(turn, "text_response")[-1]
            deltas = of_type(turn, "text_delta")
            assert deltas and "".join(d["text"] for d in deltas) == response["text"]
            assert response["mode"] == "chat" and response["latency_ms"] >= 0 and response["status"]["tokens"] > 0
            assert abs(response["timestamp"] - time.time()) < 120
        # a new conversation: at most <s>[INST] cached (an unseen reply begun at a short pause inside the clip)
        assert of_type(first, "text_response")[-1]["status"]["cached_tokens"] <= 2
        assert typed[-1]["status"]["cached_tokens"] > 0  # the typed turn joined the same conversation
        assert third[-1]["status"]["cached_tokens"] > typed[-1]["status"]["cached_tokens"]  # and its cache
    wait_for_free_slots(app_engine)


def test_spoken_replies_come_back_as_pcm_at_the_session_rate(api_server, app_engine):
    async def run():
        session = create(api_server, sample_rate=8000, spoken=True)
        async with websockets.connect(socket_url(api_server, session)) as ws:
            await ws.send(json.dumps({"type": "text_input", "text": "Say something."}))
            return await until(ws, "text_response")

    turn = asyncio.run(run())
    audio = b"".join(m for m in turn if isinstance(m, bytes))
    samples = np.frombuffer(audio, "<i2").astype(np.float32) / 32768
    assert turn[-1]["text"].strip() and len(samples) > 0.2 * 8000  # espeak said it, at 8 kHz
    assert np.abs(samples).max() > 0.05
    wait_for_free_slots(app_engine)


BAD = [
    ("{not json", "bad_json"),
    (json.dumps([1, 2]), "unknown_type"),
    (json.dumps({"type": "teleport"}), "unknown_type"),
    (json.dumps({"type": "text_input", "text": 5}), "bad_text"),
    (json.dumps({"type": "text_input", "text": "   "}), "bad_text"),
    (json.dumps({"type": "text_input", "text": "x" * 5000}), "bad_text"),
    (json.dumps({"type": "config", "mode": "sing"}), "bad_config"),
    (json.dumps({"type": "config", "sample_rate": 44100}), "bad_config"),
    (b"\x01\x02\x03", "bad_audio"),
    (bytes(1_500_000), "message_too_large"),
    ("a" * 1_100_000, "message_too_large"),
]


def test_every_bad_message_gets_an_error_and_the_socket_stays_usable(api_server, app_engine):
    async def run():
        session = create(api_server)
        async with websockets.connect(socket_url(api_server, session), max_size=None) as ws:
            errors = []
            for message, _ in BAD:
                await ws.send(message)
                errors.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            await ws.send(json.dumps({"type": "config", "mode": "transcribe", "temperature": 0.5}))
            config = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "clear"}))
            cleared = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "cancel"}))  # nothing to cancel: no answer, no harm
            await ws.send(json.dumps({"type": "text_input", "text": "still there?"}))  # typed: always answered
            return errors, config, cleared, await until(ws, "text_response")

    errors, config, cleared, turn = asyncio.run(run())
    assert [(e["type"], e["code"]) for e in errors] == [("error", code) for _, code in BAD]
    assert all(e["message"] for e in errors)
    assert config == {"type": "config", "settings": {"mode": "transcribe", "language": "", "temperature": 0.5,
                                                     "spoken": False}}
    assert cleared == {"type": "cleared"}
    assert turn[-1]["text"] and turn[-1]["mode"] == "chat"
    wait_for_free_slots(app_engine)


def test_cancel_stops_a_reply_and_stopping_the_server_ends_sessions(app_engine):
    server = BackgroundServer(create_app(app_engine, app_options(app_engine, reply_tokens=3000)))  # ~1 min on CPU

    async def run():
        session = create(server, temperature=1.0)
        async with websockets.connect(socket_url(server, session)) as ws:
            await ws.send(json.dumps({"type": "text_input", "text": "Tell me a long story."}))
            await until(ws, "text_delta")
            await ws.send(json.dumps({"type": "cancel"}))
            return await until(ws, "text_response", timeout_s=10)

    try:
        turn = asyncio.run(run())
        create(server)  # never connected: its slot is freed when the server stops
    finally:
        server.stop()
    assert turn[-1]["interrupted"] and turn[-1]["status"]["tokens"] < 3000
    wait_for_free_slots(app_engine, timeout_s=5)


def test_a_session_ends_at_the_servers_time_limit(app_engine):
    server = BackgroundServer(create_app(app_engine, app_options(app_engine, reply_tokens=8),
                                         ServerOptions(session_time_limit_s=1.0), speaker=None))

    async def run():
        session = create(server)
        async with websockets.connect(socket_url(server, session)) as ws:
            started = time.time()
            told = json.loads(await asyncio.wait_for(ws.recv(), 10))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        return told, closed.value.rcvd.code, time.time() - started

    try:
        told, code, lasted = asyncio.run(run())
    finally:
        server.stop()
    assert told["code"] == "time_limit" and code == 1000 and 0.9 < lasted < 5
    wait_for_free_slots(app_engine, timeout_s=5)


def test_with_an_access_token_sessions_and_metrics_want_the_bearer(app_engine):
    from voxtral_app.serving.guard import GuardOptions

    server = BackgroundServer(create_app(app_engine, app_options(app_engine, reply_tokens=8),
                                         ServerOptions(guard=GuardOptions(auth_token="s3cret")), speaker=None))
    bearer = {"Authorization": "Bearer s3cret"}

    async def run(session):
        async with websockets.connect(socket_url(server, session), additional_headers=bearer) as ws:
            await ws.send(json.dumps({"type": "text_input", "text": "Hi"}))
            return await until(ws, "text_response")

    try:
        assert httpx.post(f"{server.url}/session/create").status_code == 401
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        assert httpx.get(f"{server.url}/metrics", headers=bearer).status_code == 200
        session = httpx.post(f"{server.url}/session/create", headers=bearer).json()
        turn = asyncio.run(run(session))
    finally:
        server.stop()
    assert turn[-1]["type"] == "text_response"
    wait_for_free_slots(app_engine, timeout_s=5)


def test_bad_create_requests_get_400(api_server, app_engine):
    for body in ["[1]", "{bad", json.dumps({"sample_rate": 4000}), json.dumps({"sample_rate": "16000"}),
                 json.dumps({"mode": "sing"}), json.dumps({"sample_rate": True})]:
        response = httpx.post(f"{api_server.url}/session/create", content=body)
        assert response.status_code == 400 and response.json()["meta"]["error"] == "bad_request", body
    response = httpx.post(f"{api_server.url}/session/create", content="{" + " " * 20_000 + "}")
    assert response.status_code == 413
    assert app_engine.active_chats == 0


def test_unknown_and_taken_ids_are_refused(api_server, app_engine):
    async def close_code(url):
        async with websockets.connect(url) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        return closed.value.rcvd.code, closed.value.rcvd.reason

    async def run():
        unknown = await close_code(api_server.url.replace("http", "ws", 1) + "/ws/audio/not-a-session")
        session = create(api_server)
        async with websockets.connect(socket_url(api_server, session)) as first:
            second = await close_code(socket_url(api_server, session))
            await first.send(json.dumps({"type": "config", "spoken": True}))  # the first one still works
            still = json.loads(await first.recv())
        async with websockets.connect(socket_url(api_server, session)) as again:  # hung up: kept for --resume-s
            after = json.loads(await asyncio.wait_for(again.recv(), 10))
        return unknown, second, still, after

    unknown, second, still, after = asyncio.run(run())
    assert unknown[0] == 4404 and "unknown" in unknown[1]
    assert second[0] == 4409
    assert still["settings"]["spoken"] is True
    assert after == {"type": "resumed", "turns": 0}
    wait_for_free_slots(app_engine)


def test_an_unused_session_expires_and_frees_its_slot(api_server, app_engine):
    session = create(api_server)
    assert app_engine.active_chats == 1
    wait_for_free_slots(app_engine, timeout_s=EXPIRY_S + 5)

    async def connect():
        async with websockets.connect(socket_url(api_server, session)) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        return closed.value.rcvd.code

    assert asyncio.run(connect()) == 4404


def test_over_the_cap_gets_429_like_the_other_routes(api_server, app_engine):
    sessions = [create(api_server) for _ in range(app_engine.options.slots)]
    response = httpx.post(f"{api_server.url}/session/create")
    offer = httpx.post(f"{api_server.url}/webrtc/offer", json={"sdp": asyncio.run(audio_offer()), "type": "offer",
                                                             "webrtc_id": "over-the-cap"})
    assert response.status_code == 429 == offer.status_code
    body, other = response.json(), offer.json()
    assert body["meta"] == other["meta"] == {"error": "concurrency_limit_reached", "limit": app_engine.options.slots}
    assert body["status"] == other["status"] == "failed"
    assert len({s["session_id"] for s in sessions}) == len(sessions)
    wait_for_free_slots(app_engine, timeout_s=EXPIRY_S + 5)  # they expired, nobody connected


async def audio_offer() -> str:
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("audio")
    await pc.setLocalDescription(await pc.createOffer())
    await pc.close()
    return pc.localDescription.sdp


def readme_client() -> str:
    """The README's session API example: the python block after the 'Session API' heading."""
    with open(os.path.join(ROOT, "README.md")) as file:
        readme = file.read()
    section = readme[readme.index("### Session API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_client_runs_as_written(api_server, app_engine, speech, tmp_path, capsys, monkeypatch):
    code = readme_client()
    assert len(code.strip().splitlines()) <= 20
    wav = tmp_path / "question.wav"
    sf.write(wav, speech[: int(1.5 * SAMPLE_RATE)], SAMPLE_RATE, subtype="PCM_16")  # streamed in real time
    monkeypatch.chdir(tmp_path)  # the example reads question.wav and talks to the app on :7860
    code = code.replace("http://127.0.0.1:7860", api_server.url)
    assert api_server.url in code
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert printed.strip()  # the reply, streamed
    wait_for_free_slots(app_engine)
