"""Built-in seeded workloads: logistics, incidents, campaigns, batch.

Each scenario draws true run times first, then stretches the arrivals so that the work demanded
of its pool over the trace is `load` times the capacity (1.2: twenty per cent more work than can
be done, so a scheduler must choose). Features hold only what a real system would know when the
task is submitted: they correlate with run time and risk but never reveal `duration`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tactician.errors import InvalidInput
from tactician.sim.workload import FeatureValue, WorkloadTask

HOUR = 3600.0


@dataclass(frozen=True)
class Scenario:
    """A generated workload, the pool capacities it was sized for, and what happened in it."""

    name: str
    tasks: list[WorkloadTask]
    capacity: dict[str, int]
    events: list[dict[str, Any]] = field(default_factory=list)
    """Things outside any task that shaped it, e.g. a storm; for reports, never for policies."""
    calendar: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    """Pools whose capacity changes over time (shifts): (from, capacity) change points.
    `capacity` then holds the mean over the trace."""
    truth: dict[str, dict[str, float]] = field(default_factory=dict)
    """What the generator drew for a task beyond its outcome, e.g. a batch job's run were it
    not to crash and its user's crash rate: for diagnostics, never for policies (not in the
    workload file)."""


@dataclass(frozen=True)
class _Draft:
    """A task before its times are known: times are placed once the span is."""

    kind: str
    duration: float
    units: int
    features: dict[str, FeatureValue]
    estimate: float | None = None
    weight: float = 1.0
    sensitive: bool = False
    truth: dict[str, float] = field(default_factory=dict)


def _capacity(
    pool: str, work: float, load: float, natural_span: float, given: Mapping[str, int] | None
) -> int:
    """The pool's capacity: given, or sized so the trace lasts about `natural_span`."""
    if given is None:
        return max(1, round(work / (load * natural_span)))
    if pool not in given:
        raise InvalidInput(f"capacity: this scenario needs pool {pool!r}, e.g. {pool}=10")
    if given[pool] < 1:
        raise InvalidInput(f"capacity: {pool} must be a positive integer, got {given[pool]}")
    return given[pool]


def _positions(rng: random.Random, count: int) -> list[float]:
    """Sorted arrival points in [0, 1], the first at 0 and the last at 1 (a Poisson process)."""
    if count == 1:
        return [0.0]
    points = sorted(rng.random() for _ in range(count))
    low, width = points[0], (points[-1] - points[0]) or 1.0
    return [(p - low) / width for p in points]


def _ids(prefix: str, count: int) -> list[str]:
    width = max(6, len(str(count)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, count + 1)]


def _t(value: float) -> float:
    return round(value, 3)


# --- logistics -------------------------------------------------------------------------------

_ZONES = {"north": 32.0, "south": 28.0, "east": 30.0, "west": 36.0, "centre": 18.0}  # km/h
_TIERS = {"standard": 1.0, "premium": 2.0, "business": 4.0}


