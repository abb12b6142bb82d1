"""The page's own sessions (gradio's `session_hash`), each bound to the secret its browser sends.

gradio's routes (queue/join, queue/data, heartbeat, component_server, ...) obey whoever names a
session, and gradio's browser client makes the name with `Math.random()`. The page makes a token of
its own once per load (page_scripts.PAGE_TOKEN) and sends it with each of its gradio requests in the
`X-Voxtral-Page` header; the first request that names a session binds it to the token it carried
(trust on first use: the page's first request comes as soon as it loads, before anyone could learn
its name), and every later request naming it must carry the same token. A session whose first
request carried none (gradio_client's, named with uuid4) stays tokenless.
"""

import hmac
import re
from collections import OrderedDict
from urllib.parse import parse_qs

PAGE_TOKEN_HEADER = "X-Voxtral-Page"
HEADER = PAGE_TOKEN_HEADER.lower().encode()
TOKEN = re.compile(r"[A-Za-z0-9_-]{22,64}")  # base64url of 16-48 random bytes (the page sends 24)
SESSION = re.compile(r"[A-Za-z0-9_-]{1,64}")  # gradio's JS client: ~11 of [a-z0-9]; gradio_client: a uuid4
PREFIX = "/gradio_api/"
HEARTBEAT = PREFIX + "heartbeat/"  # /gradio_api/heartbeat/{session_hash}
STREAMS = PREFIX + "stream/"  # GET /gradio_api/stream/{session_hash}/{run}/{component_id}/... (HLS outputs)


class PageSessions:
    """Which token each page session is bound to ("" for tokenless), least recently used first, and
    each client address's bound sessions. Owned by the event loop (only the Guard uses it).

    Bounded: an address keeps at most `per_address` sessions (binding more forgets its own least
    recently used), and all addresses together `limit` (then the least recently used anywhere goes).
    Every request touches its session, so a live page (its timer asks every 2 s) stays at the young
    end: evicting it takes `limit` new sessions from `limit / per_address` addresses between two of
    its requests, and even then its next request binds it again."""

    def __init__(self, limit: int = 50_000, per_address: int = 64):
        self.limit = limit  # ~760 bytes each at worst (every one from its own address): ~38 MB
        self.per_address = per_address  # a household or office behind one address, many tabs each
        self.tokens: OrderedDict[str, tuple[str, str]] = OrderedDict()  # session_hash -> (token, address)
        self.by_address: dict[str, OrderedDict[str, None]] = {}  # address -> its sessions, oldest first

    def __len__(self) -> int:
        return len(self.tokens)

    def allowed(self, session: str, token: str, address: str, binds: bool = True) -> bool:
        """Whether a request carrying `token` ("" for none) may name `session`; the first request
        that names it binds it (unless `binds` is false: gradio's client opens the heartbeat before
        the page's scripts run, so a heartbeat is checked against a binding but never makes one)."""
        bound = self.tokens.get(session)
        if bound is None:
            if binds:
                self.bind(session, token, address)
            return True
        self.tokens.move_to_end(session)
        mine = self.by_address.get(bound[1])
        if mine is not None and session in mine:
            mine.move_to_end(session)
        return hmac.compare_digest(bound[0].encode(), token.encode())

    def bind(self, session: str, token: str, address: str) -> None:
        self.tokens[session] = (token, address)
        mine = self.by_address.setdefault(address, OrderedDict())
        mine[session] = None
        if len(mine) > self.per_address:
            self.forget(next(iter(mine)))
        while len(self.tokens) > self.limit:
            self.forget(next(iter(self.tokens)))

    def forget(self, session: str) -> None:
        _, address = self.tokens.pop(session)
        mine = self.by_address[address]
        mine.pop(session, None)
        if not mine:
            del self.by_address[address]


def page_token(scope) -> str | None:
    """The request's page token: "" if it has none, None if it is malformed."""
    values = [v for k, v in scope.get("headers") or [] if k == HEADER]
    if not values:
        return ""
    token = values[-1].decode("latin-1")
    return token if len(values) == 1 and TOKEN.fullmatch(token) else None


def named_sessions(scope) -> list[str] | None:
    """The page sessions a gradio request names in its path or query string (its JSON body's is read
    by the Guard with the body); None if one is malformed."""
    path = scope.get("path", "")
    names = []
    if path.startswith(HEARTBEAT):
        names.append(path[len(HEARTBEAT):].rstrip("/"))
    elif path.startswith(STREAMS) and path.count("/") >= 6 and scope.get("method") in ("GET", "HEAD"):
        names.append(path[len(STREAMS):].split("/")[0])
    query = scope.get("query_string", b"").decode("latin-1")  # as Starlette decodes it (so is "session%5Fhash")
    names += parse_qs(query, keep_blank_values=True).get("session_hash", [])
    return names if all(SESSION.fullmatch(name) for name in names) else None


def body_sessions(request) -> list[str] | None:
    """The page session a gradio JSON body names (queue/join, run/predict, component_server, cancel):
    [] if none, None if malformed. gradio reads the same key (json.loads keeps a duplicate's last)."""
    session = request.get("session_hash") if isinstance(request, dict) else None
    if not isinstance(session, str):
        return []
    return [session] if SESSION.fullmatch(session) else None
