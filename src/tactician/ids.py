"""Time-sortable task ids: 48 bits of milliseconds, then 80 random bits, in hex."""

from __future__ import annotations

import os


def new_id(now: float) -> str:
    """A 32-character id that sorts by creation time (like a ULID, in hex)."""
    return f"{int(now * 1000):012x}{os.urandom(10).hex()}"


def new_ids(count: int, now: float) -> list[str]:
    """`count` ids at once: one call for randomness instead of one per id."""
    prefix = f"{int(now * 1000):012x}"
    noise = os.urandom(10 * count).hex()
    return [prefix + noise[i : i + 20] for i in range(0, 20 * count, 20)]
