"""The FastAPI app: FastRTC's WebRTC, WebSocket and telephone routes, the Gradio UI, /health.

`create_app(engine)` builds it; pass `app=` to mount everything inside your own FastAPI service.
The routes are fastrtc's own handlers behind a thin check: malformed offers and messages get a 4xx
or an error message instead of reaching fastrtc (which would leak the peer connection or crash the
socket), and the shared cap on conversations (the engine's KV-cache slots) covers browsers,
WebRTC/WebSocket clients and phone calls alike.
"""

import base64
import binascii
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
from aiortc.sdp import SessionDescription
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastrtc import Stream
from pydantic import BaseModel, ValidationError

from . import transport
from .conversation import ConversationOptions
from .engine import Engine
from .handler import VoxtralHandler
from .tts import VoiceOptions, load_speaker_or_none
from .ui import build_ui

logger = logging.getLogger(__name__)

TWILIO_EVENTS = {"connected", "start", "media", "mark", "stop", "dtmf", "ping"}


@dataclass(frozen=True)
class ServerOptions:
    session_time_limit_s: float | None = 900.0  # a connection is closed after 15 min (None: no limit)
    twilio_auth_token: str | None = None  # set to check X-Twilio-Signature on /telephone/incoming
    rtc_configuration: dict | Callable[[], dict] | None = None  # the browser's ICE servers (TURN when not on a
    # LAN), or a function fastrtc calls per connection for fresh credentials: voxtral_app/ice.py
    jitter_prefetch: int = 1  # audio packets (20 ms each) aiortc buffers before decoding; its default 4
    # adds 60 ms to every turn. Raise it for lossy links where audio sounds choppy.
    debug: bool = False  # the page logs to the browser console (fastrtc's component is chatty)


class Offer(BaseModel):
    sdp: str | None = None
    candidate: dict | None = None
    type: str
    webrtc_id: str


def failed(status: int, error: str, message: str, **meta) -> JSONResponse:
    """fastrtc's failure body (clients read status/meta.error), with a human message."""
    return JSONResponse(status_code=status, content={"status": "failed", "meta": {"error": error, **meta},
                                                     "message": message})


def check_offer(body: dict) -> Offer:
    offer = Offer.model_validate(body)
    if not offer.webrtc_id.strip() or len(offer.webrtc_id) > 200:
        raise ValueError("webrtc_id must be a short non-empty string")
    if offer.type == "offer":
        if not offer.sdp:
            raise ValueError("an offer needs an sdp")
        description = SessionDescription.parse(offer.sdp)
        if not any(media.kind == "audio" for media in description.media):
            raise ValueError("the offer has no audio track")
    elif offer.type != "ice-candidate" or offer.candidate is None:
        raise ValueError("type must be 'offer' (with sdp) or 'ice-candidate' (with candidate)")
    return offer


def check_message(text: str) -> dict:
    """One WebSocket message (fastrtc's or Twilio's Media Streams protocol) -> dict, or ValueError."""
    message = json.loads(text)
    if not isinstance(message, dict) or not isinstance(message.get("event"), str):
        raise ValueError("a message must be a JSON object with an 'event'")
    event = message["event"]
    if event not in TWILIO_EVENTS:
        raise ValueError(f"unknown event '{event}'")
    if event == "media":
        payload = (message.get("media") or {}).get("payload")
        if not isinstance(payload, str):
            raise ValueError("media needs media.payload (base64 mu-law)")
        base64.b64decode(payload, validate=True)
    if event == "start" and not isinstance(message.get("streamSid") or message.get("websocket_id"), str):
        raise ValueError("start needs a streamSid (Twilio) or websocket_id")
    return message


class CheckedWebSocket:
    """The socket fastrtc reads, with malformed messages answered and skipped instead of crashing it."""

    def __init__(self, websocket: WebSocket):
        self.websocket = websocket

    def __getattr__(self, name):
        return getattr(self.websocket, name)

    async def receive_json(self) -> dict:
        while True:
            text = await self.websocket.receive_text()
            try:
                return check_message(text)
            except (ValueError, binascii.Error, TypeError) as error:
                logger.info("bad websocket message: %s", error)
                await self.websocket.send_json({"event": "error", "message": f"ignored a bad message: {error}"})