def _logistics(
    rng: random.Random, count: int, load: float, given: Mapping[str, int] | None
) -> Scenario:
    zones = list(_ZONES)
    drafts: list[_Draft] = []
    for _ in range(count):
        zone = rng.choice(zones)
        speed = _ZONES[zone]
        distance = round(min(90.0, 0.5 + 8.0 * rng.lognormvariate(0.0, 0.6)), 1)
        stops = rng.choices((1, 2, 3, 4, 5), cum_weights=(50, 75, 87, 95, 100))[0]
        tier = rng.choices(list(_TIERS), cum_weights=(70, 90, 100))[0]
        drive = distance / speed * HOUR * rng.lognormvariate(0.0, 0.25)  # traffic
        handling = sum(rng.uniform(90.0, 420.0) for _ in range(stops))  # parking, doorsteps
        drafts.append(
            _Draft(
                kind="deliver",
                duration=drive + handling,
                units=1,
                features={"distance_km": distance, "zone": zone, "stops": stops, "tier": tier},
                # The route planner's figure: free-flow speed plus four minutes a stop.
                estimate=round(distance / speed * HOUR + 240.0 * stops, 1),
                weight=round(_TIERS[tier] * rng.uniform(0.8, 1.25), 2),
            )
        )
    work = sum(d.duration for d in drafts)
    drivers = _capacity("drivers", work, load, 10 * HOUR, given)
    storm_zone = rng.choice(zones)
    storm_at = rng.uniform(0.2, 0.7)
    slowdown = [rng.uniform(1.6, 2.0) for _ in drafts]
    points = _positions(rng, count)

    def storm_window(span: float) -> tuple[float, float]:
        start = storm_at * max(0.0, span - HOUR)
        return start, start + HOUR

    def in_storm(i: int, span: float, window: tuple[float, float]) -> bool:
        return drafts[i].features["zone"] == storm_zone and (
            window[0] <= points[i] * span < window[1]
        )

    # The storm adds work and the span sets which tasks it hits: a few rounds settle both.
    span = work / (drivers * load)
    for _ in range(5):
        window = storm_window(span)
        extra = sum(
            drafts[i].duration * (slowdown[i] - 1.0)
            for i in range(count)
            if in_storm(i, span, window)
        )
        span = (work + extra) / (drivers * load)
    window = storm_window(span)
    tasks = []
    for i, (task_id, draft) in enumerate(zip(_ids("d", count), drafts, strict=True)):
        release = _t(points[i] * span)
        booked_ahead = rng.uniform(0.5, 12.0) * HOUR
        slot = rng.choice((1.0, 2.0, 2.0, 4.0)) * HOUR
        duration = draft.duration * (slowdown[i] if in_storm(i, span, window) else 1.0)
        tasks.append(
            WorkloadTask(
                id=task_id,
                kind=draft.kind,
                submit_at=_t(max(0.0, release - booked_ahead)),
                release_at=release,
                due_at=_t(release + slot),
                duration=_t(duration),
                estimate=draft.estimate,
                weight=draft.weight,
                resources={"drivers": 1},
                features={**draft.features, "slot_hours": slot / HOUR},
            )
        )
    storm = {
        "event": "storm",
        "zone": storm_zone,
        "start": _t(window[0]),
        "end": _t(window[1]),
        "slowdown": [1.6, 2.0],
    }
    return Scenario("logistics", tasks, {"drivers": drivers}, [storm])


# --- incidents -------------------------------------------------------------------------------

# service: (how hard its incidents are to fix, whether fixing it touches sensitive systems)
_SERVICES = {
    "payments": (1.5, True),
    "auth": (1.2, True),
    "ledger": (1.6, True),
    "checkout": (1.3, False),
    "search": (1.0, False),
    "media": (0.8, False),
    "email": (0.7, False),
}
_ALERTS = ("HighErrorRate", "LatencyP99", "DiskFull", "PodCrashLoop", "CertExpiry", "QueueBacklog")
_SEVERITY_FIX = {1: 1800.0, 2: 1200.0, 3: 900.0, 4: 600.0}  # median seconds to fix
_SEVERITY_DEADLINE = {1: HOUR, 2: 2 * HOUR, 3: 4 * HOUR, 4: 24 * HOUR}  # time to resolve
_DAY_SHARE = 1.5
"""Engineers on call by day (08:00-20:00) relative to the mean; by night, 2 - this."""
_SEVERITY_WEIGHT = {1: 10.0, 2: 5.0, 3: 2.0, 4: 1.0}


