"""The server console carries the app's lines and real warnings only: no stray prints from gradio, no
aiortc traceback when a tab goes away without Stop (the duplicate close line: tests/test_handler.py;
kokoro's absence at DEBUG: tests/test_tts.py)."""

import asyncio
import logging

import httpx
from conftest import app_options
from fastrtc import WebRTC
from servers import BackgroundServer

from voxtral_app.client import Client
from voxtral_app.serving import handler as handlers
from voxtral_app.serving.app import create_app


def test_gradio_prints_nothing_when_mounted_and_asked_as_the_page_asks(app_engine, capfd):
    """gradio 5.50 prints `new /` when mounted and `content_type ...` for each component-server call, which
    the page makes for every connection (fastrtc's WebRTC component asks for its ICE servers, then offers)."""
    capfd.readouterr()
    app = create_app(app_engine, app_options(app_engine), speaker=None)
    component = next(block for block in app.state.ui.blocks.values() if isinstance(block, WebRTC))
    server = BackgroundServer(app)
    try:
        for _ in range(2):
            answer = httpx.post(f"{server.url}/gradio_api/component_server", timeout=30, json={
                "session_hash": "console", "component_id": component._id, "fn_name": "turn", "data": None})
            assert answer.status_code == 200 and answer.json() == {}  # no TURN configured: the browser's own candidates
    finally:
        server.stop()
    out = capfd.readouterr().out
    assert "content_type" not in out and "new /" not in out, out


def test_a_peer_that_goes_silent_ends_without_a_traceback(live_server, monkeypatch, caplog):
    """A tab closed without Stop: the browser's audio stops and nothing says goodbye. The server ends the
    call after PEER_SILENT_S (shortened here) and fastrtc ends its track; aiortc logged a traceback for it."""
    monkeypatch.setattr(handlers, "PEER_SILENT_S", 0.5)

    async def run() -> list[str]:
        client = await Client.connect(live_server.url)
        try:
            await asyncio.sleep(0.5)  # frames flow
            client.pc.getSenders()[0].replaceTrack(None)  # the microphone goes quiet, the peer stays
            for _ in range(200):
                if any("end_stream" in message for message in client.messages):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the server's sender sees its track end
            return client.messages
        finally:
            await client.close()

    with caplog.at_level(logging.INFO):
        messages = asyncio.run(run())
    assert any("end_stream" in message for message in messages), messages
    assert any("no audio for" in record.getMessage() for record in caplog.records)
    warnings = [record for record in caplog.records if record.name.startswith(("aiortc", "aioice", "fastrtc"))
                and record.levelno >= logging.WARNING]
    assert not warnings, [record.getMessage() for record in warnings]
