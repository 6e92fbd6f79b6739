"""Where each task of a trace runs when the work is spread over sites, and when links drop.

A site is a place with its own workers (a depot, a team, a factory floor). Tasks go to sites by
a seeded rule on their features: the first of `SITE_KEYS` that every task carries (a zone, a
region, a tenant, a service...), its distinct values shuffled by the seed and dealt round-robin
to the sites; without such a feature, a hash of the task id. A pool's capacity is split across
the sites in proportion to the work each site's tasks demand of it (as staffing follows demand),
by largest remainder, each site with work keeping at least one unit; a pool with shifts is split
at each change point. `--site-capacity` replaces the split.

An outage cuts one site's link to the centre over [start, end): the site's own events still
happen there, but nothing crosses the link until it returns.
"""

from __future__ import annotations

import bisect
import math
import random
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tactician.errors import InvalidInput
from tactician.sim.workload import WorkloadTask

SITE_KEYS = ("site", "zone", "region", "tenant", "service", "user")
"""Features that say where a task runs, in the order they are looked for."""

Changes = list[tuple[float, int]]
"""(from this time, capacity) change points of one pool."""


@dataclass(frozen=True)
class Outage:
    """A site's link to the centre is down over [start, end)."""

    site: str
    start: float
    end: float


@dataclass(frozen=True)
class Layout:
    """The sites of a trace: which task runs where, and each site's capacity over time."""

    sites: tuple[str, ...]
    site_of: Mapping[str, str]
    """Task id → site."""
    key: str | None
    """The feature tasks were assigned by (None: a hash of the task id)."""
    groups: Mapping[str, tuple[str, ...]]
    """Site → the values of `key` it serves."""
    capacity: Mapping[str, Mapping[str, int]]
    """Site → pool → units at the start of the trace."""
    calendar: Mapping[str, Mapping[str, Changes]]
    """Site → pool → change points (pools with shifts only)."""

    def capacity_at(self, site: str, pool: str, at: float) -> int:
        """The site's units of `pool` in force at `at`."""
        changes = self.calendar.get(site, {}).get(pool)
        if not changes:
            return self.capacity[site].get(pool, 0)
        index = bisect.bisect_right([when for when, _ in changes], at) - 1
        return changes[index][1] if index >= 0 else self.capacity[site].get(pool, 0)

    def totals(self) -> tuple[dict[str, int], dict[str, Changes]]:
        """The capacity of every pool summed over the sites, and its summed shifts."""
        pools = sorted({pool for caps in self.capacity.values() for pool in caps})
        capacity = {pool: sum(self.capacity[s].get(pool, 0) for s in self.sites) for pool in pools}
        calendar: dict[str, Changes] = {}
        for pool in pools:
            points = sorted(
                {at for s in self.sites for at, _ in self.calendar.get(s, {}).get(pool, [])}
            )
            if points:
                calendar[pool] = [
                    (at, sum(self.capacity_at(s, pool, at) for s in self.sites)) for at in points
                ]
        return capacity, calendar


def site_names(count: int) -> tuple[str, ...]:
    if count < 1:
        raise InvalidInput(f"--agents must be at least 1, got {count}")
    return tuple(f"s{n}" for n in range(1, count + 1))


def _site_key(tasks: Sequence[WorkloadTask], key: str | None) -> str | None:
    if key is not None:
        missing = next((t.id for t in tasks if key not in t.features), None)
        if missing is not None:
            raise InvalidInput(f"--site-key {key}: task {missing} has no feature {key!r}")
        return key
    return next((k for k in SITE_KEYS if all(k in t.features for t in tasks)), None)


