"""The served app on 127.0.0.1 with real clients: aiortc WebRTC, WebSockets, plain HTTP."""

import asyncio
import base64
import json
import time

import httpx
import numpy as np
import pytest
import websockets
from conftest import app_options, espeak
from g711 import lin2ulaw
from servers import BackgroundServer

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.client import Client
from voxtral_app.compat import fastrtc as compat
from voxtral_app.serving.app import create_app

SILENCE = np.zeros(int(1.5 * SAMPLE_RATE), np.float32)


def utterance(speech, seconds=1.5):  # real time: every second here is a second of the test
    clip = speech[: int(seconds * SAMPLE_RATE)]
    return np.concatenate([clip, SILENCE]), seconds


def said_s(message) -> float:
    """Seconds of speech in a user turn: its clip's label, "🎙️ 2.8 s of speech"."""
    assert message["role"] == "user" and message["content"]["mime_type"] == "audio/wav"
    return float(message["content"]["alt_text"].split()[1])


def users(history):
    return [m for m in history if m["role"] == "user"]


async def turn(client, clip_and_end):
    clip, end = clip_and_end
    client.say(clip, end)
    return await client.reply(60)


def test_health(live_server):
    body = httpx.get(f"{live_server.url}/health").json()
    assert body["status"] == "healthy" and body["device"] == "cpu" and body["max_sessions"] == 3
    assert "active_sessions" in body


@pytest.mark.slow  # over 4 s: the fast subset stays under 2.5 min
def test_two_turns_over_webrtc(live_server, speech, other_speech):
    async def run():
        client = await Client.connect(live_server.url)
        try:
            first = await turn(client, utterance(speech))
            second = await turn(client, utterance(other_speech))
        finally:
            await client.close()
        return first, second

    first, second = asyncio.run(run())
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[1]["content"].strip()
    assert [m["role"] for m in second] == ["user", "assistant", "user", "assistant"]
    assert "ms after you stopped" in second[-1]["content"]  # the finished reply's footer


@pytest.mark.slow  # two WebRTC calls, a spoken turn each
def test_two_clients_see_only_their_own_history(live_server, speech, other_speech):
    async def run():
        a = await Client.connect(live_server.url)
        b = await Client.connect(live_server.url, mode="transcribe")
        try:
            return await asyncio.gather(turn(a, utterance(speech, 2.0)), turn(b, utterance(other_speech, 1.0)))
        finally:
            await a.close()
            await b.close()

    history_a, history_b = asyncio.run(run())
    assert [m["role"] for m in history_a] == ["user", "assistant"] == [m["role"] for m in history_b]
    assert 1.2 < said_s(history_a[0]) <= 2.1 and said_s(history_b[0]) <= 1.1  # each its own turn: 2 s and 1 s
    assert history_a[1]["content"] != history_b[1]["content"]


def test_disconnect_mid_reply_stops_generation(app_engine, speech):
    server = BackgroundServer(create_app(app_engine, app_options(app_engine, reply_tokens=3000)))  # ~1 min on CPU

    async def run():
        client = await Client.connect(server.url, temperature=1.0)
        clip, end = utterance(speech)
        client.say(clip, end)
        while True:  # wait for the reply to start streaming, then hang up
            _, event = await client.next_event(60)
            if event["history"] and event["history"][-1]["role"] == "assistant" and event["history"][-1]["content"]:
                break
        await client.close()
        return time.time()

    try:
        closed = asyncio.run(run())
        while time.time() < closed + 10 and (app_engine.active or app_engine.active_chats):
            time.sleep(0.05)
        stopped = time.time() - closed
    finally:
        server.stop()
    assert not app_engine.active and app_engine.active_chats == 0  # generation stopped, slot released
    assert stopped < 5


