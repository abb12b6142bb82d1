"""The session API: a plain WebSocket for clients without WebRTC (scripts, mobile apps, call bridges).

    POST /session/create   optional JSON {"mode", "language", "temperature", "spoken", "sample_rate"}
        -> {"session_id", "status": "created", "websocket_url": "/ws/audio/<id>", ...}
    WS /ws/audio/<id>      binary: raw little-endian int16 mono PCM at the session's rate, any chunk size
        client -> server (JSON): text_input {text}, config {mode, language, temperature, spoken}, cancel, clear
        server -> client (JSON): resumed {turns} (first, on a reconnect), turn_start, text_delta {text},
            text_response {text, timestamp, latency_ms, mode, interrupted, status}, user_transcript {turn, text}
            (what was heard, when captions are on), retracted, cleared, hush (stop playing), config {settings},
            error {code, message};
            and, when `spoken`, binary PCM of each spoken sentence at the session's rate

A session is one Conversation (one of --max-sessions, the same cap as every other route) from its
creation until its socket closes. When the client hangs up (or the network drops it) the conversation
is kept for `resume_s` (conversation/parking.py) and a socket to the same URL within that time continues
it; the session id (secrets.token_urlsafe) is its only credential. The time limit ends a session for good.
"""

import asyncio
import json
import logging
import threading
from dataclasses import asdict, dataclass

from fastapi import Request, WebSocket
from fastapi.responses import JSONResponse

from ..audio.pcm import MAX_RATE, MIN_RATE, SAMPLE_RATE
from ..backends.contract import EngineBusy, EngineFailed
from ..conversation.conversation import (
    MODES,
    Conversation,
    ConversationOptions,
    Settings,
)
from ..conversation.parking import Parking
from . import metrics
from .access import Connections
from .errors import busy, failed
from .guard import is_loopback
from .session import Replies, Session, error

logger = logging.getLogger(__name__)

UNKNOWN_SESSION = 4404  # WebSocket close codes (4000-4999: the application's own)
SESSION_TAKEN = 4409
TRY_AGAIN = 1013  # the standard code for "try again later": a reconnect while --max-sessions are connected
CLIENT_TYPES = ("text_input", "config", "cancel", "clear")


@dataclass(frozen=True)
class SessionOptions:
    connect_timeout_s: float = 10.0  # a created session nobody connects to within this expires, freeing its slot
    max_message_bytes: int = 1_000_000  # larger WebSocket messages get an error (1 MB = 31 s of 16 kHz PCM)
    max_body_bytes: int = 10_000  # /session/create's JSON body
    resume_s: float = 120.0  # a session whose socket closed keeps its conversation this long for a reconnect (0: off)
    kept_limit: int = 64  # sessions kept for a reconnect at most; past it the oldest ends (each holds its history)


