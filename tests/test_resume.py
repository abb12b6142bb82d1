"""Conversations outlive connections: a session-API client that hangs up and reconnects to its
`websocket_url` within --resume-s continues the same conversation, on a real server with a real
`websockets` client; and more conversations than KV slots take turns (model/rows.py)."""

import asyncio
import json
import threading
import time

import httpx
import pytest
import websockets
from conftest import app_options
from servers import BackgroundServer
from websockets.exceptions import ConnectionClosed

from voxtral_app.model.engine import EngineOptions
from voxtral_app.model.loading import load_engine
from voxtral_app.serving.app import ServerOptions, create_app
from voxtral_app.serving.session_api import SessionOptions

MAX_SESSIONS = 2
CONVERSATIONS = 6


@pytest.fixture(scope="module")
def small_engine(tiny_checkpoint):
    """Two connected conversations at most, one KV slot: six conversations must share it."""
    engine = load_engine(EngineOptions(model=tiny_checkpoint, device="cpu", slots=MAX_SESSIONS, kv_slots=1,
                                       max_tokens=2048, warmup=False, transcript_tokens=128))
    yield engine
    engine.close()


def serve(engine, reply_tokens=8, **options):
    return BackgroundServer(create_app(engine, app_options(engine, reply_tokens=reply_tokens, temperature=0.0),
                                       ServerOptions(**options), speaker=None))


@pytest.fixture(scope="module")
def server(small_engine):
    server = serve(small_engine)
    yield server
    server.stop()


def create(server) -> dict:
    response = httpx.post(f"{server.url}/session/create", json={"temperature": 0.0})
    assert response.status_code == 200, response.text
    return response.json()


def socket_url(server, session) -> str:
    return server.url.replace("http", "ws", 1) + session["websocket_url"]


def health(server) -> dict:
    return httpx.get(f"{server.url}/health").json()