@pytest.mark.parametrize("body", [
    "not json",
    json.dumps({"type": "offer", "webrtc_id": "x"}),  # no sdp
    json.dumps({"sdp": "v=0\r\ngarbage", "type": "offer", "webrtc_id": "y"}),
    json.dumps({"sdp": "hello", "type": "offer", "webrtc_id": "z"}),
    json.dumps({"sdp": "v=0", "type": "answer", "webrtc_id": "w"}),
    json.dumps(["a list"]),
])
def test_bad_offers_get_4xx_and_server_keeps_serving(live_server, body):
    response = httpx.post(f"{live_server.url}/webrtc/offer", content=body,
                          headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    assert response.json()["status"] == "failed"
    assert not live_server.app.state.stream.pcs  # no leaked peer connections
    assert httpx.get(f"{live_server.url}/health").status_code == 200


def test_video_only_sdp_is_refused(live_server):
    async def run():
        from aiortc import RTCPeerConnection

        pc = RTCPeerConnection()
        pc.createDataChannel("text")
        await pc.setLocalDescription(await pc.createOffer())
        response = httpx.post(f"{live_server.url}/webrtc/offer",
                              json={"sdp": pc.localDescription.sdp, "type": "offer", "webrtc_id": "nodata"})
        await pc.close()
        return response

    response = asyncio.run(run())
    assert response.status_code == 400 and "audio" in response.json()["message"]


def mulaw_frames(audio, rate, frame_s=0.02):
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    if rate != SAMPLE_RATE:
        import soxr

        pcm = (soxr.resample(audio, SAMPLE_RATE, rate) * 32767).clip(-32768, 32767).astype(np.int16)
    step = int(rate * frame_s)
    for i in range(0, len(pcm), step):
        yield base64.b64encode(lin2ulaw(pcm[i:i + step])).decode()


@pytest.mark.slow  # a WebSocket turn sent in real time
def test_websocket_turn_and_bad_messages(live_server, speech):
    async def run():
        ws_url = live_server.url.replace("http", "ws") + "/websocket/offer"
        async with websockets.connect(ws_url) as ws:
            errors = []
            for bad in ["{not json", json.dumps({"event": "media", "media": {"payload": "%%%"}}),
                        json.dumps({"event": "teleport"}), json.dumps([1, 2])]:
                await ws.send(bad)
                errors.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"event": "start", "websocket_id": "ws-test-0001"}))
            token = json.loads(await ws.recv())
            assert token["event"] == "token"
            deadline = time.monotonic() + 10
            while not compat.is_connected(live_server.app.state.stream, "ws-test-0001") and \
                    time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # the token comes before fastrtc has the connection up (/outputs: 404)
            async with httpx.AsyncClient(timeout=60) as http:
                async with http.stream("GET", f"{live_server.url}/outputs", params={"webrtc_id": "ws-test-0001"},
                                       headers={"X-Voxtral-Token": token["token"]}) as events:
                    clip, _ = utterance(speech)
                    for payload in mulaw_frames(clip, SAMPLE_RATE):
                        await ws.send(json.dumps({"event": "media", "media": {"payload": payload}}))
                        await asyncio.sleep(0.02)
                    history, starts = [], []
                    async for line in events.aiter_lines():
                        if line.startswith("data: "):
                            event = json.loads(line[6:])
                            history = history[:event["start"]] + event["messages"]
                            starts.append(event["start"])
                            if event["final"]:
                                break
            await ws.send(json.dumps({"event": "stop"}))
            return errors, history, starts

    errors, history, starts = asyncio.run(run())
    assert all(e["event"] == "error" for e in errors) and len(errors) == 4
    assert [m["role"] for m in history] == ["user", "assistant"]
    # the first event has the whole chat; the reply's updates carry its message alone, not the user's turn again
    assert starts[0] == 0 and len(starts) >= 2 and all(start >= 1 for start in starts[1:])
    assert httpx.get(f"{live_server.url}/health").json()["status"] == "healthy"


