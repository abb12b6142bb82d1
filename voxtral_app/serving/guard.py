"""The front door: every HTTP request and WebSocket passes here before any route reads it.

`Guard` is plain ASGI middleware: it takes the client's address from X-Forwarded-For only when the
peer is a trusted proxy (`--forwarded-allow-ips`), refuses an over-size body with 413 before reading
it (by its Content-Length, and by counting when the body is streamed) and a JSON body nested too
deeply with 400, asks for the server's access token when one is set (`--auth-token`, throttling
wrong guesses per address), limits how often one address may open offers and sockets, takes a
request that names a page session (gradio's session_hash) only with the token that session was
bound to (page_sessions.py), and a page event that names one of the page's connections only from
the page session that offered it.
"""

import asyncio
import hmac
import json
import logging
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from urllib.parse import parse_qs

from . import page_sessions
from .page_sessions import PREFIX, PageSessions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardOptions:
    auth_token: str | None = None  # when set, the APIs want `Authorization: Bearer <it>` (or ?token=), the page a login
    default_body_bytes: int = 1_048_576  # 1 MB: any request body not named below
    body_bytes: tuple[tuple[str, int], ...] = (  # (path prefix, cap); the first match wins
        ("/webrtc/offer", 65_536),  # an SDP offer is a few kB
        ("/gradio_api/component_server", 65_536),  # the page's own WebRTC offers
        ("/input", 4_096),
        ("/telephone/incoming", 65_536),
        ("/gradio_api/upload", 64 * 1_048_576),  # a 5 min upload at 48 kHz stereo is ~58 MB
        ("/upload", 64 * 1_048_576),
        ("/v1/audio", 26_214_400),  # OpenAI's own 25 MB audio limit
        ("/v1/chat", 26_214_400),
    )
    opens_per_minute: int = 30  # offers, socket opens and /v1 requests one client address may make per minute
    # (0: no limit)
    limit_loopback: bool = False  # also limit 127.0.0.1/::1 (off: local tests and reverse proxies)
    front_end_ips: tuple[str, ...] = ()  # your own front ends (addresses or networks) whose /v1 requests
    # carry many people's turns (--backend openai): exempt from the per-address limits, as loopback is
    open_paths: tuple[str, ...] = ("/webrtc/offer", "/websocket/offer", "/telephone/handler", "/session/create",
                                   "/ws/audio", "/v1/chat", "/v1/audio")
    public_paths: tuple[str, ...] = ("/health",)  # no token: health checks
    twilio_signed: bool = False  # --twilio-auth-token is set: the phone routes check Twilio's signatures instead
    failed_auth_per_minute: int = 10  # wrong tokens and page logins one address may try a minute (then 429)
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")  # proxies whose X-Forwarded-For names the
    # client (addresses or networks; "*": any peer, e.g. on a Space, whose own proxy is the only way in)
    generations_per_address: int = 2  # /v1 chat and transcription requests one client address may have in
    # flight (0: no limit): its share of the engine's prefill turns is bounded whatever it sends
    generation_paths: tuple[str, ...] = ("/v1/chat", "/v1/audio")
    json_depth: int = 64  # deepest nesting of a JSON body (and socket message); deeper gets 400
    json_paths: tuple[str, ...] = ("/input", "/session/create", "/v1/", "/webrtc/offer", "/gradio_api/")

    def body_cap(self, path: str) -> int:
        return next((cap for prefix, cap in self.body_bytes if path.startswith(prefix)), self.default_body_bytes)


