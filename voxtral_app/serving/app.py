"""The FastAPI app: the transports' routes (transports.py: WebRTC, WebSocket and telephone), the
session API, /v1, the Gradio UI, /health and /metrics.

`create_app(engine)` builds it; pass `app=` to mount everything inside your own FastAPI service.
Every request first passes guard.py (body caps, access token, rate limits); the routes check what
they are sent before fastrtc sees it; and the shared cap on conversations (the engine's KV-cache
slots) covers browsers, WebRTC/WebSocket clients, session-API clients and phone calls alike.
"""

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastrtc import Stream

from ..audio.pcm import check_header
from ..compat import fastrtc as compat
from ..compat import gradio as gradio_compat
from ..conversation.conversation import ConversationOptions
from ..conversation.speech import VoiceOptions, load_speaker_or_none
from ..model.engine import Engine
from . import metrics
from .access import AccessOptions, Connections
from .guard import Guard, GuardOptions, is_loopback
from .handler import VoxtralHandler
from .openai_routes import add_openai_routes
from .session_api import SessionOptions, add_session_routes
from .transports import Transports
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

    transports = Transports(stream, handler, engine, connections, options, closing, sweep_soon)
    transports.add_routes(app)  # /webrtc/offer, /outputs, /input, /websocket/offer, /telephone/*
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
        compat.check_page_offers(component, transports.page_offer)
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


def guard_login(options: GuardOptions):
    """The page's login when an access token is set: any user name, the token as the password."""
    if not options.auth_token:
        return None
    return lambda _user, password: hmac.compare_digest(str(password).encode(), options.auth_token.encode())
