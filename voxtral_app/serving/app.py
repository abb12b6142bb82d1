"""The FastAPI app: FastRTC's WebRTC, WebSocket and telephone routes, the Gradio UI, /health.

`create_app(engine)` builds it; pass `app=` to mount everything inside your own FastAPI service.
The routes are fastrtc's own handlers behind checks: every request first passes guard.py (body
caps, access token, rate limits); malformed offers and messages get a 4xx or an error event instead
of reaching fastrtc; a connection id is claimed once and its token (access.py) is needed to read
or steer it; sockets have deadlines (sockets.py); and the shared cap on conversations (the engine's
KV-cache slots) covers browsers, WebRTC/WebSocket clients and phone calls alike.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from urllib.parse import urlencode

import gradio as gr
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastrtc import Stream
from pydantic import ValidationError

from ..audio.pcm import check_header
from ..compat import fastrtc as compat
from ..compat import gradio as gradio_compat
from ..conversation.conversation import ConversationOptions
from ..conversation.speech import VoiceOptions, load_speaker_or_none
from ..model.chat import common_prefix
from ..model.engine import Engine
from . import metrics
from .access import CANDIDATES_PER_CONNECTION, AccessOptions, Connections, webrtc_key
from .errors import busy, busy_event, failed
from .guard import Guard, GuardOptions, is_loopback
from .handler import PHONE_RATE, VoxtralHandler
from .offers import check_offer
from .openai_routes import add_openai_routes
from .session_api import SessionOptions, add_session_routes
from .sockets import CheckedWebSocket, SocketClosed, call_token
from .ui import build_ui
from .uploads import (
    UploadGate,
    UploadLedger,
    UploadOptions,
    limit_conversations,
    link_uploads,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOptions:
    session_time_limit_s: float | None = 900.0  # a connection is closed after 15 min (None: no limit)
    twilio_auth_token: str | None = None  # set to check X-Twilio-Signature on /telephone/incoming
    rtc_configuration: dict | Callable[[], dict] | None = None  # the browser's ICE servers (TURN when not on a
    # LAN), or a function fastrtc calls per connection for fresh credentials: serving/ice.py
    jitter_prefetch: int = 1  # audio packets (20 ms each) aiortc buffers before decoding; its default 4
    # adds 60 ms to every turn. Raise it for lossy links where audio sounds choppy.
    debug: bool = False  # the page logs to the browser console (fastrtc's component is chatty)
    keep_alive_s: float = 15.0  # /outputs sends a comment this often when there is nothing else to say
    guard: GuardOptions = GuardOptions()  # body caps, access token, rate limits
    access: AccessOptions = AccessOptions()  # offer deadline
    sessions: SessionOptions = SessionOptions()  # the session API (POST /session/create, WS /ws/audio/{id})
    resume_s: float = 120.0  # a dropped connection's conversation (a page's between its calls) waits this long
    uploads: UploadOptions = UploadOptions()  # the page's upload quotas
    page_events_per_address: int = 8  # the page's pending events (queued or streaming) per client address
    page_conversations_per_address: int = 2  # the page's upload/text-box conversations per client address


TOO_MANY_PENDING = ("Your address holds connections that have not connected (or started, or spoken) yet; "
                    "connect one, or wait 10 s.")
TOO_MANY_CANDIDATES = f"A connection may name at most {CANDIDATES_PER_CONNECTION} ICE candidates."


def page_failure(error: str, message: str) -> dict:
    """fastrtc's failure body, as the page's offer route answers it (the page shows `message`)."""
    return {"status": "failed", "meta": {"error": error}, "message": message}


def create_app(engine: Engine, chat_options: ConversationOptions | None = None, options: ServerOptions = ServerOptions(),
               speaker="auto", app: FastAPI | None = None, handler=None) -> FastAPI:
    """FastAPI app serving Voxtral: UI at /, /webrtc/offer, /websocket/offer, /telephone/*, /health, /metrics,
    POST /session/create + WS /ws/audio/{id} (session_api.py).

    `speaker`: text-to-speech for spoken replies ("auto": the best one here; None: text only).
    `app`: mount into this FastAPI app instead of a new one. `handler`: a fastrtc handler to use
    instead of VoxtralHandler (bench/turn_latency.py compares fastrtc's default turn-taking).
    """
    chat_options = chat_options or ConversationOptions(max_audio_s=engine.options.max_audio_s)
    if speaker == "auto":
        speaker = load_speaker_or_none(VoiceOptions())
    handler = handler or VoxtralHandler(engine, chat_options, speaker)
    compat.buffer_less_audio(options.jitter_prefetch)
    compat.end_tracks_quietly()  # no aiortc traceback when a tab closes without Stop
    gradio_compat.quiet_debug_prints()  # gradio's stray print()s on the server console
    slots = engine.options.slots
    stream = Stream(handler, modality="audio", mode="send-receive", concurrency_limit=slots,
                    time_limit=options.session_time_limit_s, rtc_configuration=options.rtc_configuration)
    ui = build_ui(engine, handler, slots, options.session_time_limit_s, options.rtc_configuration, options.debug,
                  options.resume_s)
    app = app or FastAPI(title="Voxtral realtime", docs_url=None, redoc_url=None)  # their pages load from a CDN
    ledger = UploadLedger(options.uploads)
    app.add_middleware(UploadGate, ledger=ledger)  # inside the guard: it sees the client's own address
    app.add_middleware(Guard, options=replace(options.guard, twilio_signed=bool(options.twilio_auth_token)))
    connections = Connections(options.access, exempt=lambda address: is_loopback(address) and not
                              options.guard.limit_loopback)
    app.state.stream = stream
    app.state.engine = engine
    app.state.ui = ui
    app.state.connections = connections
    sweeper: list[asyncio.Task] = []  # started at start-up, or by the first request (an app mounted inside another
    # has no start-up of ours)
    closing = asyncio.Event()  # set at shutdown: streams end, so the server can exit
    calls: dict[str, float] = {}  # CallSid -> when its stream started: a call token opens one stream

    def sweep_soon() -> None:
        if not sweeper:
            sweeper.append(asyncio.create_task(sweep_forever()))

    async def sweep_forever() -> None:
        if compat.event_loop_kind() != "uvloop":
            logger.warning("WebRTC is served by asyncio's own event loop, which reads one UDP packet per socket "
                           "per iteration: under load, connections drop after ~30 s. Install uvloop "
                           "(requirements.txt) and let uvicorn pick it (its default, loop='auto').")
        mixins = [stream] + compat.page_components(ui)
        while not closing.is_set():
            try:
                await connections.sweep(mixins)
                ui.parking.sweep()  # the pages' conversations nobody came back to close (page open or not)
                ledger.sweep()  # and the uploads sent into them go
            except Exception:  # noqa: BLE001 - the sweeper must outlive one bad connection
                logger.exception("sweep failed")
            await asyncio.sleep(options.access.sweep_every_s)

    async def shut_down() -> None:
        closing.set()
        ui.page_calls.end_all("The server is shutting down. Please come back in a minute.")
        await asyncio.sleep(0.2)  # the pages' emit workers send it (each looks every 20 ms)
        for connection_id, _, _ in compat.peers(stream):
            await compat.drop_connection(stream, connection_id)
        sessions.end_all()  # free every session's slot (pending expiries would never run)
        ui.parking.close_all()  # the pages' conversations between calls

    add_lifespan(app, shut_down, sweep_soon)

    def full() -> JSONResponse | None:
        if engine.free_slots:
            return None
        metrics.REJECTED.inc()
        return busy(slots)

    def token_of(request: Request, body: dict | None = None):
        header = request.headers.get("x-voxtral-token")
        return header or request.query_params.get("token") or (body or {}).get("token")

    @app.get("/health")
    async def health():
        """healthy | warming_up | degraded (503: the decode thread died or is stuck)."""
        status = "degraded" if not engine.healthy else "healthy" if engine.ready.is_set() else "warming_up"
        body = {"status": status, "model": engine.options.model, "device": engine.device_name,
                "compiled": engine.compiled, "active_sessions": engine.active_chats, "max_sessions": slots,
                "conversations_kept": engine.kept_conversations,
                "kv_slots_in_use": getattr(engine, "kv_rows_in_use", None),  # None: the remote backend has none here
                "kv_conversations_on_host": getattr(engine, "kept_on_host", None),
                "backend": engine.describe(), "event_loop": compat.event_loop_kind()}
        if engine.failure is not None:
            body["error"] = f"the decode thread died: {engine.failure}"
        elif engine.stuck:
            body["error"] = "the decode thread has not stepped for a while"
        body.update(metrics.system_health(engine))  # gpu_available, gpu_count, system{cpu, memory, GPU GB}
        return JSONResponse(body, status_code=503 if status == "degraded" else 200)

    if isinstance(engine, Engine):  # OpenAI-compatible /v1 routes on the local engine
        add_openai_routes(app, engine)

    @app.post("/webrtc/offer")
    async def webrtc_offer(request: Request):
        """fastrtc's offer; the answer also carries the connection's `token` for /outputs and /input."""
        sweep_soon()
        try:
            offer = await asyncio.to_thread(check_offer, await request.body())  # SDP parsing off the event loop
        except (ValueError, ValidationError) as error:
            return failed(400, "bad_offer", f"Malformed offer: {error}")
        key = webrtc_key(stream, offer.webrtc_id)
        if offer.type != "offer":  # a trickled ICE candidate: useless without the peer's ICE password
            if not connections.name_candidates(key, 1):
                return failed(400, "too_many_candidates", TOO_MANY_CANDIDATES)
            return await stream.handle_offer(offer.model_dump(), set_outputs=None)
        if busy := full():
            return busy
        if not connections.hold(key, request.client.host if request.client else ""):
            return failed(429, "too_many_pending", TOO_MANY_PENDING)
        try:
            token = connections.claim(offer.webrtc_id, "webrtc", taken=compat.is_known(stream, offer.webrtc_id))
        except (ValueError, KeyError) as error:
            connections.let_go(key)
            if isinstance(error, ValueError):
                return failed(400, "bad_offer", f"Malformed offer: {error}")
            return failed(409, "connection_exists", f"{error.args[0]}; make a new random id")
        try:
            outputs = compat.bounded_outputs(stream, offer.webrtc_id)
            answer = await stream.handle_offer(offer.model_dump(), set_outputs=outputs)
        except Exception as error:  # aiortc rejects what parsed but cannot be negotiated
            logger.info("offer failed: %s", error)
            connections.release(offer.webrtc_id)
            connections.let_go(key)
            await compat.drop_connection(stream, offer.webrtc_id)
            return failed(400, "bad_offer", f"Could not negotiate: {error}")
        if isinstance(answer, dict):
            connections.name_candidates(key, offer.sdp.count("a=candidate:"))
            return {**answer, "token": token}
        connections.release(offer.webrtc_id)  # fastrtc refused it (its own checks)
        connections.let_go(key)
        return answer

    async def page_offer(component, offer_to, body, address: str):
        """The page's own offer route (gradio's component_server "offer"), checked as /webrtc/offer
        is: the SDP off the event loop, the candidates and the address's unconnected offers counted."""
        sweep_soon()
        try:
            offer = await asyncio.to_thread(check_offer, json.dumps(body).encode())
        except (ValueError, ValidationError) as error:
            return page_failure("bad_offer", f"Malformed offer: {error}")
        key = webrtc_key(component, offer.webrtc_id)
        if offer.type != "offer":
            if not connections.name_candidates(key, 1):
                return page_failure("too_many_candidates", TOO_MANY_CANDIDATES)
            return await offer_to(body)
        if not connections.hold(key, address):
            return page_failure("too_many_pending", TOO_MANY_PENDING)
        try:
            answer = await offer_to(body)
        except Exception as error:  # aiortc rejects what parsed but cannot be negotiated
            logger.info("the page's offer failed: %s", error)
            connections.let_go(key)
            await compat.drop_connection(component, offer.webrtc_id)
            return page_failure("bad_offer", f"Could not negotiate: {error}")
        if isinstance(answer, dict) and "sdp" in answer:
            connections.name_candidates(key, offer.sdp.count("a=candidate:"))
        else:
            connections.let_go(key)  # refused (fastrtc's own checks)
        return answer

    @app.get("/outputs")
    async def outputs(request: Request, webrtc_id: str):
        """Server-sent events with the chat and the turn's status: one reader per connection, with its token.
        Each event is `{"start", "messages", "status", "final"}`: the chat is the first `start` messages the
        reader has, then `messages` (the first event has them all); `final` marks a turn's last update.
        While a reply streams only its message is sent, so an update costs the reply's length, not the
        whole conversation's."""
        if not connections.check(webrtc_id, token_of(request)):
            return failed(403, "forbidden", "This connection's token is missing or wrong.")
        claim = connections.claims[webrtc_id]
        if claim.readers:
            return failed(409, "already_reading", "This connection's outputs already have a reader.")
        if not compat.is_connected(stream, webrtc_id):
            return failed(404, "unknown_connection", "The connection is not up (yet, or any more).")
        queue = compat.output_queue(stream, webrtc_id)
        claim.readers += 1

        async def events():
            sent: list[dict] = []  # the chat as this reader has it
            try:
                while not closing.is_set():
                    output = await compat.next_output(queue, options.keep_alive_s)
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

    @app.post("/input")
    async def set_input(request: Request):
        """Settings for a connection: {"webrtc_id", "token", "mode", "language", "temperature", "spoken"}."""
        try:
            body = json.loads(await request.body())
            webrtc_id = body["webrtc_id"]
            if not isinstance(webrtc_id, str):
                raise TypeError("webrtc_id must be a string")
        except (ValueError, KeyError, TypeError):
            return failed(400, "bad_input", "Send a JSON object with a webrtc_id")
        if not connections.check(webrtc_id, token_of(request, body)):
            return failed(403, "forbidden", "This connection's token is missing or wrong.")
        if not compat.is_connected(stream, webrtc_id):
            return failed(404, "unknown_connection", "The connection is not up (yet, or any more).")
        stream.set_input(webrtc_id, body.get("mode"), body.get("language"), body.get("temperature"),
                         body.get("spoken"))
        return {"status": "ok"}

    async def serve_socket(websocket: WebSocket, phone: bool):
        sweep_soon()
        socket = CheckedWebSocket(websocket, phone, options.session_time_limit_s)
        socket.on_audio = lambda: connections.heard(socket)
        if full():
            await socket.accept()
            await websocket.send_json(busy_event(slots))
            return await socket.close()
        if not connections.hold(socket, websocket.client.host if websocket.client else ""):
            await socket.accept()
            return await socket.close(f"refused: {TOO_MANY_PENDING}", code=4429)
        try:
            await serve_held_socket(socket, phone)
        finally:
            connections.let_go(socket)

    async def serve_held_socket(socket: CheckedWebSocket, phone: bool):
        websocket = socket.websocket
        try:
            start = await socket.wait_for_start()
        except SocketClosed:
            return
        connection_id = start.get("streamSid") if phone else start.get("websocket_id")
        if phone and options.twilio_auth_token:
            given = ((start.get("start") or {}).get("customParameters") or {}).get("token")
            call_sid = (start.get("start") or {}).get("callSid") or ""
            if not isinstance(given, str) or not hmac.compare_digest(
                    given, call_token(options.twilio_auth_token, str(call_sid))):
                logger.warning("refused a phone stream without a valid call token")
                return await socket.close("refused: this stream has no valid call token", code=4403)
            now = time.monotonic()
            for sid in [sid for sid, at in calls.items() if now - at > 86_400]:  # calls are shorter than a day
                del calls[sid]
            if call_sid in calls:
                return await socket.close("refused: this call already has its stream", code=4409)
            calls[call_sid] = now
        try:
            token = connections.claim(connection_id, "phone" if phone else "websocket",
                                      taken=compat.is_known(stream, connection_id))
        except (ValueError, KeyError) as error:
            return await socket.close(f"refused: {error.args[0]}", code=4409)
        socket.started = start
        connections.heard(socket)  # started: it holds nothing until it has been quiet for a while
        try:
            if not phone:
                await websocket.send_json({"event": "token", "token": token})  # for /outputs and /input
            connection = handler.copy()
            connection.phone_mode = phone
            if phone:  # take Twilio's 8 kHz as it comes: fastrtc would resample it with librosa on the event loop
                connection.input_sample_rate = PHONE_RATE
            connection.transport_name = "phone" if phone else "websocket"
            try:
                await compat.serve_websocket(stream, connection, socket)
            finally:
                connection.shutdown()  # never blocks
        finally:
            connections.release(connection_id)

    @app.websocket("/websocket/offer")
    async def websocket_offer(websocket: WebSocket):
        await serve_socket(websocket, phone=False)

    @app.websocket("/telephone/handler")
    async def telephone_handler(websocket: WebSocket):
        await serve_socket(websocket, phone=True)

    @app.post("/telephone/incoming")
    async def telephone_incoming(request: Request):
        form = dict(await request.form())
        if options.twilio_auth_token:
            from twilio.request_validator import RequestValidator

            url = str(request.url)
            if request.headers.get("x-forwarded-proto") == "https":
                url = url.replace("http://", "https://", 1)
            signature = request.headers.get("X-Twilio-Signature", "")
            if not RequestValidator(options.twilio_auth_token).validate(url, form, signature):
                return PlainTextResponse("invalid Twilio signature", status_code=403)
        if full():
            return PlainTextResponse('<?xml version="1.0" encoding="UTF-8"?><Response><Say>All lines are busy. '
                                     'Please call again later.</Say><Hangup/></Response>', media_type="application/xml")
        return PlainTextResponse(twiml(request, form, options.twilio_auth_token), media_type="application/xml")

    sessions = add_session_routes(app, engine, chat_options, speaker, options.sessions, options.session_time_limit_s,
                                  connections)
    metrics.add_metrics_route(app, engine)  # GET /metrics
    gr.mount_gradio_app(app, ui, path="/", auth=guard_login(options.guard))
    gradio_compat.guard_input_files(ui, ledger.allowed, ledger.forget)
    gradio_compat.bound_queue(ui, options.page_events_per_address, exempt=is_loopback)
    connections.others = limit_conversations(ui.conversations, options.page_conversations_per_address,
                                             gradio_compat.event_address, gr.Warning, held=connections.pending)
    link_uploads(ui.conversations, ledger, gradio_compat.event_session)
    gradio_compat.check_audio_files(lambda path: check_header(path, engine.options.max_audio_s))
    gradio_compat.quiet_errors(app)
    for component in compat.page_components(ui):
        compat.end_unknown_outputs(component)
        compat.check_page_offers(component, page_offer)
    app.state.uploads_ledger = ledger
    return app


def add_lifespan(app: FastAPI, shut_down: Callable[[], Awaitable[None]], start: Callable[[], None]) -> None:
    """Run `start` when `app` starts and `shut_down` when it stops, inside whatever lifespan the app
    already has (an app we are mounted into keeps its own start-up and shut-down)."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(served):
        async with inner(served) as state:
            start()
            try:
                yield state
            finally:
                await shut_down()

    app.router.lifespan_context = lifespan


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


def guard_login(options: GuardOptions):
    """The page's login when an access token is set: any user name, the token as the password."""
    if not options.auth_token:
        return None
    return lambda _user, password: hmac.compare_digest(str(password).encode(), options.auth_token.encode())
