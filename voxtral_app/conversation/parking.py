"""Conversations between connections: a dropped connection's conversation waits here for its owner.

A phone on a train, a laptop changing Wi-Fi, a tab that reloads, Stop then Start: the connection
ends, the conversation need not. Whoever ends a connection `park()`s its conversation under the
credential that connection had (a session id, the page's token); a new connection that shows the
same credential `take()`s it back, history and cache intact. A conversation nobody takes within
`resume_s` is closed (its slot freed) by `sweep()`, which the parking and taking calls run, and
which a server calls on its own schedule too.
"""

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Parking:
    """Parked conversations by credential. Any thread: `parked` is guarded by `lock`. Closing a
    conversation only posts to it, so no call here blocks."""

    def __init__(self, resume_s: float, limit: int = 64, clock: Callable[[], float] = time.monotonic):
        self.resume_s = resume_s  # how long a conversation outlives its connection (0: not at all)
        self.limit = limit  # conversations kept at most; past it the oldest is closed
        self.clock = clock  # -> seconds, monotonic (tests pass one they move by hand)
        self.lock = threading.Lock()
        self.parked: dict[str, tuple[object, float]] = {}  # credential -> (conversation, when it expires)

    def park(self, key: str, conversation) -> None:
        """Keep `conversation` (its connection ended) for `resume_s`, for whoever shows `key`."""
        if self.resume_s <= 0 or conversation.closed.is_set():
            conversation.close()
            return
        with self.lock:
            previous = self.parked.pop(key, None)
            self.parked[key] = (conversation, self.clock() + self.resume_s)
            evicted = []
            while len(self.parked) > self.limit:
                evicted.append(self.parked.pop(next(iter(self.parked)))[0])  # dicts keep insertion order
        for old in evicted + ([previous[0]] if previous and previous[0] is not conversation else []):
            old.close()
        self.sweep()

    def take(self, key: str):
        """The conversation parked under `key`, if it is still open (then it is no longer parked)."""
        self.sweep()
        with self.lock:
            entry = self.parked.pop(key, None)
        if entry is None or entry[0].closed.is_set():
            return None
        return entry[0]

    def sweep(self) -> int:
        """Close the conversations nobody took in time. -> how many."""
        now = self.clock()
        with self.lock:
            expired = [key for key, (conversation, until) in self.parked.items()
                       if until <= now or conversation.closed.is_set()]
            gone = [self.parked.pop(key)[0] for key in expired]
        for conversation in gone:
            conversation.close()
        if gone:
            logger.info("closed %d conversation(s) nobody came back to within %.0f s", len(gone), self.resume_s)
        return len(gone)

    def close_all(self) -> None:
        """At shutdown: close every parked conversation."""
        with self.lock:
            gone, self.parked = [conversation for conversation, _ in self.parked.values()], {}
        for conversation in gone:
            conversation.close()

    def __len__(self) -> int:
        with self.lock:
            return len(self.parked)
