"""The front door: every HTTP request and WebSocket passes here before any route reads it.

`Guard` is plain ASGI middleware: it refuses an over-size body with 413 before reading it (by its
Content-Length, and by counting when the body is streamed), asks for the server's access token
when one is set (`--auth-token`), and limits how often one address may open offers and sockets.
"""

import hmac
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import parse_qs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardOptions:
    auth_token: str | None = None  # when set, the APIs want `Authorization: Bearer <it>` (or ?token=), the page a login
    default_body_bytes: int = 1_048_576  # 1 MB: any request body not named below
    body_bytes: tuple[tuple[str, int], ...] = (  # (path prefix, cap); the first match wins
        ("/webrtc/offer", 65_536),  # an SDP offer is a few kB
        ("/input", 4_096),
        ("/telephone/incoming", 65_536),
        ("/gradio_api/upload", 64 * 1_048_576),  # a 5 min upload at 48 kHz stereo is ~58 MB
        ("/upload", 64 * 1_048_576),
        ("/v1/audio", 26_214_400),  # OpenAI's own 25 MB audio limit
        ("/v1/chat", 26_214_400),
    )
    opens_per_minute: int = 30  # offers + socket opens one client address may make per minute (0: no limit)
    limit_loopback: bool = False  # also limit 127.0.0.1/::1 (off: local tests and reverse proxies)
    open_paths: tuple[str, ...] = ("/webrtc/offer", "/websocket/offer", "/telephone/handler", "/session/create",
                                   "/ws/audio")
    public_paths: tuple[str, ...] = ("/health", "/telephone/")  # no token: health checks; Twilio signs its own

    def body_cap(self, path: str) -> int:
        return next((cap for prefix, cap in self.body_bytes if path.startswith(prefix)), self.default_body_bytes)


class RateLimit:
    """Opens per client address in the last minute. Owned by the event loop (only the middleware uses it)."""

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
        if len(self.seen) > 10_000:  # forget idle addresses rather than grow without bound
            self.seen = {a: t for a, t in self.seen.items() if t and now - t[-1] < 60}
        return True


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


class Guard:
    def __init__(self, app, options: GuardOptions):
        self.app = app
        self.options = options
        self.rate = RateLimit(options.opens_per_minute)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        o = self.options
        if o.auth_token and not path.startswith(o.public_paths) and not self.page_request(scope, path):
            if not hmac.compare_digest((bearer(scope) or "").encode(), o.auth_token.encode()):
                return await refuse(scope, receive, send, 401, "unauthorized", "This server needs its access token: "
                                    "send `Authorization: Bearer <token>` (or ?token=).")
        if o.opens_per_minute and path.startswith(o.open_paths):
            address = (scope.get("client") or ("", 0))[0]
            if (o.limit_loopback or not is_loopback(address)) and not self.rate.allow(address):
                logger.warning("rate limit: %s opened over %d connections in a minute", address, o.opens_per_minute)
                return await refuse(scope, receive, send, 429, "rate_limited",
                                    f"Too many connections from your address (over {o.opens_per_minute} a minute).")
        if scope["type"] == "http":
            return await self.capped(scope, receive, send, o.body_cap(path))
        return await self.app(scope, receive, send)

    def page_request(self, scope, path: str) -> bool:
        """The Gradio page has its own login (mount_gradio_app(auth=...)); its routes pass here."""
        return scope["type"] == "http" and not path.startswith(("/webrtc", "/websocket", "/outputs", "/input",
                                                                "/session", "/ws/", "/v1/", "/metrics"))

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