def wait_for(condition, timeout_s=30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


async def turn(ws, text: str) -> tuple[list[dict], dict]:
    """Type a turn -> (the messages before its reply's end, the text_response)."""
    await ws.send(json.dumps({"type": "text_input", "text": text}))
    seen = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if message["type"] == "text_response":
            return seen, message
        assert message["type"] != "error", message
        seen.append(message)


async def close_code(url: str) -> int:
    async with websockets.connect(url) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    return closed.value.rcvd.code


def test_six_conversations_on_two_sessions_hang_up_and_come_back(server, small_engine):
    """The issue's "done when": with --max-sessions 2 (and one KV slot), six conversations each take a typed
    turn and hang up; each then reconnects to its websocket_url and its next turn continues it."""
    sessions = []
    for i in range(CONVERSATIONS):
        session = create(server)  # room for it: every earlier one hung up and stopped counting

        async def first(session=session, i=i):
            async with websockets.connect(socket_url(server, session)) as ws:
                return await turn(ws, f"Remember the number {i}.")

        _, response = asyncio.run(first())
        sessions.append((session, response["status"]))
        assert wait_for(lambda i=i: health(server)["conversations_kept"] == i + 1)
    assert health(server)["active_sessions"] == 0

    for i, (session, before) in enumerate(sessions):
        async def again(session=session):
            async with websockets.connect(socket_url(server, session)) as ws:
                resumed = json.loads(await asyncio.wait_for(ws.recv(), 10))
                return resumed, await turn(ws, "Which number was it?")

        resumed, (_, response) = asyncio.run(again())
        assert resumed == {"type": "resumed", "turns": 1}
        status = response["status"]
        # the prompt holds the first turn and its reply: longer than the first turn's whole prompt
        assert status["prefill_tokens"] + status["cached_tokens"] > before["prefill_tokens"] + before["tokens"]
        kept = server.app.state.sessions.sessions[session["session_id"]]
        assert wait_for(lambda kept=kept: kept.parked)  # hung up again: idle, its messages are final
        messages = kept.conversation.chat.messages
        assert [m["role"] for m in messages][:3] == ["user", "assistant", "user"]  # its reply joins at the next turn
        assert f"Remember the number {i}." in json.dumps(messages[0]["content"])

    body = httpx.get(f"{server.url}/metrics").text
    assert health(server)["kv_slots_in_use"] <= 1
    offloads = next(float(line.split()[-1]) for line in body.splitlines() if line.startswith("kv_offloads_total"))
    assert offloads >= CONVERSATIONS - 1  # one KV slot: every new speaker moved the previous one off


def test_a_live_session_is_still_taken_and_an_unknown_id_unknown(server):
    async def run():
        session = create(server)
        unknown = await close_code(server.url.replace("http", "ws", 1) + "/ws/audio/not-a-session")
        async with websockets.connect(socket_url(server, session)) as first:
            await turn(first, "hello")
            second = await close_code(socket_url(server, session))
        async with websockets.connect(socket_url(server, session)) as again:  # hung up: it resumes
            resumed = json.loads(await asyncio.wait_for(again.recv(), 10))
            third = await close_code(socket_url(server, session))
        return unknown, second, resumed, third

    unknown, second, resumed, third = asyncio.run(run())
    assert unknown == 4404 and second == 4409 == third
    assert resumed == {"type": "resumed", "turns": 1}


@pytest.mark.slow  # waits out the resume and time limits
def test_expired_and_timed_out_sessions_are_gone(small_engine):
    """Past --resume-s the id is unknown; a session that reached the time limit ended for good."""
    server = serve(small_engine, session_time_limit_s=2.0, sessions=SessionOptions(resume_s=0.5))
    try:
        async def run():
            session = create(server)
            async with websockets.connect(socket_url(server, session)) as ws:
                await ws.send(json.dumps({"type": "config", "spoken": False}))
                await asyncio.wait_for(ws.recv(), 10)
            await asyncio.sleep(1.0)  # past resume_s: the next take() finds it expired by the clock
            expired = await close_code(socket_url(server, session))

            limited = create(server)
            async with websockets.connect(socket_url(server, limited)) as ws:
                messages = []
                with pytest.raises(ConnectionClosed):
                    while True:
                        messages.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            after = await close_code(socket_url(server, limited))
            return expired, messages, after

        expired, messages, after = asyncio.run(run())
        assert expired == 4404
        assert messages[-1]["code"] == "time_limit"
        assert after == 4404
    finally:
        server.stop()


def test_a_turn_waits_for_a_busy_slot_and_is_told(small_engine):
    """One KV slot, busy with A's reply: B's turn waits in the queue, B hears that it is queued, and its
    reply comes once A's is over. (A listener lets the decode thread take one step per permit, so A is
    surely still speaking when B's turn arrives.)"""
    gate, permits = threading.Event(), threading.Semaphore(0)

    def hold(phase, seconds):
        if phase == "decode" and gate.is_set():
            permits.acquire(timeout=30)

    small_engine.listen(hold)
    server = serve(small_engine, reply_tokens=100)  # A's reply outlasts the wait: a token per permit
    try:
        async def run():
            a_session, b_session = create(server), create(server)
            async with websockets.connect(socket_url(server, a_session)) as a, \
                    websockets.connect(socket_url(server, b_session)) as b:
                gate.set()
                await a.send(json.dumps({"type": "text_input", "text": "Tell me a long story."}))
                while json.loads(await asyncio.wait_for(a.recv(), 30))["type"] != "text_delta":
                    pass
                await b.send(json.dumps({"type": "text_input", "text": "And me?"}))
                told = []
                deadline = time.monotonic() + 60
                while not any(m["type"] == "queued" for m in told) and time.monotonic() < deadline:
                    permits.release()  # one more step of A's reply
                    try:
                        told.append(json.loads(await asyncio.wait_for(b.recv(), 0.2)))
                    except asyncio.TimeoutError:
                        pass
                await a.send(json.dumps({"type": "cancel"}))  # A stops: B's turn takes the slot
                gate.clear()
                permits.release(1000)
                _, b_reply = await turn_end(b)
                return told, b_reply

        told, b_reply = asyncio.run(run())
        assert told[-1]["type"] == "queued" and "busy" in told[-1]["message"]
        assert b_reply["status"]["tokens"] > 0 and "error" not in b_reply["status"]
    finally:
        gate.clear()
        permits.release(1000)
        server.stop()


async def turn_end(ws) -> tuple[list[dict], dict]:
    seen = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if message["type"] == "text_response":
            return seen, message
        seen.append(message)
