"""A page's one conversation across its calls: the page's key, its conversation with its chat, and
where that conversation is now (held by the page's connection, or parked between calls).

The page (ui.py) makes a PageKey when it loads and keeps it server-side; the page's connections
(handler.VoxtralHandler with `calls`) and its typed and uploaded turns find the conversation by it.
"""

import secrets
import threading
import time
from dataclasses import dataclass, field

from ..conversation.conversation import Conversation
from .chat_view import ChatView

GONE_KEPT_S = 600.0  # a closed page's key is remembered this long: longer than a call takes to notice its end
GONE_MAX = 50_000  # and at most this many (~8 MB), however fast pages open and close


@dataclass(frozen=True)
class PageKey:
    """A page's credential for its one conversation: issued by the server (a gr.State, which never
    leaves it) and handed to the page's handler with the controls, so a connection can only take
    back the conversation of the page it came from."""

    value: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)  # 192 bits; never logged


@dataclass(eq=False)
class PageConversation:
    """A page's conversation and its chat, kept together between connections (in the page's
    Parking): whoever reads the conversation's outbox owns the view."""

    conversation: Conversation
    view: ChatView

    @property
    def closed(self) -> threading.Event:
        return self.conversation.closed

    def close(self) -> None:
        self.conversation.close()


class PageCalls:
    """Where each page's conversation is: held by the page's connection (its call), or parked
    between calls (`parking`, a conversation.parking.Parking of PageConversations). Any thread:
    `holders` (page key -> the connection holding its conversation) and `gone` (closed pages' keys ->
    when, kept GONE_KEPT_S, GONE_MAX at most, for a connection or typed turn that still has their
    conversation out) are guarded by `lock`."""

    def __init__(self, parking):
        self.parking = parking
        self.lock = threading.Lock()
        self.holders: dict[str, object] = {}
        self.gone: dict[str, float] = {}

    def take(self, key: PageKey, taker: "object | None" = None) -> PageConversation | None:
        """The page's conversation for `taker` (a new connection; None: a typed or uploaded turn
        between calls), if it has one: a previous connection of the page that has not ended yet
        (Stop, then Start at once) hands it over first."""
        with self.lock:
            previous = self.holders.get(key.value)
            if taker is not None:
                self.holders[key.value] = taker
        if previous is not None and previous is not taker:
            previous.park()
        return self.parking.take(key.value)

    def park(self, key: PageKey, page: PageConversation, holder: "object | None" = None) -> None:
        """Keep the page's conversation for its next call (or typed turn). It still counts against
        --max-sessions: the page is open (its unload closes it), someone may type into it any time.
        A page that has closed meanwhile (`forget`) gets it closed instead."""
        with self.lock:  # held while parking: the page's unload looks in the parking only after
            gone = self._release(key, holder)
            if not gone:
                page.conversation.post("kept", self.parking.resume_s)  # not idle while it waits for the page
                self.parking.park(key.value, page)
        if gone:
            page.close()

    def release(self, key: PageKey, holder: "object | None") -> None:
        """`holder` no longer holds the page's conversation (it parked it, or never got one)."""
        with self.lock:
            self._release(key, holder)

    def _release(self, key: PageKey, holder: "object | None") -> bool:
        """Under `lock`: let `holder` go. -> whether the page has closed (`forget`)."""
        if holder is not None and self.holders.get(key.value) is holder:
            del self.holders[key.value]
        return key.value in self.gone

    def forget(self, key: PageKey) -> None:
        """The page has closed: its conversation closes, even if its connection parks it only now."""
        now = time.monotonic()
        with self.lock:
            self.gone[key.value] = now
            while (oldest := next(iter(self.gone.items()), None)) and (oldest[1] < now - GONE_KEPT_S
                                                                        or len(self.gone) > GONE_MAX):
                del self.gone[oldest[0]]  # in the order they closed
        if (page := self.parking.take(key.value)) is not None:
            page.close()

    def live(self, key: PageKey | None) -> Conversation | None:
        """The page's conversation while its call is up."""
        if not isinstance(key, PageKey):
            return None
        with self.lock:
            holder = self.holders.get(key.value)
        return None if holder is None else holder.conversation_of(key)

    def end_all(self, message: str) -> None:
        """The server is shutting down: every page's call ends, saying `message` in its chat."""
        with self.lock:
            holders = list(self.holders.values())
        for holder in holders:
            holder.end(message)