class BadMessage(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Sessions:
    """The created sessions by id. Owner: the event loop (every method runs there). `connections`
    counts each session against its client address while nobody is connected to it or its socket is
    quiet (access.Connections, shared with the other routes)."""

    def __init__(self, engine, chat_options: ConversationOptions, speaker, options: SessionOptions,
                 time_limit_s: float | None = None, connections: Connections | None = None):
        self.engine = engine
        self.connections = connections or Connections(exempt=is_loopback)
        self.chat_options = chat_options
        self.speaker = speaker
        self.options = options
        self.time_limit_s = time_limit_s  # a session ends this long after its first socket (None: never)
        self.sessions: dict[str, Session] = {}  # created, connected and parked ones
        self.parking = Parking(options.resume_s, options.kept_limit)  # hung-up sessions by id (event loop only)

    def create(self, settings: Settings, rate: int) -> Session:
        """Take a slot (EngineBusy / EngineFailed); it is freed if nobody connects in time."""
        conversation = Conversation(self.engine, self.chat_options, self.speaker, settings, name="session_ws",
                                    listener=metrics.conversation_event).open()
        session = Session(conversation, rate, settings, on_close=self.end)
        self.sessions[session.id] = session
        session.expiry = asyncio.get_running_loop().call_later(self.options.connect_timeout_s, self.expire, session)
        return session

    def expire(self, session: Session) -> None:
        if not session.connected:
            logger.info("session %s… expired: nobody connected in %.0f s", session.id[:6],
                        self.options.connect_timeout_s)
            self.end(session)

    def park(self, session: Session) -> None:
        """The socket closed but the session did not end: keep it `resume_s` for a reconnect."""
        session.connected, session.parked = False, True
        self.connections.let_go(session_key(session))  # a hung-up session holds no slot
        session.conversation.post("cancel")  # nobody hears the rest of a reply in progress; what it said stays
        session.conversation.post("kept", self.options.resume_s)  # not idle while it waits
        self.engine.leave(session.conversation.chat)
        self.parking.park(session.id, session)  # ends it at once when resume is off or it has closed
        asyncio.get_running_loop().call_later(self.options.resume_s + 0.1, self.parking.sweep)

    def unpark(self, session: Session) -> bool:
        """A socket for a parked session: -> whether it is back (False: it expired); EngineBusy when
        --max-sessions others are connected (it stays parked)."""
        self.engine.come_back(session.conversation.chat)
        if self.parking.take(session.id) is None:
            return False
        session.parked = False
        return True

    def end(self, session: Session) -> None:
        """Never blocks: the conversation and the audio thread close on their own."""
        self.sessions.pop(session.id, None)
        self.connections.let_go(session_key(session))
        if session.expiry is not None:
            session.expiry.cancel()
        session.conversation.close()
        session.audio.shutdown(wait=False, cancel_futures=True)

    def end_all(self) -> None:
        """At server shutdown: free every session's slot (pending expiries would never run)."""
        self.parking.close_all()
        for session in list(self.sessions.values()):
            self.end(session)

    async def serve(self, websocket: WebSocket, session: Session) -> None:
        """The connected socket: receive until it closes (or the conversation does). Then the session
        ends, or, when the client hung up, is parked for a reconnect."""
        loop = asyncio.get_running_loop()
        outgoing: asyncio.Queue = asyncio.Queue()

        def deliver(message) -> None:  # from the Replies thread
            try:
                loop.call_soon_threadsafe(outgoing.put_nowait, message)
            except RuntimeError:  # the loop has gone: nobody is listening any more
                pass

        resumed = session.replies is not None
        if session.replies is None:
            session.replies = Replies(session)
            threading.Thread(target=session.replies.run, name=f"voxtral-replies-{session.id[:6]}", daemon=True).start()
        turns = session.replies.attach(deliver)
        if resumed:  # before anything the conversation says from now on (that arrives via call_soon)
            outgoing.put_nowait({"type": "resumed", "turns": turns})
        if session.deadline is None and self.time_limit_s is not None:
            session.deadline = loop.time() + self.time_limit_s
        timeout = None if session.deadline is None else max(0.0, session.deadline - loop.time())
        receiving = asyncio.create_task(self.receive(websocket, session, outgoing))
        sending = asyncio.create_task(self.send(websocket, outgoing))
        hung_up = False
        try:
            done, _ = await asyncio.wait({receiving, sending}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            hung_up = receiving in done and sending not in done
            if not done:
                sending.cancel()
                await websocket.send_json(error("time_limit", f"sessions last at most {self.time_limit_s:.0f} s"))
                await websocket.close(1000, "the session reached its time limit")
        except (RuntimeError, OSError):  # the client has gone already
            pass
        finally:
            for task in (receiving, sending):
                task.cancel()
            session.replies.detach()
            if hung_up and self.options.resume_s > 0:
                self.park(session)
            else:
                self.end(session)

    async def send(self, websocket: WebSocket, outgoing: asyncio.Queue) -> None:
        """The socket's only writer."""
        try:
            while (message := await outgoing.get()) is not None:
                if isinstance(message, bytes):
                    await websocket.send_bytes(message)
                else:
                    await websocket.send_json(message)
            await websocket.close(1000, "the conversation has ended")
        except (RuntimeError, OSError) as problem:  # the client went away mid-send
            logger.debug("session socket closed while sending: %s", problem)

    async def receive(self, websocket: WebSocket, session: Session, outgoing: asyncio.Queue) -> None:
        try:
            await self.receive_each(websocket, session, outgoing)
        except RuntimeError as problem:  # the socket closed under us (the server closed it first)
            logger.debug("session socket: %s", problem)
        except Exception:  # noqa: BLE001 - a bug ends this session, never the server
            logger.exception("session %s…: receiving failed", session.id[:6])

    async def receive_each(self, websocket: WebSocket, session: Session, outgoing: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        limit = self.options.max_message_bytes
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            pcm, text = message.get("bytes"), message.get("text")
            if pcm or text:  # not quiet: it holds nothing for the next while (Connections)
                self.connections.heard(session_key(session))
            try:
                if pcm is not None:
                    if len(pcm) > limit:
                        raise BadMessage("message_too_large", f"{len(pcm)} bytes; send at most {limit} per message")
                    if len(pcm) % 2:
                        raise BadMessage("bad_audio", "binary messages are 16-bit PCM: an even number of bytes")
                    kinds = await loop.run_in_executor(session.audio, session.hear, pcm)
                    if "speech" in kinds:
                        outgoing.put_nowait({"type": "turn_start"})
                elif text is not None:
                    if len(text) > limit // 4 and len(text.encode()) > limit:
                        raise BadMessage("message_too_large", f"send at most {limit} bytes per message")
                    reply = self.command(session, text)
                    if reply is not None:
                        outgoing.put_nowait(reply)
            except BadMessage as bad:
                metrics.ERRORS.labels("client").inc()
                outgoing.put_nowait(error(bad.code, str(bad)))

    def command(self, session: Session, text: str) -> dict | None:
        """One JSON message from the client -> posted to the conversation (and maybe an answer)."""
        try:
            message = json.loads(text)
        except (ValueError, RecursionError) as problem:  # RecursionError: nested thousands of levels deep
            raise BadMessage("bad_json", f"not JSON: {type(problem).__name__}") from None
        if not isinstance(message, dict) or message.get("type") not in CLIENT_TYPES:
            raise BadMessage("unknown_type", f"a text message is a JSON object with a type in {list(CLIENT_TYPES)}")
        kind = message["type"]
        if kind == "text_input":
            typed = message.get("text")
            limit = self.chat_options.max_text_chars
            if not isinstance(typed, str) or not typed.strip() or len(typed) > limit:
                raise BadMessage("bad_text", f"text_input needs a 'text' of 1-{limit} characters")
            session.conversation.post("text", typed)
        elif kind == "config":
            if "sample_rate" in message and message["sample_rate"] != session.rate:
                raise BadMessage("bad_config", "sample_rate is fixed when the session is created")
            if message.get("mode") is not None and message["mode"] not in MODES:
                raise BadMessage("bad_config", f"mode must be one of {list(MODES)}")
            session.settings = Settings.from_dict(message, session.settings)
            session.conversation.post("settings", session.settings)
            return {"type": "config", "settings": asdict(session.settings)}
        else:  # cancel (stop the reply) and clear (forget the conversation)
            session.conversation.post(kind)
        return None


def session_request(body: dict, chat_options: ConversationOptions) -> tuple[Settings, int]:
    """/session/create's JSON body -> (settings, sample rate), or ValueError saying what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    rate = body.get("sample_rate", SAMPLE_RATE)
    if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"sample_rate must be a whole number of Hz in {MIN_RATE}-{MAX_RATE}")
    if body.get("mode") is not None and body["mode"] not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0.0 <= temperature <= 2.0):  # NaN compares false too
        raise ValueError("temperature must be a number from 0 to 2")
    return Settings.from_dict(body, Settings(temperature=chat_options.temperature)), rate


def session_key(session: Session) -> tuple:
    """A session's key in access.Connections.holds."""
    return ("session", session.id)


def add_session_routes(app, engine, chat_options: ConversationOptions, speaker,
                       options: SessionOptions = SessionOptions(), time_limit_s: float | None = None,
                       connections: Connections | None = None) -> Sessions:
    """Serve POST /session/create and WS /ws/audio/{session_id} on `app`; `time_limit_s`: the
    server's limit per connection (--session-time-limit); `connections`: the server's count of what
    each address holds unconnected or quiet (one of its own when None)."""
    sessions = Sessions(engine, chat_options, speaker, options, time_limit_s, connections)
    app.state.sessions = sessions

    @app.post("/session/create")
    async def create_session(request: Request):
        address = request.client.host if request.client else ""
        place = object()  # this request's place among what its address holds, until its session has an id
        if not sessions.connections.hold(place, address):
            return failed(429, "too_many_pending", "Your address holds sessions nobody has connected to (or other "
                          "connections not connected, started or speaking); connect to one (or wait 10 s) first.")
        try:
            return await create(request, place)
        finally:
            sessions.connections.let_go(place)  # unless it went to the session

    async def create(request: Request, place) -> dict | JSONResponse:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > options.max_body_bytes:
                return failed(413, "body_too_large", f"Send at most {options.max_body_bytes} bytes of JSON")
        try:
            settings, rate = session_request(json.loads(body) if body.strip() else {}, chat_options)
        except ValueError as problem:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            return failed(400, "bad_request", f"Malformed session request: {problem}")
        try:
            session = sessions.create(settings, rate)
        except EngineBusy:
            metrics.REJECTED.inc()
            return busy(engine.options.slots)
        except EngineFailed as problem:
            metrics.REJECTED.inc()
            return failed(503, "engine_failed", f"The server cannot answer right now ({problem}).")
        sessions.connections.rename(place, session_key(session))
        return {"session_id": session.id, "status": "created", "websocket_url": f"/ws/audio/{session.id}",
                "sample_rate": rate, "settings": asdict(settings), "expires_in_s": options.connect_timeout_s}

    @app.websocket("/ws/audio/{session_id}")
    async def audio_socket(websocket: WebSocket, session_id: str):
        await websocket.accept()  # then close with a code the client can read (a refused handshake has none)
        session = sessions.sessions.get(session_id)
        if session is None:
            await websocket.close(UNKNOWN_SESSION, "unknown or expired session: POST /session/create first")
            return
        if session.connected:
            await websocket.close(SESSION_TAKEN, "this session already has a socket")
            return
        if session.parked:
            try:
                back = sessions.unpark(session)
            except EngineBusy:
                metrics.REJECTED.inc()
                await websocket.send_json(error("busy", "every conversation slot is in use; try again shortly"))
                await websocket.close(TRY_AGAIN, "every conversation slot is in use")
                return
            if not back:
                await websocket.close(UNKNOWN_SESSION, "unknown or expired session: POST /session/create first")
                return
        session.connected = True
        session.expiry.cancel()
        sessions.connections.track(session_key(session), websocket.client.host if websocket.client else "")
        await sessions.serve(websocket, session)

    return sessions