class RateLimit:
    """Tries (opens, failed logins) per client address in the last minute. Owned by the event loop (only the middleware uses it)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.seen: dict[str, deque] = {}

    def allow(self, address: str) -> bool:
        now = time.monotonic()
        times = self.seen.setdefault(address, deque())
        while times and now - times[0] > 60:
            times.popleft()
        if len(times) >= self.per_minute:
            return False
        times.append(now)
        self.forget_idle(now)
        return True

    def full(self, address: str) -> bool:
        """Whether `allow` would refuse now (without counting a try)."""
        now = time.monotonic()
        times = self.seen.get(address) or deque()
        return sum(1 for t in times if now - t <= 60) >= self.per_minute

    def forget_idle(self, now: float) -> None:
        if len(self.seen) > 10_000:  # forget idle addresses rather than grow without bound
            self.seen = {a: t for a, t in self.seen.items() if t and now - t[-1] < 60}


def too_deep(raw: bytes, limit: int) -> bool:
    """Whether a JSON text nests arrays/objects deeper than `limit` (strings are skipped). Python's
    json module raises RecursionError (a 500) a few thousand levels down."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for token in JSON_TOKENS.finditer(raw):
        match token.group()[:1]:
            case b"[" | b"{":
                depth += 1
                if depth > limit:
                    return True
            case b"]" | b"}":
                depth -= 1
    return False


JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def trusted(address: str, proxies: tuple[str, ...]) -> bool:
    if "*" in proxies:
        return True
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in ip_network(proxy, strict=False) for proxy in proxies)


def client_address(scope, proxies: tuple[str, ...]) -> str:
    """The client's address: the peer's, or, behind trusted proxies, the last untrusted one of
    X-Forwarded-For (each proxy appends the address it saw; anything left of it could be forged)."""
    peer = (scope.get("client") or ("", 0))[0]
    if not proxies or not trusted(peer, proxies):
        return peer
    forwarded = b",".join(v for k, v in scope.get("headers") or [] if k == b"x-forwarded-for").decode("latin-1")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not trusted(hop, proxies):
            return hop
    return hops[0] if hops else peer


def is_loopback(address: str) -> bool:
    try:
        return ip_address(address).is_loopback
    except ValueError:
        return False


def bearer(scope) -> str | None:
    headers = dict(scope.get("headers") or [])
    value = headers.get(b"authorization", b"").decode("latin-1")
    if value.lower().startswith("bearer "):
        return value[7:].strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return (query.get("token") or [None])[0]


class PageConnections:
    """Which of the page's sessions (gradio's session_hash) offered each page connection id: an event
    that names an id (its chat updates, its settings) is taken only from that session, so knowing a
    connection id is not enough to read or steer someone's call. Owned by the event loop."""

    def __init__(self, limit: int = 10_000):
        self.limit = limit  # ids remembered at most (the oldest go first)
        self.owners: OrderedDict[str, str] = OrderedDict()  # webrtc_id -> session_hash

    def allowed(self, path: str, body: bytes) -> bool:
        """Whether this gradio request (its JSON body) may name the connection ids it names; an
        offer's id is bound to its session on first use."""
        if b"webrtc_id" not in body or not path.startswith(("/gradio_api/component_server", "/gradio_api/queue/join")):
            return True
        if len(body) > 65_536:  # the page's own such requests are a few kB: not parsed on the event loop
            return False
        try:
            request = json.loads(body)
        except ValueError:
            return True  # gradio answers it 4xx itself
        if not isinstance(request, dict) or not isinstance(request.get("session_hash"), str):
            return True
        session, data = request["session_hash"], request.get("data")
        items = [data] if isinstance(data, dict) else data if isinstance(data, list) else []
        ids = [item["webrtc_id"] for item in items if isinstance(item, dict) and isinstance(item.get("webrtc_id"), str)
               and item["webrtc_id"]]
        if path.startswith("/gradio_api/component_server") and request.get("fn_name") == "offer":
            for connection in ids:
                self.owners.setdefault(connection, session)
                self.owners.move_to_end(connection)
            while len(self.owners) > self.limit:
                self.owners.popitem(last=False)
        return all(hmac.compare_digest(self.owners.get(connection, session), session) for connection in ids)


