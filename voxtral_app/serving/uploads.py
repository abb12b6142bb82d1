"""The page's uploaded files: who uploaded each, how much, and when it goes.

gradio keeps every upload under its cache directory and lets any event name any file there. Here
each upload is recorded (by the middleware around gradio's upload route) with the address it came
from; an event may use it only from that address and, from its first use on, only from that page
session (compat.gradio.guard_input_files asks `allowed`). Each address may upload
`per_address_bytes` an hour, the server keeps at most `total_bytes`, and a session's files are
deleted when the conversation they were sent into closes (`link_uploads`, `sweep`), or when its
page closes, whichever comes first.
"""

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .guard import is_loopback, refuse

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadOptions:
    path: str = "/gradio_api/upload"  # gradio's upload route, where the page is mounted at /
    per_address_bytes: int = 128 * 1_048_576  # one address's uploads in an hour: two 5-minute 48 kHz stereo files
    total_bytes: int = 2 * 1_073_741_824  # all kept uploads together (2 GB)
    kept_s: float = 3_600.0  # an upload no page session closed is forgotten (and gradio's cache deletes it) after an hour


@dataclass
class Upload:
    address: str
    size: int  # bytes charged (its share of the request body)
    at: float  # monotonic
    session: str | None = None  # the page session that used it first
    used_at: float | None = None  # clock() at that first use
    conversation: object | None = None  # the conversation it was sent into (its `closed` Event tells when it ends)


