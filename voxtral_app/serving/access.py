"""Who may read and steer a connection, and how long a connection may hold a slot.

fastrtc takes the connection id from the client and lets anyone who knows it read `/outputs` or
change `/input`. Here a connection id must be new and well-formed, and claiming it returns a secret
token; reading and steering the connection then need that token, and only one reader at a time.
`sweep()` enforces the deadlines fastrtc lacks: an offer that has not connected within
`offer_deadline_s` is dropped, and so is a peer whose conversation has ended (its audio stopped).
"""

import logging
import re
import secrets
import time
from dataclasses import dataclass

from ..compat import fastrtc as compat

logger = logging.getLogger(__name__)

ID_FORMAT = re.compile(r"[A-Za-z0-9_-]{8,64}")  # fastrtc's page makes 11+ random characters


@dataclass(frozen=True)
class AccessOptions:
    offer_deadline_s: float = 10.0  # an offer must finish connecting (ICE) within this
    sweep_every_s: float = 1.0


@dataclass
class Claim:
    token: str
    transport: str  # webrtc | websocket | phone
    claimed: float  # monotonic time
    readers: int = 0  # open /outputs streams (at most one)


class Connections:
    """Connection ids, their tokens and readers. Owned by the event loop: the routes and the sweeper
    task call it, nothing else."""

    def __init__(self, options: AccessOptions = AccessOptions()):
        self.options = options
        self.claims: dict[str, Claim] = {}
        self.seen: dict[str, float] = {}  # peers not claimed here (the page's): when the sweeper first saw them

    def claim(self, connection_id, transport_name: str, taken: bool = False) -> str:
        """A new, well-formed id -> its secret token. ValueError for a malformed one, KeyError if taken."""
        if not isinstance(connection_id, str) or not ID_FORMAT.fullmatch(connection_id):
            raise ValueError("a connection id is 8-64 letters, digits, '-' or '_'")
        if taken or connection_id in self.claims:
            raise KeyError("this connection id is in use")
        token = secrets.token_urlsafe(24)
        self.claims[connection_id] = Claim(token, transport_name, time.monotonic())
        return token

    def check(self, connection_id, token) -> bool:
        claim = self.claims.get(connection_id) if isinstance(connection_id, str) else None
        return claim is not None and isinstance(token, str) and secrets.compare_digest(claim.token, token)

    def release(self, connection_id: str) -> None:
        self.claims.pop(connection_id, None)

    async def sweep(self, mixins) -> None:
        """One pass over fastrtc's peer connections (the /webrtc/offer route's and the page's)."""
        now = time.monotonic()
        present = set()
        for mixin in mixins:
            for connection_id, state, handler in compat.peers(mixin):
                present.add(connection_id)
                claim = self.claims.get(connection_id)
                age = now - (claim.claimed if claim else self.seen.setdefault(connection_id, now))
                conversation = getattr(handler, "conversation", None)
                if state != "connected" and age > self.options.offer_deadline_s:
                    logger.info("dropping connection %s…: not connected after %.0f s", connection_id[:4], age)
                elif conversation is not None and conversation.closed.is_set():
                    logger.info("dropping connection %s…: its conversation has ended", connection_id[:4])
                else:
                    continue
                await compat.drop_connection(mixin, connection_id)
        self.seen = {i: t for i, t in self.seen.items() if i in present}
        for connection_id, claim in list(self.claims.items()):  # a WebRTC claim lives as long as its peer
            if claim.transport == "webrtc" and connection_id not in present and not claim.readers and (
                    now - claim.claimed > self.options.offer_deadline_s):
                self.release(connection_id)
