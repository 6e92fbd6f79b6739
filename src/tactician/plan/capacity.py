"""Which ready tasks start now: capacity-aware and in the order the scorer gives.

A pure function over a snapshot. The planner never over-commits a pool, never starts two tasks
with the same concurrency key, keeps each kind's rate limit and each target's breaker and
adaptive limit. A task that cannot start now is skipped; later tasks may still fit (a small
task may pass a large one, as backfilling does in HPC schedulers).

With `reserve` (EASY backfilling), the first task of a pool that does not fit gets a
reservation: the time at which the running tasks' expected ends free enough units for it (the
shadow time). A later task of that pool may then start only if it is expected to end by the
shadow time, or if it fits in the units the reserved task will leave spare.

A task ranked below `HOLD_BELOW` (one that waited past the policy's `max_wait`, or that an
operator said to run now) and that does not fit **holds its pool**: nothing ranked after it
starts there until it has started. Without that, a task needing more units than ever come
free at once would wait behind a steady stream of narrower ones for as long as it lasts.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from tactician.plan.flow import Bucket, refill, take

HOLD_BELOW = -1e14
"""Ranks below this hold their pool when they do not fit (aged tasks: `decide.shares.AGED`;
run-now overrides: -inf)."""


class Candidate(NamedTuple):
    """A ready task as the planner sees it (a tuple: thousands are built per tick)."""

    id: str
    kind: str
    pool: str
    units: int
    concurrency_key: str | None
    target: str
    rank: float
    expected: float | None = None
    """Expected run time in seconds (reservations use it; None: unknown, assumed long)."""


@dataclass(frozen=True)
class KindLimits:
    rate_per_second: float | None = None
    rate_burst: float = 1.0


@dataclass
class CapacityView:
    """What is in use now, and the limits. Mutable scratch space for one planning pass."""

    pool_capacity: Mapping[str, int | None]
    pool_used: dict[str, int] = field(default_factory=dict)
    busy_keys: set[str] = field(default_factory=set)
    target_in_flight: dict[str, int] = field(default_factory=dict)
    target_allowed: Mapping[str, int | None] = field(default_factory=dict)
    buckets: dict[str, Bucket] = field(default_factory=dict)
    kind_limits: Mapping[str, KindLimits] = field(default_factory=dict)
    reserve: bool = False
    """EASY backfilling: hold a reservation for the first task of a pool that does not fit."""
    running_ends: Mapping[str, Iterable[tuple[float, int]]] = field(default_factory=dict)
    """Per pool: (expected end, units) of the running tasks, earliest end first, for
    reservations (read only as far as a reservation needs)."""


@dataclass(frozen=True)
class Plan:
    starts: list[Candidate]
    buckets: dict[str, Bucket]
    """Token buckets that changed, to be saved with the starts."""
    blocked: dict[str, str]
    """Why some tasks did not start: task id → reason (only the first few per reason)."""
    wake_in: float | None = None
    """Seconds until a rate-limited task could start: plan again then, not a poll later."""


def plan_starts(
    candidates: Iterable[Candidate], view: CapacityView, now: float, limit: int
) -> Plan:
    """Choose up to `limit` starts from candidates, best first."""
    starts: list[Candidate] = []
    changed: dict[str, Bucket] = {}
    blocked: dict[str, str] = {}
    capacity = view.pool_capacity
    used = view.pool_used
    busy = view.busy_keys
    in_flight = view.target_in_flight
    allowed = view.target_allowed
    wake_in: float | None = None
    shadows: dict[str, list[float]] = {}
    """Per pool with a reservation: [shadow time, spare units at that time]."""
    for task in candidates:
        if len(starts) >= limit:
            break
        cap = capacity.get(task.pool)
        if cap is not None and used.get(task.pool, 0) + task.units > cap:
            if task.pool in shadows:
                _note(blocked, task.id, f"pool {task.pool} is full")
            elif task.rank < HOLD_BELOW:
                shadows[task.pool] = [-math.inf, 0.0]  # nothing else starts there until it does
                _note(blocked, task.id, f"pool {task.pool} is full: held for it")
            elif view.reserve:
                shadows[task.pool] = _shadow(task, cap, view, starts, now)
                _note(blocked, task.id, f"pool {task.pool} is full: reserved for it")
            else:
                _note(blocked, task.id, f"pool {task.pool} is full")
            continue
        shadow = shadows.get(task.pool)
        if shadow is not None:
            expected = math.inf if task.expected is None else task.expected
            if now + expected > shadow[0]:
                if task.units > shadow[1]:
                    _note(blocked, task.id, f"pool {task.pool}: would delay a reservation")
                    continue
                shadow[1] -= task.units
        if task.concurrency_key is not None and task.concurrency_key in busy:
            _note(blocked, task.id, f"concurrency key {task.concurrency_key} is busy")
            continue
        max_flight = allowed.get(task.target)
        if max_flight is not None and in_flight.get(task.target, 0) >= max_flight:
            _note(blocked, task.id, f"target {task.target} is at its limit ({max_flight})")
            continue
        limits = view.kind_limits.get(task.kind)
        if limits is not None and limits.rate_per_second is not None:
            key = f"kind:{task.kind}"
            bucket = view.buckets.get(key, Bucket(limits.rate_burst, now))
            taken = take(bucket, limits.rate_per_second, limits.rate_burst, now)
            if taken is None:
                _note(blocked, task.id, f"rate limit of {task.kind}")
                missing = (
                    1.0 - refill(bucket, limits.rate_per_second, limits.rate_burst, now).tokens
                )
                wait = max(0.0, missing / limits.rate_per_second)
                wake_in = wait if wake_in is None else min(wake_in, wait)
                continue
            view.buckets[key] = changed[key] = taken
        used[task.pool] = used.get(task.pool, 0) + task.units
        if task.concurrency_key is not None:
            busy.add(task.concurrency_key)
        in_flight[task.target] = in_flight.get(task.target, 0) + 1
        starts.append(task)
    return Plan(starts, changed, blocked, wake_in)


def _shadow(
    head: Candidate, cap: int, view: CapacityView, starts: list[Candidate], now: float
) -> list[float]:
    """When enough units free up for `head`, and how many will be spare then."""
    started = sorted(
        (now + (math.inf if s.expected is None else s.expected), s.units)
        for s in starts
        if s.pool == head.pool
    )
    ends = heapq.merge(view.running_ends.get(head.pool, ()), started)
    free = cap - view.pool_used.get(head.pool, 0)
    for end, units in ends:
        free += units
        if free >= head.units:
            return [max(end, now), float(free - head.units)]
    return [math.inf, 0.0]


def _note(blocked: dict[str, str], task_id: str, reason: str) -> None:
    if len(blocked) < 100:
        blocked[task_id] = reason