def _incidents(
    rng: random.Random, count: int, load: float, given: Mapping[str, int] | None
) -> Scenario:
    storms: list[list[_Draft]] = []
    made = 0
    while made < count:
        service = rng.choice(list(_SERVICES))
        hardness, touches_sensitive = _SERVICES[service]
        severity = rng.choices((1, 2, 3, 4), cum_weights=(5, 20, 60, 100))[0]
        alert = rng.choice(_ALERTS)
        fingerprint = f"{service}/{alert}/{rng.getrandbits(32):08x}"
        runbook = rng.random() < 0.6
        typical = _SEVERITY_FIX[severity] * hardness * (0.6 if runbook else 1.0)
        sensitive = touches_sensitive and (severity <= 2 or rng.random() < 0.3)
        error_rate = min(1.0, rng.lognormvariate(math.log(0.04 * (5 - severity)), 0.6))
        size = min(count - made, 1 + int(rng.expovariate(1 / 5.0)))
        storm = []
        for n in range(size):
            # The first alert carries the real fix; duplicates only need acknowledging.
            if n == 0:
                duration = typical * rng.lognormvariate(0.0, 0.6)
            else:
                duration = rng.uniform(30.0, 180.0)
            storm.append(
                _Draft(
                    kind="remediate",
                    duration=max(20.0, duration),
                    units=1,
                    features={
                        "fingerprint": fingerprint,
                        "service": service,
                        "alert": alert,
                        "severity": severity,
                        "error_rate": round(min(1.0, error_rate * rng.uniform(0.8, 1.2)), 4),
                        "runbook": runbook,
                    },
                    estimate=round(typical, 1) if runbook else None,
                    weight=_SEVERITY_WEIGHT[severity],
                    sensitive=sensitive,
                )
            )
        storms.append(storm)
        made += size
    work = sum(d.duration for storm in storms for d in storm)
    oncall = _capacity("oncall", work, load, 48 * HOUR, given)
    span = work / (oncall * load)
    ids = iter(_ids("a", count))
    tasks = []
    for start, storm in zip(_positions(rng, len(storms)), storms, strict=True):
        at = start * span
        for n, draft in enumerate(storm):
            submit = _t(min(span, at))
            # What the alerting system reports: how many alerts of this fingerprint came first.
            draft.features["repeat"] = n
            tasks.append(
                WorkloadTask(
                    id=next(ids),
                    kind=draft.kind,
                    submit_at=submit,
                    release_at=submit,
                    due_at=_t(submit + _SEVERITY_DEADLINE[int(draft.features["severity"])]),
                    duration=_t(draft.duration),
                    estimate=draft.estimate,
                    weight=draft.weight,
                    resources={"oncall": 1},
                    features=draft.features,
                    sensitive=draft.sensitive,
                )
            )
            at += rng.expovariate(1 / 30.0)  # duplicates fire seconds apart
    # Shifts: more engineers from 08:00 to 20:00 than at night; the trace starts at midnight.
    day = max(1, round(oncall * _DAY_SHARE))
    night = max(1, round(oncall * (2.0 - _DAY_SHARE)))
    calendar: list[tuple[float, int]] = []
    for midnight in range(0, math.ceil(span / (24 * HOUR)) + 2):
        base = midnight * 24 * HOUR
        calendar += [(base, night), (base + 8 * HOUR, day), (base + 20 * HOUR, night)]
    calendar.append((calendar[-1][0] + 4 * HOUR, day))  # the backlog drains by day
    shifts = {"event": "shifts", "pool": "oncall", "day": day, "night": night}
    return Scenario("incidents", tasks, {"oncall": oncall}, [shifts], {"oncall": calendar})


# --- campaigns -------------------------------------------------------------------------------

_CHANNELS = {"email": 1.2, "sms": 0.6, "push": 0.25, "whatsapp": 0.9}  # median API seconds
_SEGMENTS = {"vip": 3.0, "active": 1.5, "new": 1.2, "lapsed": 0.8}


