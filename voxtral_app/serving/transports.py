"""How connections reach a conversation: fastrtc's WebRTC offers (/webrtc/offer, and the page's own
offer route), /outputs and /input for a WebRTC client, fastrtc's WebSocket and Twilio media-stream
sockets, and /telephone/incoming.

Each is fastrtc's own handler behind checks: malformed offers and messages get a 4xx or an error
event instead of reaching fastrtc; an address's unconnected offers and unstarted or quiet sockets
are counted (access.py); a connection id is claimed once and its token is needed to read or steer
it; sockets have deadlines (sockets.py); and the shared cap on conversations covers them all.
"""

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from urllib.parse import urlencode

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastrtc import Stream
from pydantic import ValidationError

from ..compat import fastrtc as compat
from ..model.chat import common_prefix
from . import metrics
from .access import CANDIDATES_PER_CONNECTION, Connections, webrtc_key
from .errors import busy, busy_event, failed
from .handler import PHONE_RATE
from .offers import check_offer
from .sockets import CheckedWebSocket, SocketClosed, call_token

logger = logging.getLogger(__name__)

TOO_MANY_PENDING = ("Your address holds connections that have not connected (or started, or spoken) yet; "
                    "connect one, or wait 10 s.")
TOO_MANY_CANDIDATES = f"A connection may name at most {CANDIDATES_PER_CONNECTION} ICE candidates."


def page_failure(error: str, message: str) -> dict:
    """fastrtc's failure body, as the page's offer route answers it (the page shows `message`)."""
    return {"status": "failed", "meta": {"error": error}, "message": message}


def token_of(request: Request, body: dict | None = None):
    header = request.headers.get("x-voxtral-token")
    return header or request.query_params.get("token") or (body or {}).get("token")