class UploadLedger:
    """Uploaded paths and their owners: gradio names an upload by its contents' hash, so two people
    who upload the same file get the same path, each with an entry. Owned by the event loop: the
    middleware, gradio's event processing, its unload events and the app's sweeper all run there;
    files are deleted on a worker thread. The page's events tell it from their worker threads which
    conversation a session's uploads went into through `links`, a queue `sweep()` reads."""

    def __init__(self, options: UploadOptions = UploadOptions(), clock=time.monotonic):
        self.options = options
        self.clock = clock
        self.uploads: dict[str, list[Upload]] = {}  # path -> one entry per upload of it
        self.links: queue.SimpleQueue = queue.SimpleQueue()  # (session, conversation, clock()) from used_in()

    def entries(self) -> list[Upload]:
        return [upload for entries in self.uploads.values() for upload in entries]

    def prune(self) -> None:
        now = self.clock()
        kept = {p: [u for u in entries if now - u.at < self.options.kept_s] for p, entries in self.uploads.items()}
        self.uploads = {p: entries for p, entries in kept.items() if entries}

    def room(self, address: str, size: int) -> str | None:
        """Why an upload of `size` bytes from `address` is refused now, or None."""
        self.prune()
        entries = self.entries()
        if sum(u.size for u in entries if u.address == address) + size > self.options.per_address_bytes:
            return f"your uploads are over {self.options.per_address_bytes // 1_048_576} MB this hour"
        if sum(u.size for u in entries) + size > self.options.total_bytes:
            return "the server holds too many uploads; try again later"
        return None

    def record(self, address: str, paths: list, size: int) -> None:
        paths = [p for p in paths if isinstance(p, str)]
        for path in paths:
            upload = Upload(address, size // max(1, len(paths)), self.clock())
            self.uploads.setdefault(os.path.normpath(path), []).append(upload)

    def allowed(self, path: str, session: str, address: str) -> bool:
        """Whether this page session (from this address) may use this file as an event's input."""
        entries = self.uploads.get(os.path.normpath(path), [])
        upload = next((u for u in entries if u.address == address and u.session == session), None) or next(
            (u for u in entries if u.address == address and u.session is None), None)
        if upload is None:
            logger.warning("refused an event's input file that this page session did not upload")
            return False
        if upload.session is None:
            upload.session, upload.used_at = session, self.clock()
        return True

    def used_in(self, session: str, conversation) -> None:
        """The uploads `session` has used so far went into `conversation` (a page event's, whose
        audio is decoded by now). Any thread."""
        self.links.put((session, conversation, self.clock()))

    def sweep(self) -> None:
        """Delete the uploads whose conversation has closed (the app's sweeper calls this)."""
        while True:
            try:
                session, conversation, at = self.links.get_nowait()
            except queue.Empty:
                break
            for upload in self.entries():
                if upload.session == session and upload.conversation is None and upload.used_at <= at:
                    upload.conversation = conversation
        self.drop(lambda u: u.conversation is not None and u.conversation.closed.is_set())

    def forget(self, session: str) -> None:
        """The page closed: forget its uploads, and delete the files nobody else uploaded."""
        self.drop(lambda u: u.session == session)

    def drop(self, gone_if) -> None:
        """Forget the uploads `gone_if(upload)` picks, and delete the files nobody else uploaded."""
        gone = []
        for path, entries in list(self.uploads.items()):
            left = [u for u in entries if not gone_if(u)]
            if len(left) < len(entries) and not left:
                gone.append(path)
            if left:
                self.uploads[path] = left
            else:
                del self.uploads[path]
        if gone:
            asyncio.get_running_loop().run_in_executor(None, delete, gone)


def delete(paths: list[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
            os.rmdir(os.path.dirname(path))  # gradio's per-upload folder, when empty
        except OSError:
            pass


class UploadGate:
    """ASGI middleware around gradio's upload route: quota first, then the ledger learns the paths."""

    def __init__(self, app, ledger: UploadLedger):
        self.app = app
        self.ledger = ledger

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != self.ledger.options.path:
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("", 0))[0]
        headers = dict(scope.get("headers") or [])
        try:
            size = int(headers[b"content-length"])
        except (KeyError, ValueError):
            return await refuse(scope, receive, send, 411, "length_required", "Uploads need a Content-Length.")
        if why := self.ledger.room(address, size):
            return await refuse(scope, receive, send, 429, "upload_quota", f"Upload refused: {why}.")
        status = 0
        body = b""

        async def recorded_send(message):
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status == 200 and len(body) < 65_536:
                body += message.get("body", b"")
            await send(message)

        await self.app(scope, receive, recorded_send)
        if status == 200:
            try:
                self.ledger.record(address, json.loads(body), size)
            except ValueError:
                logger.warning("gradio's upload route answered something other than a JSON list")


def limit_conversations(pages, per_address: int, address_of, refuse_turn,
                        held: Callable[[str], int] = lambda address: 0) -> Callable[[str], int]:
    """At most `per_address` conversations opened by the page's typed or uploaded turns without a call
    (ui.PageConversations.take: a script's request without a page load gets a new page key each
    time, so made-up requests each opened one and took every slot) per client address, counted with
    what else it `held` (access.Connections.pending: unconnected offers and sessions, quiet sockets).
    `address_of()`: the running event's client address; `refuse_turn(message)` tells the person.
    -> the number of such conversations an address has (any thread). `owners` is guarded by `lock`."""
    take = pages.take
    lock = threading.Lock()  # never held while another lock is taken
    owners: dict[str, tuple[str, object]] = {}  # page key -> (address, the conversation it opened)

    def opened(address: str) -> int:
        with lock:
            for gone in [k for k, (_, page) in owners.items() if page.closed.is_set()]:
                del owners[gone]
            return sum(a == address for a, _ in owners.values())

    def take_limited(key):
        address = address_of() or ""
        if is_loopback(address):  # exempt, as for the other per-address limits
            return take(key)
        elsewhere = held(address)  # asked before `lock` is taken
        with lock:
            for gone in [k for k, (_, page) in owners.items() if page.closed.is_set()]:
                del owners[gone]
            mine = sum(a == address for a, _ in owners.values())
            if key.value not in owners and mine + elsewhere >= per_address:
                refuse_turn(f"Your address has {per_address} conversations open on this page or connections "
                            "waiting elsewhere; close one first.")
                return None
            page = take(key)  # under the lock: two requests at once cannot both take the last place
            if page is not None:
                owners.setdefault(key.value, (address, page))
        return page

    pages.take = take_limited
    return opened


def link_uploads(pages, ledger: UploadLedger, session_of) -> None:
    """Tell `ledger` which conversation each page session's uploads went into: the one a page event
    finds (ui.PageConversations.live during a call, .take between calls) after decoding them.
    `session_of()`: the running event's page session (None outside one)."""
    for name in ("take", "live"):
        find = getattr(pages, name)

        def found(key, find=find):
            conversation = find(key)
            if conversation is not None and (session := session_of()) is not None:
                ledger.used_in(session, conversation)
            return conversation

        setattr(pages, name, found)