def _campaigns(
    rng: random.Random, count: int, load: float, given: Mapping[str, int] | None
) -> Scenario:
    launches = min(count, rng.randint(3, 6))
    drafts: list[tuple[int, _Draft]] = []
    for _ in range(count):
        campaign = rng.randrange(launches)
        channel = rng.choices(list(_CHANNELS), cum_weights=(50, 75, 90, 100))[0]
        segment = rng.choices(list(_SEGMENTS), cum_weights=(5, 55, 75, 100))[0]
        template_kb = round(40.0 * rng.lognormvariate(0.0, 0.7), 1) if channel == "email" else 1
        recipients = 1 if rng.random() < 0.9 else rng.randint(2, 40)
        duration = (
            _CHANNELS[channel] * rng.lognormvariate(0.0, 0.35)
            + 0.01 * template_kb
            + 0.15 * (recipients - 1)
        )
        if rng.random() < 0.02:  # the provider times out and the client retries
            duration += rng.uniform(5.0, 30.0)
        drafts.append(
            (
                campaign,
                _Draft(
                    kind=f"send_{channel}",
                    duration=duration,
                    units=1,
                    features={
                        "campaign": f"c{campaign + 1}",
                        "channel": channel,
                        "segment": segment,
                        "template_kb": template_kb,
                        "recipients": recipients,
                    },
                    weight=_SEGMENTS[segment],
                ),
            )
        )
    work = sum(d.duration for _, d in drafts)
    api = _capacity("api", work, load, 12 * HOUR, given)
    span = work / (api * load)
    launch_at = sorted([0.0] + [rng.uniform(0.0, 0.6) * span for _ in range(launches - 1)])
    tasks = []
    for task_id, (campaign, draft) in zip(_ids("m", count), drafts, strict=True):
        launch = launch_at[campaign]
        # The customer's preferred window opens somewhere between the launch and the end.
        opens = launch + rng.random() * (span - launch)
        width = rng.choice((1.0, 2.0, 3.0)) * HOUR
        tasks.append(
            WorkloadTask(
                id=task_id,
                kind=draft.kind,
                submit_at=_t(launch),
                release_at=_t(opens),
                due_at=_t(opens + width),
                duration=_t(draft.duration),
                weight=draft.weight,
                resources={"api": 1},
                features=draft.features,
            )
        )
    return Scenario("campaigns", tasks, {"api": api})


# --- batch -----------------------------------------------------------------------------------

# job type: (median seconds, units it may ask for, typical input GB)
_JOBS: dict[str, tuple[float, tuple[int, ...], float]] = {
    "train": (3 * HOUR, (4, 8), 200.0),
    "sim": (HOUR, (2, 4), 20.0),
    "render": (1800.0, (1, 2, 4), 50.0),
    "etl": (1200.0, (1, 2), 100.0),
    "test": (300.0, (1,), 2.0),
}


_CRASH_LOW, _CRASH_HIGH = 10.0, 90.0
"""A crashing job's run, uniform between these (seconds). Both are at least the bounded
slowdown's 10 s, and an uncrashed run at least 30 s, so `truth`'s mean_inverse_run, E[1/run],
is also E[1/max(run, 10 s)], the slowdown's weight."""

_WALLTIMES = (0.5 * HOUR, HOUR, 2 * HOUR, 4 * HOUR, 8 * HOUR, 12 * HOUR, 24 * HOUR, 48 * HOUR)


