"""Who may read and steer a connection, and how long a connection may hold a slot.

fastrtc takes the connection id from the client and lets anyone who knows it read `/outputs` or
change `/input`. Here a connection id must be new and well-formed, and claiming it returns a secret
token; reading and steering the connection then need that token, and only one reader at a time.
`sweep()` enforces the deadlines fastrtc lacks: an offer that has not connected within
`offer_deadline_s` is dropped, and so is a peer whose conversation has ended (its audio stopped).

`hold()` counts what one client address holds without using it: WebRTC offers (the /webrtc/offer
route's and the page's) that have not connected, sockets that have not said `start`, session-API
sessions nobody has connected to, and started sockets (session sockets too) that have sent no audio
or message for `quiet_s`. Past `pending_per_address` the route refuses, so one address cannot keep
every slot (or fastrtc's own connection cap) full of ghosts.
"""

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..compat import fastrtc as compat

logger = logging.getLogger(__name__)

ID_FORMAT = re.compile(r"[A-Za-z0-9_-]{8,64}")  # fastrtc's page makes 11+ random characters
CANDIDATES_PER_CONNECTION = 64  # remote ICE candidates one connection may name (in its offer and trickled):
# aioice tries each. A browser names one or two per network interface and ICE server (a few dozen on a machine
# with VPNs and container bridges); aiortc 2 per section


@dataclass(frozen=True)
class AccessOptions:
    offer_deadline_s: float = 10.0  # an offer must finish connecting (ICE) within this
    sweep_every_s: float = 1.0
    pending_per_address: int = 2  # unconnected offers and sessions, unstarted and quiet sockets one client
    # address may hold at once (loopback exempt unless the guard limits it too); the next gets 429 / close 4429
    quiet_s: float = 10.0  # a started socket that has sent no audio (or message) this long counts again


@dataclass
class Hold:
    """An offer, socket or session counted against its client address until it connects (or starts),
    and again while its socket is quiet."""

    address: str
    since: float  # clock() when it was offered or opened
    heard: float | None = None  # clock() when its socket started or last sent audio; None: not started
    seen: bool = False  # the sweeper has seen its peer connection


@dataclass
class Claim:
    token: str
    transport: str  # webrtc | websocket | phone
    claimed: float  # Connections.clock() when claimed
    readers: int = 0  # open /outputs streams (at most one)


