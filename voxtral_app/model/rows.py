"""KV rows as a cache of conversations: which conversation's keys and values are in which device row.

A conversation (a `Chat`, known here by its seat number) needs a row of the decoder's cache only for
a turn. When a turn needs one and none is free, the least recently used idle conversation's rows (its
cached length only) are copied to host memory and its row is reused; when it speaks again they are
copied back before its prefill. Past the host budget the least recently used host copy is dropped:
that conversation keeps only its history and its next turn prefills the whole prompt again. A
conversation whose reply is in flight is never evicted. What a chat books (`Chat.cached`) stays true
through all of this, so a restored or re-prefilled conversation continues exactly as if it had never
left its row (tests/test_offload.py compares greedy replies token for token).
"""

import time
from collections import OrderedDict
from collections.abc import Callable

from .generation import Generation


class Rows:
    """Row assignment and host copies. Owned by the engine's decode thread (the only caller of the
    decoder, whose cache this moves); `in_use` and `kept_count` are ints it writes and /health reads."""

    def __init__(self, decoder, rows: int, host_bytes: int, timed: Callable[[str, float], None]):
        self.decoder = decoder
        self.rows = rows  # device rows (--kv-slots)
        self.host_bytes = host_bytes  # budget for host copies (--kv-host-gb)
        self.timed = timed  # the engine's listeners: ("offload" | "restore" | "reprefill", seconds)
        self.resident: OrderedDict[int, int] = OrderedDict()  # seat -> row, least recently used first
        self.busy: set[int] = set()  # rows with a reply in flight: never evicted nor reused
        self.lengths: dict[int, int] = {}  # seat -> tokens written in its rows (what a copy must carry)
        self.kept: OrderedDict[int, object] = OrderedDict()  # seat -> its host copy, least recently used first
        self.kept_total = 0  # bytes in `kept`
        self.in_use = 0  # rows holding a conversation
        self.kept_count = 0  # conversations whose cache is on the host

    def seat(self, generation: Generation) -> bool:
        """Give `generation` a row holding its conversation's cache (restored, or the prompt made whole
        for a re-prefill). -> False when every row is busy with a reply in flight (it waits)."""
        seat = generation.slot
        if seat in self.resident:
            row = self.resident.pop(seat)
        else:
            row = self.free_row(seat)
            if row is None:
                return False
            kept = self.kept.pop(seat, None)
            if kept is not None:
                self.kept_total -= kept.nbytes
            if generation.start > 0 and kept is not None and kept.length >= generation.start:
                started = time.perf_counter()
                self.decoder.restore(row, kept)
                self.timed("restore", time.perf_counter() - started)
            else:
                if kept is not None:
                    self.decoder.discard(kept)
                if generation.start > 0:  # its rows are gone: prefill the whole prompt
                    generation.ids, generation.start, generation.clips = (
                        generation.prompt, 0, generation.prompt_clips)
                    self.timed("reprefill", 0.0)
        self.resident[seat] = row  # most recently used
        self.busy.add(row)
        generation.row = row
        self.count()
        return True

    def free_row(self, seat: int) -> int | None:
        """A row nobody holds (the seat's own number first: with a row per conversation nothing moves),
        else the least recently used idle conversation's, offloaded; None when all are busy."""
        taken = set(self.resident.values()) | self.busy
        free = [row for row in range(self.rows) if row not in taken]
        if free:
            return seat % self.rows if seat % self.rows in free else free[0]
        victim = next((s for s, row in self.resident.items() if row not in self.busy), None)
        if victim is None:
            return None
        return self.offload(victim)

    def offload(self, seat: int) -> int:
        """Copy `seat`'s rows to the host (within the budget) and give up its row. -> the row."""
        row = self.resident.pop(seat)
        length = self.lengths.get(seat, 0)
        if length > 0:
            started = time.perf_counter()
            kept = self.decoder.offload(row, length)
            self.timed("offload", time.perf_counter() - started)
            self.kept[seat] = kept
            self.kept_total += kept.nbytes
            while self.kept and self.kept_total > self.host_bytes:  # over budget: the oldest keeps its history only
                _, dropped = self.kept.popitem(last=False)
                self.kept_total -= dropped.nbytes
                self.decoder.discard(dropped)
        self.count()
        return row

    def finished(self, generation: Generation) -> None:
        """`generation` left the decode thread: its conversation is idle, its rows hold what it wrote."""
        if generation.row < 0:
            return
        self.busy.discard(generation.row)
        if self.resident.get(generation.slot) == generation.row:  # else its conversation closed meanwhile
            written = generation.start + generation.filled + len(generation.fed)
            self.lengths[generation.slot] = 0 if generation.error is not None else written

    def forget(self, seat: int) -> None:
        """The conversation on `seat` closed: its row is free (once a reply still in it is over) and its
        host copy goes."""
        self.resident.pop(seat, None)
        self.lengths.pop(seat, None)
        kept = self.kept.pop(seat, None)
        if kept is not None:
            self.kept_total -= kept.nbytes
            self.decoder.discard(kept)
        self.count()

    def count(self) -> None:
        self.in_use, self.kept_count = len(self.resident), len(self.kept)