def _batch(
    rng: random.Random, count: int, load: float, given: Mapping[str, int] | None
) -> Scenario:
    users = [f"u{i:02d}" for i in range(1, 31)]
    # Users pad their requests by habit, each by their own factor, and some users' jobs often
    # crash in their first minute (a bad input path, a missing module).
    padding = {user: rng.uniform(1.5, 4.0) for user in users}
    crashes = {user: rng.choice((0.02, 0.05, 0.1, 0.3)) for user in users}
    arrays: list[list[_Draft]] = []
    made = 0
    while made < count:
        user = rng.choice(users)
        job_type = rng.choices(list(_JOBS), cum_weights=(10, 30, 45, 70, 100))[0]
        median, unit_choices, typical_gb = _JOBS[job_type]
        units = rng.choice(unit_choices)
        size = min(count - made, 1 if rng.random() < 0.7 else rng.randint(2, 20))
        project = f"p{rng.randint(1, 8)}"
        array = []
        for _ in range(size):
            input_gb = round(typical_gb * rng.lognormvariate(0.0, 0.8), 1)
            ratio = max(input_gb, 0.1) / typical_gb
            duration = min(48 * HOUR, max(30.0, median * ratio**0.6 * rng.lognormvariate(0, 0.5)))
            # The request: what the user believes such a job takes (not this job's input),
            # padded, rounded up to one of the queue's standard wall times.
            belief = median * padding[user] * rng.lognormvariate(0.0, 0.3)
            walltime = next((w for w in _WALLTIMES if w >= belief), _WALLTIMES[-1])
            crash = crashes[user]
            drawn = {
                "uncrashed_s": duration,
                "crash_rate": crash,
                "mean_run_s": crash * (_CRASH_LOW + _CRASH_HIGH) / 2 + (1 - crash) * duration,
                "mean_inverse_run": crash
                * math.log(_CRASH_HIGH / _CRASH_LOW)
                / (_CRASH_HIGH - _CRASH_LOW)
                + (1 - crash) / duration,
            }
            if rng.random() < crash:
                duration = rng.uniform(_CRASH_LOW, _CRASH_HIGH)
            array.append(
                _Draft(
                    kind=job_type,
                    duration=duration,
                    units=units,
                    features={
                        "user": user,
                        "project": project,
                        "input_gb": input_gb,
                        "array_size": size,
                    },
                    estimate=walltime,
                    weight=float(rng.choice((1, 1, 2, 3))),
                    truth=drawn,
                )
            )
        arrays.append(array)
        made += size
    work = sum(d.duration * d.units for array in arrays for d in array)
    cluster = _capacity("cluster", work, load, 24 * HOUR, given)
    if cluster < max(d.units for array in arrays for d in array):
        raise InvalidInput(f"capacity: cluster={cluster} is less than a job asks for (up to 8)")
    span = work / (cluster * load)
    ids = iter(_ids("j", count))
    last_job_of: dict[str, str] = {}
    tasks = []
    truth: dict[str, dict[str, float]] = {}
    for start, array in zip(_positions(rng, len(arrays)), arrays, strict=True):
        submit = _t(start * span)
        user = str(array[0].features["user"])
        # A fifth of arrays are the next step of the user's pipeline.
        after = last_job_of.get(user) if rng.random() < 0.2 else None
        for draft in array:
            release = (
                submit if rng.random() < 0.9 else _t(min(span, submit + rng.uniform(0, 2) * HOUR))
            )
            assert draft.estimate is not None
            due = None
            if rng.random() < 0.25:
                due = _t(release + max(4 * HOUR, 3 * draft.estimate))
            task_id = next(ids)
            truth[task_id] = draft.truth
            tasks.append(
                WorkloadTask(
                    id=task_id,
                    kind=draft.kind,
                    submit_at=submit,
                    release_at=release,
                    due_at=due,
                    duration=_t(draft.duration),
                    estimate=draft.estimate,
                    weight=draft.weight,
                    resources={"cluster": draft.units},
                    features=draft.features,
                    depends_on=(after,) if after else (),
                )
            )
            last_job_of[user] = task_id
    return Scenario("batch", tasks, {"cluster": cluster}, truth=truth)


# --- choosing --------------------------------------------------------------------------------

_Builder = Callable[[random.Random, int, float, Mapping[str, int] | None], Scenario]
SCENARIOS: dict[str, _Builder] = {
    "logistics": _logistics,
    "incidents": _incidents,
    "campaigns": _campaigns,
    "batch": _batch,
}


def build(
    name: str,
    *,
    tasks: int,
    seed: int,
    load: float = 1.2,
    capacity: Mapping[str, int] | None = None,
) -> Scenario:
    """A scenario's tasks (sorted by submission), its capacities and its events."""
    if name not in SCENARIOS:
        raise InvalidInput(f"no scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    if tasks < 1:
        raise InvalidInput(f"tasks must be at least 1, got {tasks}")
    if not (load > 0 and math.isfinite(load)):
        raise InvalidInput(f"load must be a positive number, got {load}")
    scenario = SCENARIOS[name](random.Random(f"{name}:{seed}"), tasks, load, capacity)
    scenario.tasks.sort(key=lambda t: (t.submit_at, t.id))
    return scenario


def generate(
    name: str,
    *,
    tasks: int,
    seed: int,
    load: float = 1.2,
    capacity: dict[str, int] | None = None,
) -> tuple[list[WorkloadTask], dict[str, int]]:
    """The tasks of a built-in scenario and the pool capacities they were sized against."""
    scenario = build(name, tasks=tasks, seed=seed, load=load, capacity=capacity)
    return scenario.tasks, scenario.capacity
