"""WebSocket connections (fastrtc's protocol and Twilio's Media Streams) behind checks and deadlines.

A socket must say `start` within `start_deadline_s` with a new, well-formed id (and, for a phone
call when a Twilio token is set, the call's signed token); it must then keep sending media (a live
caller's line or microphone sends frames even in silence) and may last `time_limit_s`. Malformed,
over-size or out-of-order messages get an `error` event and are skipped, so fastrtc only ever sees
well-formed traffic, and never a socket that closed before it started.
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import time

from fastapi import WebSocket, WebSocketDisconnect

logger = logging.getLogger(__name__)

TWILIO_EVENTS = {"connected", "start", "media", "mark", "stop", "dtmf", "ping"}
MAX_MESSAGE_BYTES = 65_536  # a 20 ms media frame is ~250 bytes of JSON
START_DEADLINE_S = 10.0  # say `start` within this
MEDIA_DEADLINE_S = 10.0  # after `start`, silence on the line (no media) this long ends the socket


def call_token(secret: str, call_sid: str) -> str:
    """The per-call token /telephone/incoming puts in the TwiML and /telephone/handler checks."""
    return hmac.new(secret.encode(), f"voxtral-call:{call_sid}".encode(), hashlib.sha256).hexdigest()


def check_message(text: str) -> dict:
    """One WebSocket message (fastrtc's or Twilio's Media Streams protocol) -> dict, or ValueError."""
    if len(text) > MAX_MESSAGE_BYTES:
        raise ValueError(f"a message may have at most {MAX_MESSAGE_BYTES} characters")
    try:
        message = json.loads(text)
    except RecursionError:  # nested a few thousand levels deep
        raise ValueError("the message is nested too deeply") from None
    if not isinstance(message, dict) or not isinstance(message.get("event"), str):
        raise ValueError("a message must be a JSON object with an 'event'")
    event = message["event"]
    if event not in TWILIO_EVENTS:
        raise ValueError(f"unknown event '{event}'")
    if event == "media":
        payload = (message.get("media") or {}).get("payload") if isinstance(message.get("media"), dict) else None
        if not isinstance(payload, str):
            raise ValueError("media needs media.payload (base64 mu-law)")
        base64.b64decode(payload, validate=True)
    if event == "start" and not isinstance(message.get("streamSid") or message.get("websocket_id"), str):
        raise ValueError("start needs a streamSid (Twilio) or websocket_id")
    return message


class SocketClosed(Exception):
    """The socket was closed by us (deadline, refusal) or by the client."""


class CheckedWebSocket:
    """The socket fastrtc reads: only checked messages reach it, within the deadlines.

    Owned by the connection's task on the event loop. `on_audio()` runs there for each media
    message that carries audio (access.Connections counts a quiet socket against its address).
    """

    def __init__(self, websocket: WebSocket, phone: bool, time_limit_s: float | None, on_audio=lambda: None):
        self.websocket = websocket
        self.phone = phone
        self.on_audio = on_audio
        self.accepted = False
        self.started: dict | None = None  # the `start` message, once it came (fastrtc reads it first)
        self.replayed = False
        self.opened = time.monotonic()
        self.last_media = self.opened
        self.ends = self.opened + time_limit_s if time_limit_s else float("inf")

    def __getattr__(self, name):
        return getattr(self.websocket, name)

    async def accept(self) -> None:
        if not self.accepted:
            self.accepted = True
            await self.websocket.accept()

    async def error(self, message: str) -> None:
        await self.websocket.send_json({"event": "error", "message": message})

    async def close(self, reason: str = "", code: int = 1000) -> None:
        try:
            if reason:
                await self.error(reason)
            await self.websocket.close(code=code, reason=reason[:120])
        except (RuntimeError, WebSocketDisconnect):  # already closed
            pass

    async def next_message(self) -> dict:
        """The next well-formed message; SocketClosed when a deadline passes or the client leaves."""
        while True:
            now = time.monotonic()
            deadline = min(self.ends, (self.last_media + MEDIA_DEADLINE_S) if self.started
                           else self.opened + START_DEADLINE_S)
            try:
                frame = await asyncio.wait_for(self.websocket.receive(), max(0.0, deadline - now))
            except (asyncio.TimeoutError, TimeoutError):
                why = ("the session time limit was reached" if time.monotonic() >= self.ends else
                       "no media for %.0f s" % MEDIA_DEADLINE_S if self.started else
                       "no start within %.0f s" % START_DEADLINE_S)
                logger.info("closing a socket: %s", why)
                await self.close(f"closing: {why}")
                raise SocketClosed(why) from None
            if frame["type"] == "websocket.disconnect":
                raise SocketClosed("the client left")
            if frame.get("text") is None:
                await self.error("binary frames are not part of this protocol; send JSON text")
                continue
            try:
                message = check_message(frame["text"])
            except (ValueError, binascii.Error, TypeError) as error:
                logger.debug("bad websocket message: %s", error)
                await self.error(f"ignored a bad message: {error}")
                continue
            if message["event"] == "start" and self.started:
                await self.error("this socket has started already")
                continue
            if message["event"] in ("media", "mark", "stop", "dtmf") and not self.started:
                await self.error(f"'{message['event']}' before 'start'")
                continue
            if message["event"] == "media":
                self.last_media = time.monotonic()
                if message["media"]["payload"]:  # an empty payload keeps the line open but says nothing
                    self.on_audio()
            return message

    async def wait_for_start(self) -> dict:
        """Read until a `start` (answering pings meanwhile); SocketClosed if none comes in time."""
        await self.accept()
        while True:
            message = await self.next_message()
            if message["event"] == "ping":
                await self.websocket.send_json({"event": "pong"})
            elif message["event"] == "start":
                return message

    async def receive_json(self) -> dict:
        """What fastrtc's WebSocketHandler reads: the `start` first, then checked messages."""
        if self.started and not self.replayed:
            self.replayed = True
            return self.started
        try:
            return await self.next_message()
        except SocketClosed:
            return {"event": "stop"}  # fastrtc's clean way out: it cleans up and returns
