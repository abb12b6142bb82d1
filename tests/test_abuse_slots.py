"""Slots against hoarding (issue 29): a peer that never sends audio, a socket that never speaks, an
upload kept after its conversation."""

import asyncio
import json
import os
import secrets
import time

import httpx
import pytest
import websockets
from conftest import app_options, write_wav
from servers import BackgroundServer

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.serving import handler as handlers
from voxtral_app.serving.app import ServerOptions, create_app
from voxtral_app.serving.handler import VoxtralHandler


def test_the_no_audio_rule_counts_from_the_connection_not_the_first_frame(engine):
    """A peer that connects and vanishes before its first frame used to hold its slot until ICE
    consent expired (~30 s). The handler's clock is moved by hand."""
    now = [1000.0]
    handler = VoxtralHandler(engine, clock=lambda: now[0]).copy()
    handler.send_message_sync = lambda message: None  # no data channel here: nobody to tell
    handler.start_up()
    conversation = handler.conversation
    try:
        assert conversation is not None and not handler.peer_gone()
        now[0] += handlers.PEER_SILENT_S + 0.1  # not one frame since it connected
        assert handler.peer_gone()
        handler.emit()
        assert conversation.closed.wait(10)
    finally:
        conversation.close()
        handler.shutdown()


def test_a_session_socket_that_never_speaks_is_closed_and_says_why(app_engine):
    idle_s = 1.5  # the app's 60 s, shortened: the rule is under test
    served = BackgroundServer(create_app(app_engine, app_options(app_engine, idle_timeout_s=idle_s)))

    async def run():
        async with httpx.AsyncClient() as http:
            created = (await http.post(served.url + "/session/create")).json()
        async with websockets.connect(served.url.replace("http", "ws") + created["websocket_url"]) as ws:
            messages = []
            try:
                while True:
                    messages.append(json.loads(await asyncio.wait_for(ws.recv(), 15)))
            except websockets.ConnectionClosed:
                return messages

    try:
        messages = asyncio.run(run())
    finally:
        served.stop()
    closed = [m for m in messages if m.get("type") == "error" and m.get("code") == "closed"]
    assert closed and "without speech" in closed[0]["message"], messages


def test_one_address_holds_at_most_two_unconnected_sessions_and_a_newcomer_gets_a_slot(app_engine):
    served = BackgroundServer(create_app(app_engine, app_options(app_engine)))
    try:  # two visitors through a reverse proxy on this host (loopback itself is exempt)
        with httpx.Client(timeout=10, headers={"X-Forwarded-For": "203.0.113.1"}) as hoarder, \
                httpx.Client(timeout=10, headers={"X-Forwarded-For": "203.0.113.2"}) as newcomer:
            hoarded = [hoarder.post(served.url + "/session/create") for _ in range(4)]
            arrived = newcomer.post(served.url + "/session/create")
        codes = [r.status_code for r in hoarded]
        expires = [r.json()["expires_in_s"] for r in hoarded if r.status_code == 200]
    finally:
        served.stop()
    assert codes == [200, 200, 429, 429]
    assert arrived.status_code == 200  # 3 slots: the hoarder's 2, and one for someone else
    assert all(seconds <= 10 for seconds in expires)


@pytest.mark.slow  # a page upload turn, then an idle close
def test_an_upload_is_deleted_when_its_conversation_closes_while_the_page_is_open(app_engine, speech, tmp_path):
    from gradio_client import Client as PageClient
    from gradio_client import handle_file

    resume_s = 1.0  # the app's 120 s, shortened: how long a page's conversation waits between its turns
    served = BackgroundServer(create_app(app_engine, app_options(app_engine, reply_tokens=8),
                                         ServerOptions(resume_s=resume_s)))
    clip = write_wav(tmp_path / "turn.wav", speech[: 2 * SAMPLE_RATE + secrets.randbelow(1000)])  # a path of its
    # own: gradio names an upload by its contents' hash
    ledger = served.app.state.uploads_ledger
    try:
        page = PageClient(served.url + "/", verbose=False)  # the page stays open to the end
        job = page.submit(handle_file(clip), "chat", "auto", 0.2, api_name="/send_upload")
        job.result(timeout=60)
        replied = [update[0] for update in job.outputs() if isinstance(update[0], list)][-1]
        uploaded = list(ledger.uploads)
        sessions = [u.session for entries in ledger.uploads.values() for u in entries]
        deadline = time.monotonic() + 10  # parked for resume_s, then closed; the sweeper deletes within 1 s
        while any(os.path.exists(path) for path in uploaded) and time.monotonic() < deadline:
            time.sleep(0.05)
        still_open = all(s in served.app.state.ui.conversations.pages for s in sessions)  # no unload ran
        gone, kept = [not os.path.exists(path) for path in uploaded], dict(ledger.uploads)
        page.close()
    finally:
        served.stop(force=True)  # without waiting for the page client's event streams to end
    assert [m["role"] for m in replied] == ["user", "assistant"]  # the turn used the file
    assert len(uploaded) == 1 and sessions and still_open
    assert gone == [True] and not kept