class Guard:
    def __init__(self, app, options: GuardOptions):
        self.app = app
        self.options = options
        self.rate = RateLimit(options.opens_per_minute)
        self.failures = RateLimit(options.failed_auth_per_minute)
        self.connections = PageConnections()
        self.pages = PageSessions()
        self.generating: dict[str, int] = {}  # client address -> its /v1 requests in flight (the event loop's)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        o = self.options
        address = client_address(scope, o.forwarded_allow_ips)
        if address != (scope.get("client") or ("", 0))[0]:
            scope = dict(scope, client=(address, 0))  # every route (and gradio) sees the client's own address
        public = o.public_paths + (("/telephone/",) if o.twilio_signed else ())
        if o.auth_token and not path.startswith(public) and not self.page_request(scope, path):
            if o.failed_auth_per_minute and self.failures.full(address):  # even a right guess: no oracle
                return await refuse(scope, receive, send, 429, "rate_limited",
                                    "Too many wrong tokens from your address; wait a minute.")
            if not hmac.compare_digest((bearer(scope) or "").encode(), o.auth_token.encode()):
                self.failures.allow(address)
                return await refuse(scope, receive, send, 401, "unauthorized", "This server needs its access token: "
                                    "send `Authorization: Bearer <token>` (or ?token=).")
        if o.auth_token and path == "/login" and scope["type"] == "http":
            return await self.login(scope, receive, send, address)
        if o.opens_per_minute and path.startswith(o.open_paths):
            if not self.exempt(address) and not self.rate.allow(address):
                logger.warning("rate limit: %s opened over %d connections in a minute", address, o.opens_per_minute)
                return await refuse(scope, receive, send, 429, "rate_limited",
                                    f"Too many connections from your address (over {o.opens_per_minute} a minute).")
        if scope["type"] == "http" and path.startswith(PREFIX):
            if refusal := self.page_refusal(scope, address, page_sessions.named_sessions(scope)):
                return await refuse(scope, receive, send, *refusal)
        if (scope["type"] == "http" and path.startswith(o.generation_paths) and o.generations_per_address
                and not self.exempt(address)):
            return await self.one_of_few(scope, receive, send, address)
        if scope["type"] == "http":
            return await self.capped(scope, receive, send, o.body_cap(path))
        return await self.app(scope, receive, send)

    def exempt(self, address: str) -> bool:
        """Whether the per-address limits spare this client: loopback (unless `limit_loopback`) and
        the operator's own front ends."""
        o = self.options
        return (is_loopback(address) and not o.limit_loopback) or (
            bool(o.front_end_ips) and trusted(address, o.front_end_ips))

    async def one_of_few(self, scope, receive, send, address: str):
        """A /v1 request, if its address has fewer than `generations_per_address` in flight (429 if
        not): counted until its answer has been sent, a stream to its end."""
        limit = self.options.generations_per_address
        if self.generating.get(address, 0) >= limit:
            return await refuse(scope, receive, send, 429, "too_many_requests", f"Your address has {limit} "
                                "requests in flight; wait for one to finish.")
        self.generating[address] = self.generating.get(address, 0) + 1
        try:
            return await self.capped(scope, receive, send, self.options.body_cap(scope.get("path", "")))
        finally:
            self.generating[address] -= 1
            if not self.generating[address]:
                del self.generating[address]

    def page_refusal(self, scope, address: str, sessions: list[str] | None) -> tuple[int, str, str] | None:
        """Why a gradio request may not name these page sessions (None: it may): each must be
        well-formed and bound to the request's page token, or be bound to it now."""
        token = page_sessions.page_token(scope)
        if token is None or sessions is None:
            return 400, "bad_request", "Malformed page token or session_hash."
        kind = dict(scope.get("headers") or []).get(b"content-type", b"")
        if scope.get("path", "").startswith(PREFIX + "component_server") and b"multipart" in kind.lower():
            return 415, "unsupported_media_type", "The page's component calls are JSON."  # its session_hash unread
        binds = not scope.get("path", "").startswith(page_sessions.HEARTBEAT)
        if not all(self.pages.allowed(session, token, address, binds) for session in sessions):
            return 403, "forbidden", "That page session belongs to another page (another page token)."
        return None

    async def login(self, scope, receive, send, address: str):
        """The page's login (gradio's /login): refused for a minute after too many wrong passwords."""
        if self.options.failed_auth_per_minute and self.failures.full(address):
            return await refuse(scope, receive, send, 429, "rate_limited",
                                "Too many wrong passwords from your address; wait a minute.")

        async def counted_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.failures.allow(address)
            await send(message)

        return await self.capped(scope, receive, counted_send, self.options.body_cap("/login"))

    def page_request(self, scope, path: str) -> bool:
        """The Gradio page has its own login (mount_gradio_app(auth=...)); its routes pass here."""
        return scope["type"] == "http" and not path.startswith(("/webrtc", "/websocket", "/outputs", "/input",
                                                                "/telephone", "/session", "/ws/", "/v1/", "/metrics"))

    async def capped(self, scope, receive, send, cap: int):
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            return await refuse(scope, receive, send, 400, "bad_request", "Content-Length is not a number.")
        if declared is not None and declared > cap:
            return await refuse(scope, receive, send, 413, "body_too_large",
                                f"The request body is over the {cap}-byte limit of this route.")
        if self.json_body(scope, headers):
            return await self.checked_json(scope, receive, send, cap)
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise BodyTooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await refuse(scope, receive, send, 413, "body_too_large",
                             f"The request body is over the {cap}-byte limit of this route.")


    def json_body(self, scope, headers: dict) -> bool:
        kind = headers.get(b"content-type", b"")
        path = scope.get("path", "")
        if scope.get("method") not in ("POST", "PUT", "PATCH") or not path.startswith(self.options.json_paths):
            return False
        if path.startswith(PREFIX):  # gradio reads some bodies as JSON whatever their type: all but its uploads
            return not path.startswith((PREFIX + "upload", PREFIX + "process_recording"))
        return b"multipart" not in kind and b"form-urlencoded" not in kind

    async def checked_json(self, scope, receive, send, cap: int):
        """Read the whole (capped) body, refuse it if nested too deeply, else hand it on as it came."""
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > cap:
                return await refuse(scope, receive, send, 413, "body_too_large",
                                    f"The request body is over the {cap}-byte limit of this route.")
        limit = self.options.json_depth
        deep = await asyncio.to_thread(too_deep, body, limit) if len(body) > 65_536 else too_deep(body, limit)
        if deep:
            return await refuse(scope, receive, send, 400, "bad_request",
                                f"The JSON body is nested deeper than {limit} levels.")
        if scope.get("path", "").startswith(PREFIX):
            named = page_sessions.body_sessions(await self.parsed(body))
            if refusal := self.page_refusal(scope, (scope.get("client") or ("", 0))[0], named):
                return await refuse(scope, receive, send, *refusal)
        if not self.connections.allowed(scope.get("path", ""), body):
            return await refuse(scope, receive, send, 403, "forbidden", "That connection belongs to another page.")
        if self.page_offer(scope, body) and not self.rate.allow((scope.get("client") or ("", 0))[0]):
            return await refuse(scope, receive, send, 429, "rate_limited", "Too many connections from your "
                                f"address (over {self.options.opens_per_minute} a minute).")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


    @staticmethod
    async def parsed(body: bytes):
        """A JSON body, or None if it is not JSON (gradio answers that 4xx itself); a large one is
        parsed off the event loop."""
        try:
            return await asyncio.to_thread(json.loads, body) if len(body) > 65_536 else json.loads(body)
        except ValueError:
            return None

    def page_offer(self, scope, body: bytes) -> bool:
        """A WebRTC offer to the page's own component (gradio's component_server), which the open
        limit counts like /webrtc/offer; its ICE candidates are not counted."""
        o = self.options
        address = (scope.get("client") or ("", 0))[0]
        if not o.opens_per_minute or self.exempt(address) or not scope.get(
                "path", "").startswith("/gradio_api/component_server") or b'"offer"' not in body:
            return False
        try:
            request = json.loads(body)
            return request.get("fn_name") == "offer" and request["data"].get("type") == "offer"
        except (ValueError, AttributeError, KeyError, TypeError):
            return False


class BodyTooLarge(Exception):
    pass


async def refuse(scope, receive, send, status: int, error: str, message: str):
    """fastrtc's failure body over HTTP; over a WebSocket, a close with code 4000 + status and the reason."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        return await send({"type": "websocket.close", "code": 4000 + status, "reason": message[:120]})
    body = json.dumps({"status": "failed", "meta": {"error": error}, "message": message}).encode()
    if scope.get("path", "").startswith("/v1/"):  # OpenAI's error shape for the OpenAI-compatible routes
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": error}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
