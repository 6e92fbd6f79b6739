"""Time-sortable task ids: 48 bits of milliseconds, then 80 bits, in hex (32 characters).

Within one process ids are strictly increasing: in the same millisecond the 80-bit part
counts up from the previous id instead of being drawn anew (as monotonic ULIDs do). Across
processes, ids of the same millisecond order at random.
"""

from __future__ import annotations

import os
import threading

_MASK = (1 << 80) - 1
_lock = threading.Lock()
_last_ms = -1
_last_low = 0


def new_ids(count: int, now: float) -> list[str]:
    """`count` increasing ids for the time `now` (seconds since the epoch)."""
    global _last_ms, _last_low
    ms = int(now * 1000)
    with _lock:
        if ms > _last_ms:
            _last_ms, _last_low = ms, int.from_bytes(os.urandom(10), "big") >> 1
        # ms < _last_ms (a clock step back): keep counting from the newest id issued.
        ms = _last_ms
        start = _last_low + 1
        if start + count > _MASK:  # the 80 bits ran out in this millisecond: borrow the next
            _last_ms, start = _last_ms + 1, 0
            ms = _last_ms
        _last_low = start + count - 1
    return [f"{ms:012x}{low:020x}" for low in range(start, start + count)]


def new_id(now: float) -> str:
    return new_ids(1, now)[0]
