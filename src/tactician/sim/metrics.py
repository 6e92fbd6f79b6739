"""What a simulation achieved: deadlines, tardiness, waits, slowdown, makespan, utilisation.

missed_deadlines       tasks with a deadline that finished after it, or never finished
missed_pct             missed_deadlines as a percentage of the tasks that have a deadline
weighted_tardiness     Σ weight · max(0, finish - due_at) over finished tasks with a deadline
mean_wait_s, p95_wait  start - release_at over started tasks (p95: nearest rank)
mean_bounded_slowdown  mean of max(1, (wait + run) / max(run, 10 s)) over finished tasks
makespan_s             last finish - first submission
utilization            per bounded pool: busy units · s / (capacity · makespan); for a pool with
                       a calendar (shifts), over the capacity in force at each instant
decide_cpu_us          scheduler CPU time (ranking and planning) per planning call
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from tactician.sim.simulator import SimResult
from tactician.sim.workload import WorkloadTask

SLOWDOWN_TAU = 10.0
"""Seconds below which a run counts as this long in the bounded slowdown."""


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _offered(
    units: int, changes: Sequence[tuple[float, int]] | None, start: float, end: float
) -> float:
    """Unit-seconds a pool offered over [start, end]: its capacity in force at each instant
    (`units` before the calendar's first change, or throughout without a calendar)."""
    if not changes:
        return units * (end - start)
    total, at, current = 0.0, start, units
    for when, cap in sorted(changes):
        if when > at:
            total += current * (min(when, end) - at)
            at = min(when, end)
        current = cap
    return total + current * max(0.0, end - at)


def compute_metrics(
    tasks: Sequence[WorkloadTask],
    result: SimResult,
    capacity: Mapping[str, int],
    calendar: Mapping[str, Sequence[tuple[float, int]]] | None = None,
) -> dict[str, Any]:
    """The figures above for one simulation of `tasks`."""
    waits: list[float] = []
    slowdowns: list[float] = []
    busy: dict[str, float] = {}
    missed = with_deadline = completed = 0
    tardiness = 0.0
    last_finish: float | None = None
    for task in tasks:
        record = result.records[task.id]
        if task.due_at is not None:
            with_deadline += 1
            if record.finish is None or record.finish > task.due_at:
                missed += 1
            if record.finish is not None:
                tardiness += task.weight * max(0.0, record.finish - task.due_at)
        if record.start is None:
            continue
        wait = record.start - task.release_at
        waits.append(wait)
        if record.finish is None:
            continue
        completed += 1
        run = record.finish - record.start
        slowdowns.append(max(1.0, (wait + run) / max(run, SLOWDOWN_TAU)))
        last_finish = record.finish if last_finish is None else max(last_finish, record.finish)
        for pool, units in task.resources.items():
            busy[pool] = busy.get(pool, 0.0) + units * run
    first_submit = min((t.submit_at for t in tasks), default=0.0)
    makespan = 0.0 if last_finish is None else last_finish - first_submit
    return {
        "tasks": len(tasks),
        "completed": completed,
        "missed_deadlines": missed,
        "missed_pct": round(100.0 * missed / with_deadline, 3) if with_deadline else 0.0,
        "weighted_tardiness": round(tardiness, 3),
        "mean_wait_s": round(sum(waits) / len(waits), 3) if waits else 0.0,
        "p95_wait_s": round(_p95(waits), 3) if waits else 0.0,
        "mean_bounded_slowdown": round(sum(slowdowns) / len(slowdowns), 4) if slowdowns else 0.0,
        "makespan_s": round(makespan, 3),
        "utilization": {
            pool: round(busy.get(pool, 0.0) / offered, 4) if offered > 0 else 0.0
            for pool, units in sorted(capacity.items())
            for offered in [
                _offered(units, (calendar or {}).get(pool), first_submit, first_submit + makespan)
            ]
        },
        "decide_cpu_us": round(result.decide_cpu_us, 3),
        "planning_calls": result.planning_calls,
    }


def slowdown_floor(tasks: Sequence[WorkloadTask]) -> float:
    """The mean bounded slowdown of `tasks` with unlimited capacity: each starts the moment it
    is released and the tasks it depends on (among `tasks`) have finished, and runs its true
    duration. A lower bound on every schedule's: no policy can shorten the wait of a task for
    its parents' own runs."""
    by_id = {t.id: t for t in tasks}
    finish: dict[str, float] = {}
    for task in sorted(tasks, key=lambda t: (t.submit_at, t.id)):
        pending = [task]
        while pending:  # parents before children, without recursion
            top = pending[-1]
            parents = [by_id[d] for d in top.depends_on if d in by_id and d not in finish]
            if parents:
                pending.extend(parents)
                continue
            pending.pop()
            if top.id not in finish:
                ready = max([top.release_at, *(finish[d] for d in top.depends_on if d in by_id)])
                finish[top.id] = ready + top.duration
    total = sum(
        max(1.0, (finish[t.id] - t.release_at) / max(t.duration, SLOWDOWN_TAU)) for t in tasks
    )
    return total / len(tasks) if tasks else 0.0
