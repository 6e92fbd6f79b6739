"""Flow control as pure functions: token buckets, circuit breakers, adaptive concurrency.

Each takes the current state and a time and returns the next state; the store keeps the state,
so the rules hold across processes and machines.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

from tactician.domain import TargetState


@dataclass(frozen=True)
class Bucket:
    tokens: float
    updated_at: float


def refill(bucket: Bucket, per_second: float, burst: float, now: float) -> Bucket:
    elapsed = max(0.0, now - bucket.updated_at)
    return Bucket(min(burst, bucket.tokens + elapsed * per_second), now)


def take(bucket: Bucket, per_second: float, burst: float, now: float) -> Bucket | None:
    """The bucket after taking one token, or None when none is left."""
    filled = refill(bucket, per_second, burst, now)
    if filled.tokens < 1.0:
        return None
    return Bucket(filled.tokens - 1.0, now)


def mint(
    bucket: Bucket,
    leases: Iterable[tuple[float, float]],
    per_second: float,
    burst: float,
    now: float,
) -> Bucket:
    """A global rate's bucket at the centre, brought to `now`, when its tokens may also sit at
    sites on lease. `leases` are (expires_at, amount) of the leases outstanding at the
    bucket's `updated_at` (lent, not given back, not expired).

    The centre mints only while the tokens that can still be spent, its own plus the leases',
    are fewer than `burst`; a lease stops counting when it expires (its tokens count as spent:
    an agent never spends after its lease, which it takes to end a margin early), so minting
    resumes from that moment, not from the last call. Every token any site spends was minted
    here, and at any instant at most `burst` can still be spent: the starts in any interval
    [t1, t2] across all sites are at most `burst + per_second (t2 - t1)`, as for one bucket.
    """
    pending = sorted(leases)
    out = sum(amount for _, amount in pending)
    tokens, at = bucket.tokens, bucket.updated_at

    def grown(until: float) -> float:
        room = burst - tokens - out
        return tokens + max(0.0, min(room, per_second * max(0.0, until - at)))

    for expires_at, amount in pending:
        if expires_at > now:
            break
        tokens, at, out = grown(expires_at), max(at, expires_at), out - amount
    return Bucket(max(0.0, min(grown(now), burst - out)), max(at, now))


# Adaptive concurrency: additive increase, multiplicative decrease (AIMD), as TCP does.
BACKOFF_FACTOR = 0.7
SLOW_FACTOR = 2.0
"""A call slower than this many times the target's recent floor counts as overload."""
FLOOR_DECAY = 1.01
"""The latency floor creeps up 1% a success so that a permanent slow-down becomes the norm."""


def allowed_in_flight(state: TargetState | None, now: float, cooldown: float) -> int | None:
    """How many tasks of this target may run at once now (None: no limit)."""
    if state is None:
        return None
    if state.breaker == "open":
        if state.opened_at is not None and now - state.opened_at >= cooldown:
            return 1  # half-open: one probe
        return 0
    if state.breaker == "half_open":
        return 1
    return None if state.limit is None else max(1, math.floor(state.limit))


def breaker_may_probe(state: TargetState, now: float, cooldown: float) -> bool:
    return (
        state.breaker == "open"
        and state.opened_at is not None
        and now - state.opened_at >= cooldown
    )


def after_result(
    state: TargetState,
    *,
    ok: bool,
    overloaded: bool,
    latency: float,
    now: float,
    threshold: int,
    max_concurrency: int | None,
) -> TargetState:
    """The target's state after one finished call."""
    limit = state.limit
    floor = state.latency_floor
    slow = floor is not None and latency > SLOW_FACTOR * floor and latency > 0.005
    if max_concurrency is not None:
        limit = float(max_concurrency) if limit is None else min(limit, float(max_concurrency))
        if overloaded or slow:
            limit = max(1.0, limit * BACKOFF_FACTOR)
        elif ok:
            limit = min(float(max_concurrency), limit + 1.0 / max(limit, 1.0))
        if ok and not overloaded:
            floor = latency if floor is None else min(latency, floor * FLOOR_DECAY)
    if ok:
        return dataclasses.replace(
            state,
            breaker="closed",
            consecutive_failures=0,
            opened_at=None,
            limit=limit,
            latency_floor=floor,
        )
    failures = state.consecutive_failures + 1
    opens = threshold > 0 and (failures >= threshold or state.breaker != "closed")
    return dataclasses.replace(
        state,
        breaker="open" if opens else state.breaker,
        consecutive_failures=failures,
        opened_at=now if opens else state.opened_at,
        limit=limit,
        latency_floor=floor,
    )