def test_over_the_limit_gets_a_clear_message(live_server, app_engine):
    async def run():
        clients = [await Client.connect(live_server.url) for _ in range(app_engine.options.slots)]
        try:
            deadline = time.monotonic() + 10
            while app_engine.active_chats < app_engine.options.slots and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # each connection takes its slot as it starts up
            with pytest.raises(ConnectionError, match="concurrency_limit_reached"):
                await Client.connect(live_server.url)
        finally:
            for client in clients:
                await client.close()

    asyncio.run(run())
    deadline = time.time() + 10
    while time.time() < deadline and app_engine.active_chats:
        time.sleep(0.1)
    assert app_engine.active_chats == 0


@pytest.mark.slow  # over 4 s: the fast subset stays under 2.5 min
def test_mid_sentence_pause_stays_one_turn(live_server):
    first, second = espeak("I was thinking about"), espeak("going to the beach tomorrow")
    gap = np.zeros(int(0.4 * SAMPLE_RATE), np.float32)
    whole = (len(first) + len(gap) + len(second)) / SAMPLE_RATE

    async def run():
        client = await Client.connect(live_server.url)
        try:
            client.say(np.concatenate([first, gap, second, SILENCE]))
            return await client.reply(60)
        finally:
            await client.close()

    history = asyncio.run(run())
    assert [m["role"] for m in history] == ["user", "assistant"]
    said = said_s(history[0])
    assert said >= whole - 0.05  # one turn holding both parts


SPOKEN_MIN = 0.2 * 48_000 * 0.1  # 960 loud samples at 48 kHz (20 ms of them): speech came back, not a click


def loud_samples(chunks) -> int:
    return int(sum((np.abs(chunk) > 0.05).sum() for chunk in chunks))


@pytest.mark.slow  # a spoken turn and its spoken reply in real time
def test_spoken_replies_in_the_browser_path(live_server, speech):
    async def run():
        client = await Client.connect(live_server.url, spoken=True)
        try:
            await asyncio.sleep(0.5)  # half a second of what the line carries before anyone speaks
            silent = np.abs(np.concatenate(client.heard or [np.zeros(1)])).max()
            client.heard.clear()
            await turn(client, utterance(speech))
            deadline = time.monotonic() + 10
            while loud_samples(client.heard) <= SPOKEN_MIN and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the spoken reply still arriving
            return silent, np.concatenate(client.heard)
        finally:
            await client.close()

    before, heard = asyncio.run(run())
    assert before < 0.01  # nothing is said before a turn
    assert loud_samples([heard]) > SPOKEN_MIN  # espeak speech came back over WebRTC


def test_event_loop_kind_tells_uvloop_from_asyncio():
    """What /health's event_loop says (an app on asyncio's own loop also gets a warning at its first offer)."""
    import uvloop

    from voxtral_app.compat import fastrtc as compat

    async def kind():
        return compat.event_loop_kind()

    assert asyncio.run(kind()) == "asyncio"
    assert uvloop.run(kind()) == "uvloop"


def test_a_connection_keeps_at_most_the_newest_chat_updates(live_server):
    """fastrtc queues every chat update until /outputs reads it; a client that never reads must not
    pile them up (each carries the whole chat): the app's setter keeps the newest OUTPUTS_KEPT."""
    from fastrtc import AdditionalOutputs

    from voxtral_app.compat import fastrtc as compat

    stream = live_server.app.state.stream

    async def flood():
        put = compat.bounded_outputs(stream, "never-read-0001")
        for i in range(3 * compat.OUTPUTS_KEPT):
            put(AdditionalOutputs([{"role": "assistant", "content": str(i)}], {}))
        pending = compat.output_queue(stream, "never-read-0001").queue
        return pending.qsize(), pending.get_nowait().args[0][0]["content"]

    try:
        size, oldest = asyncio.run(flood())
    finally:
        stream.additional_outputs.pop("never-read-0001", None)
    assert size == compat.OUTPUTS_KEPT
    assert oldest == str(2 * compat.OUTPUTS_KEPT)  # the oldest kept is the first of the newest OUTPUTS_KEPT
