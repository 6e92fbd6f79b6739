"""An independent check of an executed schedule against the limits it had to keep.

It reads only what ran (each attempt's site, kind, pool, units, start and end) and the limits:
not the planner's books, not the leases. A global rate of r per second with burst b allows at
most `b + r (t2 - t1)` starts in any closed interval [t1, t2] (the envelope of a token bucket
that starts full); a shared pool of n units allows n units in use across all sites; a site's
pool allows its capacity in force at that moment. A start that breaks a limit counts once per
limit it breaks. An attempt's units are free again at its end, so a start at the same instant
may take them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from tactician.sim.leases import RateLimit

_SLACK = 1e-9


@dataclass(frozen=True, slots=True)
class Executed:
    """One attempt as it ran."""

    task: str
    site: str
    kind: str
    pool: str
    units: int
    start: float
    end: float
    completed: bool = True
    """False: stopped before its end (a site fenced off when its lease expired)."""


def rate_violations(starts: Iterable[float], limit: RateLimit) -> int:
    """Starts j for which some earlier start i leaves more than `burst + rate (t_j - t_i)`
    starts in [t_i, t_j]; in O(n log n)."""
    best = -math.inf
    """max over i <= j of (rate t_i - i)."""
    broken = 0
    for j, at in enumerate(sorted(starts)):
        best = max(best, limit.per_second * at - j)
        if j + 1 - limit.per_second * at + best > limit.burst + _SLACK:
            broken += 1
    return broken


def most_in_window(starts: Iterable[float], window: float) -> int:
    """The most starts in any half-open window [t, t + window)."""
    times = sorted(starts)
    most = first = 0
    for last, at in enumerate(times):
        while times[first] <= at - window:
            first += 1
        most = max(most, last - first + 1)
    return most


def over_capacity(runs: Sequence[Executed], capacity: Callable[[float], int]) -> int:
    """Starts after which the units in use exceed `capacity(at)`."""
    # At one instant, ends come before starts; a start's own units count.
    events = sorted([(r.end, 0, -r.units) for r in runs] + [(r.start, 1, r.units) for r in runs])
    used = broken = 0
    for at, is_start, delta in events:
        used += delta
        if is_start and used > capacity(at):
            broken += 1
    return broken


def _constant(units: int) -> Callable[[float], int]:
    return lambda _: units


@dataclass(frozen=True)
class Violations:
    rate: dict[str, int]
    """Kind → starts outside its global rate's envelope."""
    pool: dict[str, int]
    """Shared pool → starts that took it over its units."""
    site_capacity: int
    """Starts that took a site's pool over its capacity in force."""
    busiest_minute: dict[str, int]
    """Kind → the most starts in any 60 s window (for the report; the envelope is the check)."""

    @property
    def global_limits(self) -> int:
        return sum(self.rate.values()) + sum(self.pool.values())

    def to_json(self) -> dict[str, object]:
        return {
            "global_limits": self.global_limits,
            "rate": self.rate,
            "pool": self.pool,
            "site_capacity": self.site_capacity,
            "busiest_minute": self.busiest_minute,
        }


def check_schedule(
    runs: Sequence[Executed],
    *,
    rates: Mapping[str, RateLimit],
    pools: Mapping[str, int],
    site_capacity: Callable[[str, str, float], int],
) -> Violations:
    """Every limit checked over the executed runs (see the module doc)."""
    rate = {
        kind: rate_violations((r.start for r in runs if r.kind == kind), limit)
        for kind, limit in sorted(rates.items())
    }
    busiest = {
        kind: most_in_window((r.start for r in runs if r.kind == kind), 60.0)
        for kind in sorted(rates)
    }
    pool = {
        name: over_capacity([r for r in runs if r.pool == name], _constant(units))
        for name, units in sorted(pools.items())
    }
    by_site: dict[tuple[str, str], list[Executed]] = {}
    for r in runs:
        by_site.setdefault((r.site, r.pool), []).append(r)
    site = 0
    for (site_name, pool_name), mine in sorted(by_site.items()):

        def in_force(at: float, s: str = site_name, p: str = pool_name) -> int:
            return site_capacity(s, p, at)

        site += over_capacity(mine, in_force)
    return Violations(rate, pool, site, busiest)