def assign_sites(
    tasks: Sequence[WorkloadTask], count: int, *, seed: int, key: str | None = None
) -> tuple[tuple[str, ...], dict[str, str], str | None, dict[str, tuple[str, ...]]]:
    """Sites, task id → site, the feature used and site → its values (see the module doc)."""
    sites = site_names(count)
    key = _site_key(tasks, key)
    if key is None:
        site_of = {t.id: sites[zlib.crc32(f"{seed}:{t.id}".encode()) % count] for t in tasks}
        return sites, site_of, None, {}
    values = sorted({str(t.features[key]) for t in tasks})
    if len(values) < count:
        raise InvalidInput(
            f"--agents {count}: the tasks have only {len(values)} values of {key!r}; "
            f"choose at most {len(values)} sites or another --site-key"
        )
    random.Random(f"sites:{seed}").shuffle(values)
    home = {value: sites[n % count] for n, value in enumerate(values)}
    groups = {s: tuple(sorted(v for v in values if home[v] == s)) for s in sites}
    return sites, {t.id: home[str(t.features[key])] for t in tasks}, key, groups


def apportion(units: int, shares: Mapping[str, float]) -> dict[str, int]:
    """`units` split in proportion to `shares` (largest remainder); a site with a positive
    share keeps at least one unit, so the sum can exceed `units` when units are few."""
    total = sum(shares.values())
    if total <= 0:
        return {site: 0 for site in shares}
    exact = {site: units * share / total for site, share in shares.items()}
    given = {site: math.floor(value) for site, value in exact.items()}
    left = units - sum(given.values())
    for site in sorted(exact, key=lambda s: (given[s] - exact[s], s))[:left]:
        given[site] += 1
    return {s: max(1, n) if shares[s] > 0 else n for s, n in given.items()}


def split_capacity(
    tasks: Sequence[WorkloadTask],
    sites: Sequence[str],
    site_of: Mapping[str, str],
    capacity: Mapping[str, int],
    calendar: Mapping[str, Sequence[tuple[float, int]]],
    given: Mapping[str, Mapping[str, int]] | None = None,
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, Changes]]]:
    """Per site, its units of each pool and their shifts (see the module doc).

    `given`: site → pool → units, replacing the split (and the pool's shifts) at that site."""
    work: dict[str, dict[str, float]] = {}
    for t in tasks:
        for pool, units in t.resources.items():
            mine = work.setdefault(pool, {s: 0.0 for s in sites})
            mine[site_of[t.id]] += units * t.duration
    pools = sorted(set(capacity) | set(work))
    per_site: dict[str, dict[str, int]] = {s: {} for s in sites}
    shifts: dict[str, dict[str, Changes]] = {s: {} for s in sites}
    for pool in pools:
        shares = work.get(pool, {s: 0.0 for s in sites})
        if pool in capacity:
            for site, units in apportion(capacity[pool], shares).items():
                per_site[site][pool] = units
        for at, units in calendar.get(pool, ()):
            for site, share in apportion(units, shares).items():
                shifts[site].setdefault(pool, []).append((at, share))
    for site, pools_given in (given or {}).items():
        for pool, units in pools_given.items():
            per_site[site][pool] = units
            shifts[site].pop(pool, None)
    for site in sites:
        for pool, mine in work.items():
            if mine[site] > 0 and pool in capacity and per_site[site].get(pool, 0) < 1:
                raise InvalidInput(f"site {site}: pool {pool} has no units for its tasks")
    return per_site, {s: c for s, c in shifts.items() if c}


def layout(
    tasks: Sequence[WorkloadTask],
    count: int,
    capacity: Mapping[str, int],
    calendar: Mapping[str, Sequence[tuple[float, int]]],
    *,
    seed: int,
    key: str | None = None,
    site_capacity: Mapping[str, Mapping[str, int]] | None = None,
) -> Layout:
    """The sites of a trace (see the module doc)."""
    sites, site_of, used_key, groups = assign_sites(tasks, count, seed=seed, key=key)
    for site in site_capacity or {}:
        if site not in sites:
            raise InvalidInput(f"--site-capacity: no site {site!r}; sites are {', '.join(sites)}")
    per_site, shifts = split_capacity(tasks, sites, site_of, capacity, calendar, site_capacity)
    return Layout(sites, site_of, used_key, groups, per_site, shifts)


