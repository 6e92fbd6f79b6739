"""The offline optimum: optima worked out by hand, feasibility checked, baselines beaten."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from tactician.decide.scorers import get_scorer
from tactician.errors import InvalidInput
from tactician.sim.metrics import compute_metrics
from tactician.sim.optimum import MAX_TASKS, Optimum, offline_optimum
from tactician.sim.scenarios import generate
from tactician.sim.simulator import SimResult, simulate
from tactician.sim.workload import WorkloadTask

METRIC = {
    "missed": "missed_deadlines",
    "weighted_tardiness": "weighted_tardiness",
    "slowdown": "mean_bounded_slowdown",
}
ROUNDING = {"missed": 0.0, "weighted_tardiness": 1e-3, "slowdown": 1e-4}
"""How far compute_metrics rounds each figure."""


def wt(
    task_id: str,
    duration: float,
    *,
    release: float = 0.0,
    due: float | None = None,
    weight: float = 1.0,
    units: int = 1,
    pool: str | None = "p",
    deps: tuple[str, ...] = (),
) -> WorkloadTask:
    return WorkloadTask(
        id=task_id,
        kind="k",
        submit_at=release,
        release_at=release,
        duration=duration,
        due_at=due,
        weight=weight,
        resources={} if pool is None else {pool: units},
        depends_on=deps,
    )


def starts(optimum: Optimum) -> dict[str, float | None]:
    return {task_id: r.start for task_id, r in optimum.records.items()}


def assert_feasible(
    tasks: Sequence[WorkloadTask], optimum: Optimum, capacity: Mapping[str, int]
) -> None:
    """Checked in float terms, the way the simulator runs: finish = start + duration."""
    records = optimum.records
    assert list(records) == [t.id for t in tasks]
    by_id = {t.id: t for t in tasks}
    for task in tasks:
        record = records[task.id]
        assert record.start is not None and record.finish is not None
        assert record.finish == record.start + task.duration
        assert record.start >= task.release_at, f"{task.id} starts before its release"
        for dep in task.depends_on:
            parent = records[dep].finish
            assert parent is not None and record.start >= parent, f"{task.id} before {dep}"
    for pool, cap in capacity.items():
        held = [(records[t.id], t.resources[pool]) for t in tasks if pool in t.resources]
        for record, _ in held:
            at = record.start
            assert at is not None
            running = sum(
                units
                for other, units in held
                if other.start is not None and other.finish is not None
                if other.start <= at < other.finish
            )
            assert running <= cap, f"{pool} holds {running} > {cap} at {at}"
    assert set(by_id) == set(records)


def metric(
    tasks: Sequence[WorkloadTask], records: SimResult, capacity: Mapping[str, int], objective: str
) -> float:
    return float(compute_metrics(tasks, records, capacity)[METRIC[objective]])


def as_result(optimum: Optimum) -> SimResult:
    return SimResult(policy="optimum", records=optimum.records, planning_calls=0, decide_cpu_s=0.0)


# --- known optima ----------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["missed", "weighted_tardiness"])
def test_edf_order_is_the_only_one_on_time(objective: str) -> None:
    tasks = [wt("a", 10, due=100), wt("b", 10, due=10)]
    optimum = offline_optimum(tasks, {"p": 1}, objective, time_limit_s=5)
    assert starts(optimum) == {"a": 10.0, "b": 0.0}
    assert optimum.objective_value == 0.0
    assert optimum.optimal and optimum.bound == 0.0
    assert optimum.resolution_s == 1.0  # whole seconds suffice
    assert_feasible(tasks, optimum, {"p": 1})


def test_a_hopeless_task_goes_last() -> None:
    # h cannot make its deadline in any schedule; putting it first would make a and b late too.
    tasks = [wt("h", 10, due=5), wt("a", 10, due=15), wt("b", 10, due=25)]
    optimum = offline_optimum(tasks, {"p": 1}, "missed", time_limit_s=5)
    assert starts(optimum) == {"h": 20.0, "a": 0.0, "b": 10.0}
    assert (optimum.objective_value, optimum.bound, optimum.optimal) == (1.0, 1.0, True)


def test_multi_unit_tasks_share_a_pool() -> None:
    # big needs the whole pool and is due first; the two halves run together after it.
    tasks = [
        wt("s1", 10, units=2, due=20),
        wt("s2", 10, units=2, due=20),
        wt("big", 10, units=4, due=10),
    ]
    optimum = offline_optimum(tasks, {"p": 4}, "missed", time_limit_s=5)
    assert starts(optimum) == {"s1": 10.0, "s2": 10.0, "big": 0.0}
    assert optimum.objective_value == 0.0 and optimum.optimal
    fifo = simulate(tasks, {"p": 4}, get_scorer("fifo"))
    assert metric(tasks, fifo, {"p": 4}, "missed") == 1.0
    assert_feasible(tasks, optimum, {"p": 4})


def test_slowdown_runs_the_halves_first() -> None:
    # Both halves first: slowdowns 1, 1, 2; big first: 1, 2, 2.
    tasks = [wt("big", 10, units=4), wt("s1", 10, units=2), wt("s2", 10, units=2)]
    optimum = offline_optimum(tasks, {"p": 4}, "slowdown", time_limit_s=5)
    assert starts(optimum) == {"big": 10.0, "s1": 0.0, "s2": 0.0}
    assert optimum.objective_value == pytest.approx(4 / 3)
    assert optimum.optimal
    assert optimum.bound <= optimum.objective_value
    assert optimum.bound == pytest.approx(4 / 3, rel=1e-3)


def test_short_tasks_count_as_ten_seconds_in_the_slowdown() -> None:
    # a and b (1 s) as 10 s: a then b gives 1, max(1, 2/10) = 1, (12 - 0)/10 = 1.2.
    tasks = [wt("a", 1), wt("b", 1), wt("c", 10)]
    optimum = offline_optimum(tasks, {"p": 1}, "slowdown", time_limit_s=5)
    assert optimum.objective_value == pytest.approx((1 + 1 + 1.2) / 3)
    assert starts(optimum)["c"] == 2.0
    assert optimum.optimal


def test_dependencies_and_the_tie_break() -> None:
    # x alone on time, or c (after p) alone on time: one miss either way. The tie-break picks
    # the smaller weighted tardiness: x late by 20 (weight 1) beats c late by 10 (weight 3).
    tasks = [
        wt("x", 10, due=10),
        wt("p", 10),
        wt("c", 10, due=20, weight=3, deps=("p",)),
    ]
    for objective, value in [("missed", 1.0), ("weighted_tardiness", 20.0)]:
        optimum = offline_optimum(tasks, {"p": 1}, objective, time_limit_s=5)
        assert starts(optimum) == {"x": 20.0, "p": 0.0, "c": 10.0}
        assert optimum.objective_value == value and optimum.optimal
        assert_feasible(tasks, optimum, {"p": 1})


def test_releases_and_unbounded_pools() -> None:
    tasks = [
        wt("late", 5, release=30, due=40),
        wt("free", 3, pool=None, release=2, deps=("late",)),
        wt("wide", 50, pool="cloud", due=50),
        wt("early", 30, due=30),
    ]
    optimum = offline_optimum(tasks, {"p": 1}, "weighted_tardiness", time_limit_s=5)
    assert starts(optimum) == {"late": 30.0, "free": 35.0, "wide": 0.0, "early": 0.0}
    assert optimum.objective_value == 0.0
    assert_feasible(tasks, optimum, {"p": 1})


def test_times_off_every_grid_stay_feasible_in_floats() -> None:
    third = 1 / 3
    tasks = [
        wt(f"t{i}", third * (i + 1), release=0.1 * i, due=1.7 + 0.01 * i, units=1 + i % 2)
        for i in range(8)
    ]
    optimum = offline_optimum(tasks, {"p": 2}, "missed", time_limit_s=5)
    assert optimum.resolution_s == 0.001
    assert_feasible(tasks, optimum, {"p": 2})
    assert optimum.objective_value == metric(tasks, as_result(optimum), {"p": 2}, "missed")


def test_input_errors() -> None:
    too_many = [wt(f"t{i}", 1) for i in range(MAX_TASKS + 1)]
    with pytest.raises(InvalidInput, match=f"at most {MAX_TASKS} tasks"):
        offline_optimum(too_many, {"p": 1}, "missed")
    with pytest.raises(InvalidInput, match="needs 3 units of p, which has 2"):
        offline_optimum([wt("a", 1, units=3)], {"p": 2}, "missed")
    with pytest.raises(InvalidInput, match="no objective"):
        offline_optimum([wt("a", 1)], {"p": 1}, "makespan")
    with pytest.raises(InvalidInput, match="unknown task 'b'"):
        offline_optimum([wt("a", 1, deps=("b",))], {"p": 1}, "missed")
    with pytest.raises(InvalidInput, match="cycle"):
        offline_optimum([wt("a", 1, deps=("b",)), wt("b", 1, deps=("a",))], {"p": 1}, "missed")
    with pytest.raises(InvalidInput, match="unique"):
        offline_optimum([wt("a", 1), wt("a", 2)], {"p": 1}, "missed")


def test_exactly_max_tasks_is_accepted() -> None:
    tasks = [wt(f"t{i}", 1 + i % 3, due=200) for i in range(MAX_TASKS)]
    optimum = offline_optimum(tasks, {"p": 2}, "missed", time_limit_s=5)
    assert optimum.objective_value == 0.0 and optimum.optimal
    assert_feasible(tasks, optimum, {"p": 2})


def test_no_tasks() -> None:
    optimum = offline_optimum([], {"p": 1}, "slowdown")
    assert optimum.records == {} and optimum.optimal


# --- the scenarios ---------------------------------------------------------------------------


def scenario(name: str, seed: int) -> tuple[list[WorkloadTask], dict[str, int]]:
    # batch sizes its cluster for long traces; a small one cannot hold its 8-unit jobs.
    capacity = {"cluster": 8} if name == "batch" else None
    return generate(name, tasks=30, seed=seed, capacity=capacity)


CASES = [
    (name, seed, objective)
    for name in ("logistics", "incidents", "campaigns", "batch")
    for seed, objective in [(1, "missed"), (2, "weighted_tardiness"), (3, "slowdown")]
]


@pytest.mark.parametrize(("name", "seed", "objective"), CASES)
def test_never_worse_than_fifo_or_edf(name: str, seed: int, objective: str) -> None:
    tasks, capacity = scenario(name, seed)
    optimum = offline_optimum(tasks, capacity, objective, time_limit_s=2)
    assert_feasible(tasks, optimum, capacity)
    mine = metric(tasks, as_result(optimum), capacity, objective)
    assert mine == pytest.approx(optimum.objective_value, abs=ROUNDING[objective])
    assert optimum.bound <= optimum.objective_value + 1e-9
    if optimum.optimal:
        assert optimum.objective_value <= optimum.bound * (1 + 1e-3) + 1e-9
    for policy in ("fifo", "edf"):
        result = simulate(tasks, capacity, get_scorer(policy))
        theirs = metric(tasks, result, capacity, objective)
        assert optimum.objective_value <= theirs + ROUNDING[objective], policy