def create_app(engine: Engine, chat_options: ConversationOptions | None = None, options: ServerOptions = ServerOptions(),
               speaker=None, app: FastAPI | None = None, handler=None) -> FastAPI:
    """FastAPI app serving Voxtral: UI at /, /webrtc/offer, /websocket/offer, /telephone/*, /health.

    `app`: mount into this FastAPI app instead of a new one. `handler`: a fastrtc handler to use
    instead of VoxtralHandler (bench/turn_latency.py compares fastrtc's default turn-taking).
    """
    chat_options = chat_options or ConversationOptions(max_audio_s=engine.options.max_audio_s)
    if speaker is None:
        speaker = load_speaker_or_none(VoiceOptions())
    handler = handler or VoxtralHandler(engine, chat_options, speaker)
    transport.buffer_less_audio(options.jitter_prefetch)
    slots = engine.options.slots
    stream = Stream(handler, modality="audio", mode="send-receive", concurrency_limit=slots,
                    time_limit=options.session_time_limit_s, rtc_configuration=options.rtc_configuration)
    ui = build_ui(engine, handler, slots, options.session_time_limit_s, options.rtc_configuration, options.debug)
    app = app or FastAPI(title="Voxtral realtime", docs_url=None, redoc_url=None)  # their pages load from a CDN
    app.state.stream = stream
    app.state.engine = engine
    app.state.ui = ui

    def full() -> JSONResponse | None:
        if engine.free_slots:
            return None
        return failed(429, "concurrency_limit_reached", f"All {slots} conversations are in use; "
                      "please try again in a minute.", limit=slots)

    @app.get("/health")
    async def health():
        """healthy | warming_up | degraded (503: the decode thread died or is stuck)."""
        status = "degraded" if not engine.healthy else "healthy" if engine.ready.is_set() else "warming_up"
        body = {"status": status, "model": engine.options.model, "device": str(engine.device),
                "compiled": engine.decoder.compiled, "active_sessions": engine.active_chats, "max_sessions": slots}
        if engine.failure is not None:
            body["error"] = f"the decode thread died: {engine.failure}"
        elif engine.stuck:
            body["error"] = "the decode thread has not stepped for a while"
        return JSONResponse(body, status_code=503 if status == "degraded" else 200)

    @app.post("/webrtc/offer")
    async def webrtc_offer(request: Request):
        try:
            offer = check_offer(json.loads(await request.body()))
        except (ValueError, ValidationError) as error:
            return failed(400, "bad_offer", f"Malformed offer: {error}")
        if offer.type == "offer" and (busy := full()):
            return busy
        try:
            outputs = stream.set_additional_outputs(offer.webrtc_id)
            return await stream.handle_offer(offer.model_dump(), set_outputs=outputs)
        except Exception as error:  # aiortc rejects what parsed but cannot be negotiated
            logger.info("offer failed: %s", error)
            await transport.drop_connection(stream, offer.webrtc_id)
            return failed(400, "bad_offer", f"Could not negotiate: {error}")

    @app.get("/outputs")
    async def outputs(webrtc_id: str):
        """Server-sent events with the chat history and turn status, for clients without the UI."""
        if not transport.is_connected(stream, webrtc_id):
            return failed(404, "unknown_connection", "No such connection")

        async def events():
            async for output in stream.output_stream(webrtc_id):
                history, status = output.args
                yield f"data: {json.dumps({'history': history, 'status': status})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/input")
    async def set_input(request: Request):
        """Settings for a connection: {"webrtc_id", "mode", "language", "temperature", "spoken"}."""
        try:
            body = json.loads(await request.body())
            webrtc_id = body["webrtc_id"]
            if not isinstance(webrtc_id, str):
                raise TypeError("webrtc_id must be a string")
        except (ValueError, KeyError, TypeError):
            return failed(400, "bad_input", "Send JSON with a webrtc_id")
        if not transport.is_connected(stream, webrtc_id):
            return failed(404, "unknown_connection", "No such connection")
        stream.set_input(webrtc_id, body.get("mode"), body.get("language"), body.get("temperature"),
                         body.get("spoken"))
        return {"status": "ok"}

    async def serve_socket(websocket: WebSocket, phone: bool):
        if full():
            await websocket.accept()
            await websocket.send_json({"event": "error", "status": "failed",
                                       "meta": {"error": "concurrency_limit_reached", "limit": slots},
                                       "message": f"All {slots} conversations are in use; try again in a minute."})
            await websocket.close()
            return
        connection = handler.copy()
        connection.phone_mode = phone
        connection.transport_name = "phone" if phone else "websocket"
        try:
            await transport.serve_websocket(stream, connection, CheckedWebSocket(websocket))
        finally:
            connection.shutdown()  # never blocks

    @app.websocket("/websocket/offer")
    async def websocket_offer(websocket: WebSocket):
        await serve_socket(websocket, phone=False)

    @app.websocket("/telephone/handler")
    async def telephone_handler(websocket: WebSocket):
        await serve_socket(websocket, phone=True)

    @app.post("/telephone/incoming")
    async def telephone_incoming(request: Request):
        if options.twilio_auth_token:
            from twilio.request_validator import RequestValidator

            form = dict(await request.form())
            url = str(request.url)
            if request.headers.get("x-forwarded-proto") == "https":
                url = url.replace("http://", "https://", 1)
            signature = request.headers.get("X-Twilio-Signature", "")
            if not RequestValidator(options.twilio_auth_token).validate(url, form, signature):
                return PlainTextResponse("invalid Twilio signature", status_code=403)
        if full():
            return PlainTextResponse('<?xml version="1.0" encoding="UTF-8"?><Response><Say>All lines are busy. '
                                     'Please call again later.</Say><Hangup/></Response>', media_type="application/xml")
        return await stream.handle_incoming_call(request)

    return gr.mount_gradio_app(app, ui, path="/")
