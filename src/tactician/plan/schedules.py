"""Schedules: which recurring ticks are due, as pure functions of a spec and `now`.

A schedule makes *ticks*, nominal times taken from a cron expression read in the schedule's time
zone or from a fixed interval. The planner asks `due_ticks` which ticks fire now, creates one task
per tick under the idempotency key `tick_key` (so several planners still create it once), delays
it by `fire_at`'s jitter, and asks `overlap_action` when earlier runs are still unfinished.

Daylight saving time, for cron schedules, follows Vixie cron:

- A wall-clock time that does not exist (spring forward) fires once, at the first instant after
  the gap: "30 2 * * *" in America/New_York fires at 03:00 EDT on 2026-03-08. Several skipped
  times collapse into that one tick. This is croniter's behaviour.
- A wall-clock time that happens twice (fall back) fires once, at its first occurrence, when the
  hour field is fixed: "30 1 * * *" fires at 01:30 EDT on 2026-11-01 and not again at 01:30 EST.
  When the hour field is `*`, the schedule follows real time and fires in both occurrences, so
  "*/5 * * * *" keeps firing every 5 minutes instead of falling silent for an hour.

Times are float seconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice, takewhile
from typing import Any, Literal, assert_never, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import HOUR_FIELD, CroniterBadDateError, croniter

from tactician.errors import InvalidSchedule

OverlapPolicy = Literal["skip", "buffer_one", "allow_all", "cancel_running"]
OverlapAction = Literal["start", "skip", "buffer", "cancel_running_then_start"]

_OVERLAP_POLICIES = frozenset(get_args(OverlapPolicy))
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_NUMBER = r"\d+(?:\.\d+)?"
_EVERY = re.compile("".join(f"(?:(?P<{unit}>{_NUMBER}){unit})?" for unit in "dhms"))
_UNIT_SECONDS = {"d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0}
# A satisfiable 5-field expression fires at least every 8 years (Feb 29), well within the
# 50 years croniter searches, so one search from any date tells whether it ever fires.
_NEVER_FIRES_PROBE = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ScheduleSpec:
    """A recurring task: what to create and when. Invalid values raise `InvalidSchedule`."""

    name: str
    """1 to 200 characters of A-Z a-z 0-9 _ . : -"""
    kind: str
    """The task kind each tick creates."""
    payload: dict[str, Any]
    """The JSON object given to each task."""
    cron: str | None = None
    """A 5-field cron expression such as "*/5 * * * *"; exactly one of `cron` and `every`."""
    every: float | None = None
    """An interval in seconds (> 0); ticks are `anchor + k * every`."""
    timezone: str = "UTC"
    """The IANA zone the cron expression is read in. Unused with `every`."""
    jitter: float = 0.0
    """At most this many seconds are added to each tick, the same on every planner."""
    overlap: OverlapPolicy = "skip"
    """What a tick does while earlier runs are unfinished; see `overlap_action`."""
    catchup_window: float = 60.0
    """After downtime, missed ticks older than `now - catchup_window` are dropped."""
    start_at: float | None = None
    """No tick before this time."""
    end_at: float | None = None
    """No tick after this time."""
    paused: bool = False
    anchor: float = 0.0

    def __post_init__(self) -> None:
        problem = _first_problem(self)
        if problem is not None:
            raise InvalidSchedule(f"schedule {_label(self.name)}: {problem}")


@dataclass(frozen=True)
class DueTicks:
    """What `due_ticks` found."""

    fire: list[float]
    """Ticks to turn into tasks now, oldest first."""
    skipped: int
    """Missed ticks dropped for being older than the catch-up window, counted up to the limit."""
    last_tick: float
    """The new high-water mark for the caller to store: every tick up to it is dealt with."""


def parse_every(text: str) -> float:
    """Seconds in an interval such as "30s", "5m", "2h", "1d", "1h30m" or "90" (seconds)."""
    compact = text.strip()
    seconds = 0.0
    if re.fullmatch(_NUMBER, compact):
        seconds = float(compact)
    elif match := _EVERY.fullmatch(compact):
        parts = match.groupdict().items()
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for unit, number in parts if number)
    if not seconds > 0:
        raise InvalidSchedule(f"interval {text!r} is not like '30s', '5m', '1h30m' or '90'")
    return seconds


def ticks_between(
    spec: ScheduleSpec, after: float, until: float, limit: int = 10_000
) -> list[float]:
    """Nominal ticks t with `after < t <= until` inside start_at/end_at, oldest first, at most
    `limit` of them."""
    if spec.start_at is not None and spec.start_at > after:
        after = math.nextafter(spec.start_at, -math.inf)  # start_at itself may be a tick
    if spec.end_at is not None:
        until = min(until, spec.end_at)
    in_range = takewhile(lambda tick: tick <= until, _ticks_after(spec, after))
    return list(islice(in_range, limit))


def next_tick(spec: ScheduleSpec, after: float) -> float | None:
    """The first tick after `after`, or None when the schedule has ended."""
    ticks = ticks_between(spec, after, math.inf, limit=1)
    return ticks[0] if ticks else None


def due_ticks(
    spec: ScheduleSpec, last_tick: float | None, now: float, limit: int = 10_000
) -> DueTicks:
    """The ticks that must fire at `now`, given the stored high-water mark `last_tick`.

    Ticks after `last_tick` and no older than `now - catchup_window` fire; older ones are
    skipped. `last_tick=None` means no mark yet: ticks inside the window fire and none count as
    skipped (a new schedule passes its creation time instead, so it never fires for earlier
    ticks). At most `limit` ticks fire; the mark then stops at the last of them, so the rest
    fire on the next call.
    """
    if spec.paused:
        # Ticks that fall during a pause are dropped, not kept for later (as in Temporal):
        # resuming must not set off a burst of old ticks.
        return DueTicks([], 0, now if last_tick is None else max(last_tick, now))
    just_before_window = math.nextafter(now - spec.catchup_window, -math.inf)
    if last_tick is None:
        fire = ticks_between(spec, just_before_window, now, limit)
        return DueTicks(fire, 0, fire[-1] if fire else now)
    fire = ticks_between(spec, max(last_tick, just_before_window), now, limit)
    skipped = ticks_between(spec, last_tick, just_before_window, limit)
    considered = fire or skipped
    return DueTicks(fire, len(skipped), considered[-1] if considered else last_tick)


def fire_at(spec: ScheduleSpec, tick: float) -> float:
    """When the task for `tick` should start: the tick plus a jitter in [0, spec.jitter) that is
    drawn from a hash of the name and the tick, so every planner computes the same time."""
    if spec.jitter == 0:
        return tick
    digest = hashlib.blake2b(tick_key(spec.name, tick).encode(), digest_size=8).digest()
    fraction = (int.from_bytes(digest, "big") >> 11) / 2**53  # 53 bits fit a float: < 1.0
    return tick + spec.jitter * fraction


def overlap_action(policy: OverlapPolicy, running: int, buffered: int) -> OverlapAction:
    """What a new tick does while `running` earlier runs are unfinished and `buffered` ticks
    already wait for them."""
    if running == 0:
        return "start"
    match policy:
        case "skip":
            return "skip"
        case "buffer_one":
            return "buffer" if buffered == 0 else "skip"
        case "allow_all":
            return "start"
        case "cancel_running":
            return "cancel_running_then_start"
        case _:
            assert_never(policy)


def backfill_ticks(
    spec: ScheduleSpec, start: float, end: float, limit: int = 10_000
) -> list[float]:
    """Every nominal tick in [start, end], paused or not and whatever the catch-up window, inside
    start_at/end_at. More than `limit` ticks is an error rather than a silent cut."""
    if start > end:
        raise InvalidSchedule(
            f"schedule {spec.name}: a backfill cannot start at {_iso(start)}, "
            f"after its end at {_iso(end)}"
        )
    ticks = ticks_between(spec, math.nextafter(start, -math.inf), end, limit + 1)
    if len(ticks) > limit:
        raise InvalidSchedule(
            f"schedule {spec.name}: the backfill from {_iso(start)} to {_iso(end)} "
            f"has more than {limit} ticks"
        )
    return ticks


def tick_key(name: str, tick: float) -> str:
    """The idempotency key of the task for one tick: several planners create it only once."""
    return f"schedule:{name}:{tick:.3f}"


def _ticks_after(spec: ScheduleSpec, after: float) -> Iterator[float]:
    """Every tick strictly after `after`, oldest first, without end (start_at/end_at ignored)."""
    if spec.every is not None:
        return _interval_ticks(spec.every, spec.anchor, after)
    assert spec.cron is not None  # __post_init__ guarantees one of them
    return _cron_ticks(spec.cron, ZoneInfo(spec.timezone), after)


def _interval_ticks(every: float, anchor: float, after: float) -> Iterator[float]:
    k = math.floor((after - anchor) / every) + 1
    # The division rounds; step k to the first tick after `after` exactly.
    while anchor + (k - 1) * every > after:
        k -= 1
    while anchor + k * every <= after:
        k += 1
    while True:
        yield anchor + k * every  # from k, not by adding up intervals, so errors do not grow
        k += 1


def _cron_ticks(cron: str, zone: ZoneInfo, after: float) -> Iterator[float]:
    # croniter starts at the minute after its start's minute and rounds a float start to
    # microseconds; starting a second early and filtering loses no tick.
    ticks = croniter(cron, datetime.fromtimestamp(math.floor(after) - 1, zone))
    follows_real_time = ticks.expanded[HOUR_FIELD] == ["*"]
    latest = after
    while True:
        tick = ticks.get_next()
        # fromtimestamp sets fold=1 on the second occurrence of a repeated wall-clock time.
        repeated = not follows_real_time and datetime.fromtimestamp(tick, zone).fold == 1
        if tick > latest and not repeated:
            latest = tick
            yield tick


def _first_problem(spec: ScheduleSpec) -> str | None:
    if not isinstance(spec.name, str) or not _NAME.fullmatch(spec.name):
        return "the name must be 1 to 200 characters of A-Z a-z 0-9 _ . : -"
    if not isinstance(spec.kind, str) or not spec.kind:
        return "kind must name a task kind"
    if not isinstance(spec.payload, dict):
        return "payload must be a JSON object"
    try:
        json.dumps(spec.payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"payload is not JSON: {exc}"
    if (spec.cron is None) == (spec.every is None):
        return "give exactly one of cron and every"
    if spec.cron is not None and (problem := _cron_problem(spec.cron)):
        return problem
    if spec.every is not None and not (_is_finite(spec.every) and spec.every > 0):
        return f"every must be a number of seconds > 0, got {spec.every!r}"
    if not isinstance(spec.timezone, str) or not _zone_exists(spec.timezone):
        return f"unknown time zone {spec.timezone!r}"
    if not (_is_finite(spec.jitter) and spec.jitter >= 0):
        return f"jitter must be a number of seconds >= 0, got {spec.jitter!r}"
    if spec.overlap not in _OVERLAP_POLICIES:
        return f"overlap must be one of {', '.join(get_args(OverlapPolicy))}, got {spec.overlap!r}"
    if not (_is_finite(spec.catchup_window) and spec.catchup_window > 0):
        return f"catchup_window must be a number of seconds > 0, got {spec.catchup_window!r}"
    for field, value in (("start_at", spec.start_at), ("end_at", spec.end_at)):
        if value is not None and not _is_finite(value):
            return f"{field} must be a time in epoch seconds, got {value!r}"
    if spec.start_at is not None and spec.end_at is not None and spec.start_at > spec.end_at:
        return f"start_at {_iso(spec.start_at)} is after end_at {_iso(spec.end_at)}"
    if not _is_finite(spec.anchor):
        return f"anchor must be a time in epoch seconds, got {spec.anchor!r}"
    if not isinstance(spec.paused, bool):
        return f"paused must be true or false, got {spec.paused!r}"
    return None


def _cron_problem(cron: str) -> str | None:
    if not isinstance(cron, str) or len(cron.split()) != 5 or not croniter.is_valid(cron):
        return f"cron {cron!r} is not a 5-field cron expression like '*/5 * * * *'"
    try:
        croniter(cron, _NEVER_FIRES_PROBE).get_next()
    except CroniterBadDateError:
        return f"cron {cron!r} never fires"
    return None


def _zone_exists(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):  # ValueError: not a zone key, e.g. "../x"
        return False
    return True


def _is_finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _label(name: object) -> str:
    """The name as it can appear in a one-line message, quoted when it is not valid."""
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    return repr(name if not isinstance(name, str) else name[:60])


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")