class Connections:
    """Connection ids, their tokens and readers, and what each client address holds (`holds`, keyed
    by `webrtc_key()`, a socket, or a session's key) with the remote ICE candidates each connection
    named (`candidates`). Owned by the event loop: the routes, the socket tasks and the sweeper task
    call it; the page's worker threads only ask `pending()`, so `holds` is guarded by `held` too.
    `exempt(address)`: addresses not counted (loopback); `clock`: monotonic seconds (tests move it by
    hand); `others(address)`: what else the address holds (the page's conversations without a call,
    uploads.limit_conversations), counted with its holds."""

    def __init__(self, options: AccessOptions = AccessOptions(), exempt=lambda address: False, clock=time.monotonic):
        self.options = options
        self.exempt = exempt
        self.clock = clock
        self.claims: dict[str, Claim] = {}
        self.seen: dict[str, float] = {}  # peers not claimed here (the page's): when the sweeper first saw them
        self.holds: dict[object, Hold] = {}
        self.held = threading.Lock()  # guards `holds`; never held while another lock is taken
        self.others: Callable[[str], int] = lambda address: 0
        self.candidates: dict[tuple, int] = {}  # webrtc_key() -> remote candidates named so far

    def claim(self, connection_id, transport_name: str, taken: bool = False) -> str:
        """A new, well-formed id -> its secret token. ValueError for a malformed one, KeyError if taken."""
        if not isinstance(connection_id, str) or not ID_FORMAT.fullmatch(connection_id):
            raise ValueError("a connection id is 8-64 letters, digits, '-' or '_'")
        if taken or connection_id in self.claims:
            raise KeyError("this connection id is in use")
        token = secrets.token_urlsafe(24)
        self.claims[connection_id] = Claim(token, transport_name, self.clock())
        return token

    def check(self, connection_id, token) -> bool:
        claim = self.claims.get(connection_id) if isinstance(connection_id, str) else None
        return claim is not None and isinstance(token, str) and secrets.compare_digest(claim.token, token)

    def release(self, connection_id: str) -> None:
        self.claims.pop(connection_id, None)

    def hold(self, key, address: str) -> bool:
        """Count a new offer or socket (`key`) against `address`; False (refuse it) when the address
        holds `pending_per_address` already, or `key` is counted already (a second offer of one id:
        letting it go would free the first's place)."""
        others = 0 if self.exempt(address) else self.others(address)  # asked before `held` is taken
        with self.held:
            if key in self.holds:
                return False
            if self.exempt(address):
                return True
            if self.count(address) + others >= self.options.pending_per_address:
                logger.info("refused an offer or socket: its address holds %d unconnected or quiet ones",
                            self.options.pending_per_address)
                return False
            self.holds[key] = Hold(address, self.clock())
            return True

    def track(self, key, address: str) -> None:
        """Count a connected socket (`key`, whatever it held before) only once it has been quiet for
        `quiet_s` (a session-API socket: its session was counted when it was created)."""
        if not self.exempt(address):
            now = self.clock()
            with self.held:
                self.holds[key] = Hold(address, now, heard=now)

    def rename(self, key, new_key) -> None:
        """What `key` holds is held under `new_key` from now on (a request's place, once it has an id)."""
        with self.held:
            if (hold := self.holds.pop(key, None)) is not None:
                self.holds[new_key] = hold

    def pending(self, address: str) -> int:
        """What `address` holds now: offers not connected, sockets not started or quiet (any thread)."""
        with self.held:
            return self.count(address)

    def count(self, address: str) -> int:
        now = self.clock()
        return sum(1 for hold in self.holds.values() if hold.address == address and (
            hold.heard is None or now - hold.heard > self.options.quiet_s))

    def heard(self, key) -> None:
        """A socket started, or sent audio: it holds nothing for the next `quiet_s`."""
        with self.held:
            if (hold := self.holds.get(key)) is not None:
                hold.heard = self.clock()

    def let_go(self, key) -> None:
        """The offer connected or failed, the socket closed, the session ended or hung up."""
        with self.held:
            self.holds.pop(key, None)

    def name_candidates(self, key: tuple, count: int) -> bool:
        """Whether connection `key` may name `count` more remote ICE candidates (and count them)."""
        named = self.candidates.get(key, 0) + count
        if named > CANDIDATES_PER_CONNECTION:
            return False
        self.candidates[key] = named
        return True

    async def sweep(self, mixins) -> None:
        """One pass over fastrtc's peer connections (the /webrtc/offer route's and the page's)."""
        now = self.clock()
        present = set()
        keys = set()
        for mixin in mixins:
            for connection_id, state, handler in compat.peers(mixin):
                present.add(connection_id)
                key = webrtc_key(mixin, connection_id)
                keys.add(key)
                with self.held:
                    if (hold := self.holds.get(key)) is not None:
                        hold.seen = True
                if hold is not None and state == "connected":
                    self.let_go(key)
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
        self.candidates = {key: n for key, n in self.candidates.items() if key in keys}
        with self.held:
            holds = list(self.holds.items())
        for key, hold in holds:  # an offer whose peer is gone (or never came) holds nothing
            gone = hold.seen or now - hold.since > self.options.offer_deadline_s
            if isinstance(key, tuple) and key[0] == "webrtc" and key not in keys and gone:
                self.let_go(key)
        for connection_id, claim in list(self.claims.items()):  # a WebRTC claim lives as long as its peer
            if claim.transport == "webrtc" and connection_id not in present and not claim.readers and (
                    now - claim.claimed > self.options.offer_deadline_s):
                self.release(connection_id)


def webrtc_key(mixin, connection_id: str) -> tuple:
    """A WebRTC connection's key in `Connections.holds`: the Stream and each page component keep
    their own peers, so the same id may be offered to both."""
    return ("webrtc", id(mixin), connection_id)