# --- links -----------------------------------------------------------------------------------


class Links:
    """Which sites' links are up at a time, from their outages."""

    def __init__(self, outages: Iterable[Outage]) -> None:
        self.down: dict[str, list[tuple[float, float]]] = {}
        for outage in sorted(outages, key=lambda o: (o.site, o.start)):
            spans = self.down.setdefault(outage.site, [])
            if spans and outage.start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], outage.end))
            else:
                spans.append((outage.start, outage.end))

    def up(self, site: str, at: float) -> bool:
        return self.up_again(site, at) == at

    def up_again(self, site: str, at: float) -> float:
        """`at` when the link is up then, else when it comes back."""
        for start, end in self.down.get(site, ()):
            if start <= at < end:
                return end
        return at

    def spans(self) -> list[tuple[str, float, float]]:
        """(site, start, end) of every outage, merged, in time order."""
        return sorted(
            ((site, start, end) for site, spans in self.down.items() for start, end in spans),
            key=lambda x: (x[1], x[0]),
        )


_TIME = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*$")
_UNIT = {None: 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str, what: str) -> float:
    """Seconds from `90`, `90s`, `15m` or `2h`."""
    match = _TIME.match(text)
    if match is None:
        raise InvalidInput(f"{what}: {text!r} is not a time such as 90, 90s, 15m or 2h")
    return float(match.group(1)) * _UNIT[match.group(2)]


def parse_outage(text: str, sites: Sequence[str]) -> Outage:
    """`SITE:START-END` with times as `parse_duration` reads them, e.g. `s2:2h-3h`."""
    site, colon, window = text.partition(":")
    start_text, dash, end_text = window.partition("-")
    if not colon or not dash:
        raise InvalidInput(f"--outage must look like SITE:START-END (e.g. s2:2h-3h), got {text!r}")
    site = site.strip()
    if site not in sites:
        raise InvalidInput(f"--outage {text}: no site {site!r}; sites are {', '.join(sites)}")
    start = parse_duration(start_text, f"--outage {text}")
    end = parse_duration(end_text, f"--outage {text}")
    if end <= start:
        raise InvalidInput(f"--outage {text}: the end must come after the start")
    return Outage(site, start, end)


def random_outages(
    sites: Sequence[str], count: int, length: float, span: float, *, seed: int
) -> list[Outage]:
    """`count` outages of `length` seconds, each at a seeded random site and time in the
    trace's span."""
    if count < 0:
        raise InvalidInput(f"--random-outages must be at least 0, got {count}")
    if length <= 0:
        raise InvalidInput(f"--outage-length must be positive, got {length}")
    rng = random.Random(f"outages:{seed}")
    outages = []
    for _ in range(count):
        start = round(rng.uniform(0.0, max(0.0, span - length)), 3)
        outages.append(Outage(rng.choice(list(sites)), start, start + length))
    return outages


def parse_site_capacity(items: Sequence[str], sites: Sequence[str]) -> dict[str, dict[str, int]]:
    """`pool=N` (every site) or `SITE:pool=N` (one site) options as site → pool → units."""
    given: dict[str, dict[str, int]] = {}
    for item in items:
        where, colon, rest = item.rpartition(":")
        pool, _, units = rest.partition("=")
        if not pool.strip() or not units.strip().isdigit() or int(units) < 1:
            raise InvalidInput(
                f"--site-capacity must look like pool=N or SITE:pool=N with N >= 1, got {item!r}"
            )
        chosen = [where.strip()] if colon else list(sites)
        if chosen[0] not in sites:
            raise InvalidInput(f"--site-capacity {item}: no site {chosen[0]!r}")
        for site in chosen:
            given.setdefault(site, {})[pool.strip()] = int(units)
    return given