class Transports:
    """The transports' routes on one fastrtc Stream. Owned by the event loop, where every route runs:
    `calls` (a Twilio call's token opens one stream) and, through the routes, `connections`.
    `options`: the app's ServerOptions; `closing`: set at shutdown (streams end); `sweep_soon()`
    starts the connections' sweeper if it is not running yet."""

    def __init__(self, stream: Stream, handler, engine, connections: Connections, options,
                 closing: asyncio.Event, sweep_soon: Callable[[], None]):
        self.stream = stream
        self.handler = handler  # copied for each socket connection
        self.engine = engine
        self.connections = connections
        self.options = options
        self.closing = closing
        self.sweep_soon = sweep_soon
        self.calls: dict[str, float] = {}  # CallSid -> when its stream started

    def add_routes(self, app: FastAPI) -> None:
        app.post("/webrtc/offer")(self.webrtc_offer)
        app.get("/outputs")(self.outputs)
        app.post("/input")(self.set_input)
        app.websocket("/websocket/offer")(self.websocket_offer)
        app.websocket("/telephone/handler")(self.telephone_handler)
        app.post("/telephone/incoming")(self.telephone_incoming)

    def full(self) -> JSONResponse | None:
        if self.engine.free_slots:
            return None
        metrics.REJECTED.inc()
        return busy(self.engine.options.slots)

    async def webrtc_offer(self, request: Request):
        """fastrtc's offer; the answer also carries the connection's `token` for /outputs and /input."""
        self.sweep_soon()
        try:
            offer = await asyncio.to_thread(check_offer, await request.body())  # SDP parsing off the event loop
        except (ValueError, ValidationError) as error:
            return failed(400, "bad_offer", f"Malformed offer: {error}")
        key = webrtc_key(self.stream, offer.webrtc_id)
        if offer.type != "offer":  # a trickled ICE candidate: useless without the peer's ICE password
            if not self.connections.name_candidates(key, 1):
                return failed(400, "too_many_candidates", TOO_MANY_CANDIDATES)
            return await self.stream.handle_offer(offer.model_dump(), set_outputs=None)
        if busy := self.full():
            return busy
        if not self.connections.hold(key, request.client.host if request.client else ""):
            return failed(429, "too_many_pending", TOO_MANY_PENDING)
        try:
            taken = compat.is_known(self.stream, offer.webrtc_id)
            token = self.connections.claim(offer.webrtc_id, "webrtc", taken=taken)
        except (ValueError, KeyError) as error:
            self.connections.let_go(key)
            if isinstance(error, ValueError):
                return failed(400, "bad_offer", f"Malformed offer: {error}")
            return failed(409, "connection_exists", f"{error.args[0]}; make a new random id")
        try:
            outputs = compat.bounded_outputs(self.stream, offer.webrtc_id)
            answer = await self.stream.handle_offer(offer.model_dump(), set_outputs=outputs)
        except Exception as error:  # aiortc rejects what parsed but cannot be negotiated
            logger.info("offer failed: %s", error)
            self.connections.release(offer.webrtc_id)
            self.connections.let_go(key)
            await compat.drop_connection(self.stream, offer.webrtc_id)
            return failed(400, "bad_offer", f"Could not negotiate: {error}")
        if isinstance(answer, dict):
            self.connections.name_candidates(key, offer.sdp.count("a=candidate:"))
            return {**answer, "token": token}
        self.connections.release(offer.webrtc_id)  # fastrtc refused it (its own checks)
        self.connections.let_go(key)
        return answer

    async def page_offer(self, component, offer_to, body, address: str):
        """The page's own offer route (gradio's component_server "offer"), checked as /webrtc/offer
        is: the SDP off the event loop, the candidates and the address's unconnected offers counted."""
        self.sweep_soon()
        try:
            offer = await asyncio.to_thread(check_offer, json.dumps(body).encode())
        except (ValueError, ValidationError) as error:
            return page_failure("bad_offer", f"Malformed offer: {error}")
        key = webrtc_key(component, offer.webrtc_id)
        if offer.type != "offer":
            if not self.connections.name_candidates(key, 1):
                return page_failure("too_many_candidates", TOO_MANY_CANDIDATES)
            return await offer_to(body)
        if not self.connections.hold(key, address):
            return page_failure("too_many_pending", TOO_MANY_PENDING)
        try:
            answer = await offer_to(body)
        except Exception as error:  # aiortc rejects what parsed but cannot be negotiated
            logger.info("the page's offer failed: %s", error)
            self.connections.let_go(key)
            await compat.drop_connection(component, offer.webrtc_id)
            return page_failure("bad_offer", f"Could not negotiate: {error}")
        if isinstance(answer, dict) and "sdp" in answer:
            self.connections.name_candidates(key, offer.sdp.count("a=candidate:"))
        else:
            self.connections.let_go(key)  # refused (fastrtc's own checks)
        return answer

    async def outputs(self, request: Request, webrtc_id: str):
        """Server-sent events with the chat and the turn's status: one reader per connection, with its token.
        Each event is `{"start", "messages", "status", "final"}`: the chat is the first `start` messages the
        reader has, then `messages` (the first event has them all); `final` marks a turn's last update.
        While a reply streams only its message is sent, so an update costs the reply's length, not the
        whole conversation's."""
        if not self.connections.check(webrtc_id, token_of(request)):
            return failed(403, "forbidden", "This connection's token is missing or wrong.")
        claim = self.connections.claims[webrtc_id]
        if claim.readers:
            return failed(409, "already_reading", "This connection's outputs already have a reader.")
        if not compat.is_connected(self.stream, webrtc_id):
            return failed(404, "unknown_connection", "The connection is not up (yet, or any more).")
        queue = compat.output_queue(self.stream, webrtc_id)
        claim.readers += 1

        async def events():
            sent: list[dict] = []  # the chat as this reader has it
            try:
                while not self.closing.is_set():
                    output = await compat.next_output(queue, self.options.keep_alive_s)
                    if output is None:
                        yield ": keep-alive\n\n"  # a comment line: proxies and clients keep the stream open
                        continue
                    history, status, *final = output.args  # (history, status, final): handler.to_fastrtc
                    start = common_prefix(sent, history)  # unchanged messages share their contents: cheap to compare
                    sent = history
                    event = {"start": start, "messages": history[start:], "status": status,
                             "final": bool(final and final[0])}
                    yield f"data: {json.dumps(event)}\n\n"  # ASCII: no U+2028 or U+0085 for a line splitter to cut at
            except EOFError:
                return
            finally:
                claim.readers -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    async def set_input(self, request: Request):
        """Settings for a connection: {"webrtc_id", "token", "mode", "language", "temperature", "spoken"}."""
        try:
            body = json.loads(await request.body())
            webrtc_id = body["webrtc_id"]
            if not isinstance(webrtc_id, str):
                raise TypeError("webrtc_id must be a string")
        except (ValueError, KeyError, TypeError):
            return failed(400, "bad_input", "Send a JSON object with a webrtc_id")
        if not self.connections.check(webrtc_id, token_of(request, body)):
            return failed(403, "forbidden", "This connection's token is missing or wrong.")
        if not compat.is_connected(self.stream, webrtc_id):
            return failed(404, "unknown_connection", "The connection is not up (yet, or any more).")
        self.stream.set_input(webrtc_id, body.get("mode"), body.get("language"), body.get("temperature"),
                         body.get("spoken"))
        return {"status": "ok"}

    async def serve_socket(self, websocket: WebSocket, phone: bool):
        self.sweep_soon()
        socket = CheckedWebSocket(websocket, phone, self.options.session_time_limit_s)
        socket.on_audio = lambda: self.connections.heard(socket)
        if self.full():
            await socket.accept()
            await websocket.send_json(busy_event(self.engine.options.slots))
            return await socket.close()
        if not self.connections.hold(socket, websocket.client.host if websocket.client else ""):
            await socket.accept()
            return await socket.close(f"refused: {TOO_MANY_PENDING}", code=4429)
        try:
            await self.serve_held_socket(socket, phone)
        finally:
            self.connections.let_go(socket)

    async def serve_held_socket(self, socket: CheckedWebSocket, phone: bool):
        websocket = socket.websocket
        try:
            start = await socket.wait_for_start()
        except SocketClosed:
            return
        connection_id = start.get("streamSid") if phone else start.get("websocket_id")
        if phone and self.options.twilio_auth_token:
            given = ((start.get("start") or {}).get("customParameters") or {}).get("token")
            call_sid = (start.get("start") or {}).get("callSid") or ""
            if not isinstance(given, str) or not hmac.compare_digest(
                    given, call_token(self.options.twilio_auth_token, str(call_sid))):
                logger.warning("refused a phone stream without a valid call token")
                return await socket.close("refused: this stream has no valid call token", code=4403)
            now = time.monotonic()
            for sid in [sid for sid, at in self.calls.items() if now - at > 86_400]:  # calls are shorter than a day
                del self.calls[sid]
            if call_sid in self.calls:
                return await socket.close("refused: this call already has its stream", code=4409)
            self.calls[call_sid] = now
        try:
            token = self.connections.claim(connection_id, "phone" if phone else "websocket",
                                           taken=compat.is_known(self.stream, connection_id))
        except (ValueError, KeyError) as error:
            return await socket.close(f"refused: {error.args[0]}", code=4409)
        socket.started = start
        self.connections.heard(socket)  # started: it holds nothing until it has been quiet for a while
        try:
            if not phone:
                await websocket.send_json({"event": "token", "token": token})  # for /outputs and /input
            connection = self.handler.copy()
            connection.phone_mode = phone
            if phone:  # take Twilio's 8 kHz as it comes: fastrtc would resample it with librosa on the event loop
                connection.input_sample_rate = PHONE_RATE
            connection.transport_name = "phone" if phone else "websocket"
            try:
                await compat.serve_websocket(self.stream, connection, socket)
            finally:
                connection.shutdown()  # never blocks
        finally:
            self.connections.release(connection_id)

    async def websocket_offer(self, websocket: WebSocket):
        await self.serve_socket(websocket, phone=False)

    async def telephone_handler(self, websocket: WebSocket):
        await self.serve_socket(websocket, phone=True)

    async def telephone_incoming(self, request: Request):
        form = dict(await request.form())
        if self.options.twilio_auth_token:
            from twilio.request_validator import RequestValidator

            url = str(request.url)
            if request.headers.get("x-forwarded-proto") == "https":
                url = url.replace("http://", "https://", 1)
            signature = request.headers.get("X-Twilio-Signature", "")
            if not RequestValidator(self.options.twilio_auth_token).validate(url, form, signature):
                return PlainTextResponse("invalid Twilio signature", status_code=403)
        if self.full():
            return PlainTextResponse('<?xml version="1.0" encoding="UTF-8"?><Response><Say>All lines are busy. '
                                     'Please call again later.</Say><Hangup/></Response>', media_type="application/xml")
        return PlainTextResponse(twiml(request, form, self.options.twilio_auth_token), media_type="application/xml")


def twiml(request: Request, form: dict, secret: str | None) -> str:
    """Connect the call to /telephone/handler on this host, port and scheme; with a Twilio token set,
    the stream carries the call's signed token, which the handler checks."""
    from twilio.twiml.voice_response import Connect, VoiceResponse

    secure = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
    host = request.headers.get("x-forwarded-host") or request.url.netloc
    path = request.url.path.removesuffix("/telephone/incoming")
    response = VoiceResponse()
    connect = Connect()
    url = f"{'wss' if secure else 'ws'}://{host}{path}/telephone/handler"
    if not secret and request.query_params.get("token"):  # no Twilio signing: the stream needs the access token too
        url += "?" + urlencode({"token": request.query_params["token"]})
    media = connect.stream(url=url)
    if secret:
        media.parameter(name="token", value=call_token(secret, str(form.get("CallSid", ""))))
    response.append(connect)
    response.say("The call has been disconnected.")
    return str(response)
