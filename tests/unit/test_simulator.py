"""The discrete-event simulator, its metrics, the policies and `tactician simulate`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tactician.cli.main import cli, main
from tactician.cli.simulate import Trace, load_trace, run_policy
from tactician.decide.decision import Reason
from tactician.decide.features import Array, ScoredTask
from tactician.decide.learned import Learned
from tactician.decide.scorers import RankRequest, Scorer, get_scorer
from tactician.decide.shares import Aging
from tactician.errors import InvalidInput
from tactician.sim.metrics import compute_metrics, slowdown_floor
from tactician.sim.policies import POLICIES, get_policy
from tactician.sim.report import MISSES_PNG, QUEUE_PNG, REPORT_MD, UTILIZATION_PNG
from tactician.sim.scenarios import build
from tactician.sim.simulator import Calendar, SimOptions, SimResult, TaskRecord, simulate
from tactician.sim.workload import WorkloadTask, write_workload

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRIC_KEYS = {
    "tasks",
    "completed",
    "missed_deadlines",
    "missed_pct",
    "weighted_tardiness",
    "mean_wait_s",
    "p95_wait_s",
    "mean_bounded_slowdown",
    "makespan_s",
    "utilization",
    "escalations",
    "decide_cpu_us",
}


def wt(
    task_id: str,
    duration: float,
    *,
    submit: float = 0.0,
    release: float | None = None,
    due: float | None = None,
    estimate: float | None = None,
    weight: float = 1.0,
    units: int = 1,
    pool: str = "p",
    deps: tuple[str, ...] = (),
) -> WorkloadTask:
    return WorkloadTask(
        id=task_id,
        kind="k",
        submit_at=submit,
        release_at=submit if release is None else release,
        duration=duration,
        due_at=due,
        estimate=estimate,
        weight=weight,
        resources={pool: units},
        depends_on=deps,
    )


def run(
    tasks: Sequence[WorkloadTask],
    capacity: Mapping[str, int],
    policy: str,
    *,
    calendar: Calendar | None = None,
    max_candidates: int | None = None,
) -> SimResult:
    """One simulation under a named policy (a fresh scorer, the policy's planner options)."""
    chosen = get_policy(policy)
    base = SimOptions() if max_candidates is None else SimOptions(max_candidates=max_candidates)
    return simulate(tasks, capacity, chosen.make(), chosen.options(base), calendar=calendar)


def starts(result: SimResult) -> dict[str, float | None]:
    return {task_id: r.start for task_id, r in result.records.items()}


def in_force(capacity: int, changes: Sequence[tuple[float, int]], at: float) -> int:
    """The capacity at `at`: the last change at or before it, else the pool's own."""
    for when, units in sorted(changes):
        if when <= at:
            capacity = units
    return capacity


def assert_capacity_kept(
    tasks: Sequence[WorkloadTask],
    result: SimResult,
    capacity: Mapping[str, int],
    calendar: Calendar | None = None,
) -> None:
    """At every instant a task starts, the units held in its pool (counting what starts then)
    are within the capacity in force. Tasks are never preempted, so a pool whose capacity
    drops may hold more than it until they finish, but nothing starts then."""
    for pool, cap in capacity.items():
        mine = [t for t in tasks if pool in t.resources]
        for at, held in held_at_starts(mine, result, pool).items():
            limit = in_force(cap, (calendar or {}).get(pool, ()), at)
            assert held <= limit, f"{pool} holds {held} > {limit} at {at}"


def held_at_starts(tasks: Sequence[WorkloadTask], result: SimResult, pool: str) -> dict[float, int]:
    """Units of `pool` held at each instant a task starts, counting what starts then."""
    records = [result.records[t.id] for t in tasks]
    start = np.array([np.nan if r.start is None else r.start for r in records])
    finish = np.array([np.inf if r.finish is None else r.finish for r in records])
    units = np.array([t.resources[pool] for t in tasks])
    return {
        float(at): int(units[(start <= at) & (finish > at)].sum())
        for at in np.unique(start[~np.isnan(start)])
    }


# --- the rules on hand-made cases --------------------------------------------------------------


def test_edf_meets_a_deadline_fifo_misses() -> None:
    tasks = [wt("a", 10, due=100), wt("b", 10, due=10)]
    fifo = run(tasks, {"p": 1}, "fifo")
    edf = run(tasks, {"p": 1}, "edf")
    assert starts(fifo) == {"a": 0.0, "b": 10.0}
    assert starts(edf) == {"a": 10.0, "b": 0.0}
    assert compute_metrics(tasks, fifo, {"p": 1})["missed_deadlines"] == 1
    assert compute_metrics(tasks, edf, {"p": 1})["missed_deadlines"] == 0


def test_wspt_minimises_weighted_completion_on_one_machine() -> None:
    tasks = [
        wt("a", 10, estimate=10, weight=1),
        wt("b", 2, estimate=2, weight=1),
        wt("c", 5, estimate=5, weight=5),
        wt("d", 8, estimate=8, weight=3),
    ]
    result = run(tasks, {"p": 1}, "wspt")
    finish = {task_id: r.finish for task_id, r in result.records.items()}
    got = sum(t.weight * (finish[t.id] or 0.0) for t in tasks)

    def weighted_completion(order: tuple[WorkloadTask, ...]) -> float:
        clock = total = 0.0
        for t in order:
            clock += t.duration
            total += t.weight * clock
        return total

    assert got == min(weighted_completion(p) for p in itertools.permutations(tasks))
    assert sorted(starts(result), key=lambda k: starts(result)[k] or 0.0) == ["c", "b", "d", "a"]


def test_ai_sets_aside_a_task_that_cannot_be_on_time() -> None:
    # Moore-Hodgson's case: starting the hopeless task first makes all three late.
    tasks = [
        wt("hopeless", 100, estimate=100, due=20),
        wt("b", 10, estimate=10, due=60),
        wt("c", 10, estimate=10, due=70),
    ]
    edf = run(tasks, {"p": 1}, "edf")
    ai = run(tasks, {"p": 1}, "ai")
    assert starts(edf) == {"hopeless": 0.0, "b": 100.0, "c": 110.0}
    assert starts(ai) == {"hopeless": 20.0, "b": 0.0, "c": 10.0}
    assert compute_metrics(tasks, edf, {"p": 1})["missed_deadlines"] == 3
    assert compute_metrics(tasks, ai, {"p": 1})["missed_deadlines"] == 1


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # Greedy: whatever fits starts, so the tiny task passes the big one.
        ("fifo", {"long": 0.0, "small": 0.0, "tiny": 1.0, "big": 10.0}),
        # EASY: the big task holds a reservation at the long one's expected end (60 s, the
        # default without an estimate); the tiny task would end after it, so it waits.
        ("easy", {"long": 0.0, "small": 0.0, "big": 10.0, "tiny": 15.0}),
    ],
)
def test_small_tasks_pass_a_large_one_only_without_delaying_a_reservation(
    policy: str, expected: dict[str, float]
) -> None:
    tasks = [
        wt("long", 10, units=2),
        wt("big", 5, units=4),
        wt("small", 3, units=1),
        wt("tiny", 1, units=1, submit=1),
    ]
    result = run(tasks, {"p": 4}, policy)
    assert starts(result) == expected
    assert_capacity_kept(tasks, result, {"p": 4})


@pytest.mark.parametrize("policy", ["fifo", "edf", "wspt", "atc", "ai"])
def test_greedy_policies_starve_a_wide_task_and_easy_does_not(policy: str) -> None:
    # One-unit tasks of 10 s arrive every 2.5 s: four always run, so four units are never
    # free at once until the stream ends, unless the wide task reserves them.
    stream = [wt(f"s{i:03d}", 10, submit=2.5 * i, estimate=10) for i in range(200)]
    wide = wt("wide", 10, submit=1.0, units=4, estimate=10)
    tasks = [*stream, wide]
    greedy = run(tasks, {"p": 4}, policy)
    easy = run(tasks, {"p": 4}, "easy")
    last_stream_start = max(greedy.records[t.id].start or 0.0 for t in stream)
    assert (greedy.records["wide"].start or 0.0) > last_stream_start
    # EASY reserves the units the first stream task frees at 10 s; nothing that would end
    # later starts before the wide task.
    assert easy.records["wide"].start == 10.0
    assert all((easy.records[t.id].start or 0.0) >= 20.0 for t in stream[1:])
    for result in (greedy, easy):
        assert all(r.finish is not None for r in result.records.values())
        assert_capacity_kept(tasks, result, {"p": 4})


@pytest.mark.parametrize("policy", ["fifo", "edf", "wspt", "atc", "ai"])
def test_aging_lets_the_wide_task_hold_the_pool_once_it_waited_max_wait(policy: str) -> None:
    stream = [wt(f"s{i:03d}", 10, submit=2.5 * i, estimate=10) for i in range(200)]
    wide = wt("wide", 10, submit=1.0, units=4, estimate=10)
    tasks = [*stream, wide]
    chosen = get_policy(policy)
    result = simulate(tasks, {"p": 4}, Aging(chosen.make(), 30.0), chosen.options())
    start = result.records["wide"].start
    assert start is not None
    # Greedy until it has waited 30 s; then no stream task starts before it, and it starts
    # as soon as the four running ones have ended (the last started within 2.5 s of 31 s).
    assert 31.0 < start <= 31.0 + 2.5 + 10
    later = [t for t in stream if t.submit_at > 31.0 + 2.5]
    assert all((result.records[t.id].start or 0.0) >= start for t in later)
    assert all(r.finish is not None for r in result.records.values())
    assert_capacity_kept(tasks, result, {"p": 4})
    # The CLI's --max-wait does the same.
    trace = Trace("stream", [], tasks, {"p": 4}, {}, [], "mean_bounded_slowdown")
    assert run_policy(policy, trace, 30.0).result.records["wide"].start == start


def test_releases_dependencies_and_unbounded_pools() -> None:
    tasks = [
        wt("parent", 5, pool="free"),
        wt("child", 1, pool="free", deps=("parent",)),
        wt("later", 1, release=7.5),
        wt("x", 1, pool="free"),
    ]
    result = run(tasks, {"p": 1}, "edf")
    assert starts(result) == {"parent": 0.0, "child": 5.0, "later": 7.5, "x": 0.0}


@pytest.mark.parametrize("policy", ["fifo", "easy"])
def test_a_task_too_big_for_its_pool_never_runs(policy: str) -> None:
    tasks = [wt("huge", 1, units=3), wt("ok", 1)]
    result = run(tasks, {"p": 2}, policy)
    assert result.records["huge"] == TaskRecord("huge", None, None)
    assert result.records["ok"] == TaskRecord("ok", 0.0, 1.0)
    metrics = compute_metrics(tasks, result, {"p": 2})
    assert (metrics["tasks"], metrics["completed"]) == (2, 1)


def test_a_task_in_two_pools_is_refused() -> None:
    task = dataclasses.replace(wt("a", 1), resources={"p": 1, "q": 1})
    with pytest.raises(InvalidInput, match="task a: holds 2 pools"):
        simulate([task], {}, get_scorer("fifo"))


def test_metrics_by_hand() -> None:
    tasks = [
        wt("a", 4, due=5, weight=2),  # starts 0, finishes 4: on time
        wt("b", 20, due=10, weight=3),  # starts 4, finishes 24: 14 late
        wt("c", 2, release=1),  # starts 24, finishes 26: waited 23
    ]
    result = run(tasks, {"p": 1}, "fifo")
    assert starts(result) == {"a": 0.0, "b": 4.0, "c": 24.0}
    m = compute_metrics(tasks, result, {"p": 1})
    assert m["tasks"] == 3 and m["completed"] == 3
    assert m["missed_deadlines"] == 1
    assert m["missed_pct"] == 50.0
    assert m["weighted_tardiness"] == 42.0
    assert m["mean_wait_s"] == pytest.approx((0 + 4 + 23) / 3, abs=1e-3)
    assert m["p95_wait_s"] == 23.0
    # a: max(1, 4/10) = 1; b: (4+20)/20 = 1.2; c: (23+2)/10 = 2.5
    assert m["mean_bounded_slowdown"] == pytest.approx((1 + 1.2 + 2.5) / 3, abs=1e-4)
    assert m["makespan_s"] == 26.0
    assert m["utilization"] == {"p": pytest.approx(26 / 26)}
    assert m["decide_cpu_us"] >= 0 and m["planning_calls"] >= 3


def test_the_slowdown_floor_counts_only_the_waits_for_parents() -> None:
    tasks = [
        wt("parent", 100, release=5),  # ends at 105 at the soonest
        wt("child", 20, release=50, deps=("parent",)),  # ready at 105: (105 - 50 + 20) / 20
        wt("grandchild", 5, release=60, deps=("child",)),  # ready at 125: (125 - 60 + 5) / 10
        wt("alone", 30, release=0),  # never waits: 1
    ]
    floor = slowdown_floor(list(reversed(tasks)))  # children listed before their parents
    assert floor == pytest.approx((1 + 75 / 20 + 70 / 10 + 1) / 4)
    # With room for all, a policy reaches it; with one unit, it is still a lower bound.
    for policy in ("fifo", "ai"):
        ample = compute_metrics(tasks, run(tasks, {"p": 4}, policy), {"p": 4})
        assert ample["mean_bounded_slowdown"] == pytest.approx(floor, abs=1e-4)
        tight = compute_metrics(tasks, run(tasks, {"p": 1}, policy), {"p": 1})
        assert tight["mean_bounded_slowdown"] > floor
    assert slowdown_floor([]) == 0.0


# --- shifts ------------------------------------------------------------------------------------


def test_a_shift_changes_the_capacity_and_running_tasks_are_not_preempted() -> None:
    tasks = [wt(name, 5) for name in "abcdefghij"]
    calendar = {"p": [(0.0, 1), (10.0, 3), (17.0, 1)]}
    for policy in ("fifo", "easy", "atc", "ai"):
        result = run(tasks, {"p": 1}, policy, calendar=calendar)
        # One at a time, three at once from 10 s; at 17 s the three started at 15 s run on,
        # and nothing starts until the pool is under its new capacity of one.
        assert starts(result) == {
            **{"a": 0.0, "b": 5.0, "c": 10.0, "d": 10.0, "e": 10.0},
            **{"f": 15.0, "g": 15.0, "h": 15.0, "i": 20.0, "j": 25.0},
        }, policy
        assert_capacity_kept(tasks, result, {"p": 1}, calendar)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_capacity_in_force_is_never_exceeded_across_shifts(policy: str) -> None:
    scenario = build("incidents", tasks=1000, seed=5, capacity={"oncall": 4})
    changes = scenario.calendar["oncall"]
    assert {units for _, units in changes} == {2, 6}  # night and day
    result = run(scenario.tasks, scenario.capacity, policy, calendar=scenario.calendar)
    assert all(r.finish is not None for r in result.records.values())
    assert_capacity_kept(scenario.tasks, result, scenario.capacity, scenario.calendar)
    # The pool's own capacity is 4: the day shift's 6 engineers were all put to work.
    assert scenario.capacity == {"oncall": 4}
    assert max(held_at_starts(scenario.tasks, result, "oncall").values()) == 6


# --- determinism and what the scheduler may see -----------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_capacity_dependencies_and_releases_hold(policy: str) -> None:
    scenario = build("batch", tasks=300, seed=1)
    tasks, capacity = scenario.tasks, scenario.capacity
    result = run(tasks, capacity, policy)
    assert all(r.finish is not None for r in result.records.values())
    assert_capacity_kept(tasks, result, capacity)
    for t in tasks:
        record = result.records[t.id]
        assert record.start is not None and record.start >= t.release_at
        for dep in t.depends_on:
            parent = result.records[dep].finish
            assert parent is not None and record.start >= parent
    assert any(t.depends_on for t in tasks)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_same_input_same_records(policy: str) -> None:
    scenario = build("logistics", tasks=400, seed=2)
    one = run(scenario.tasks, scenario.capacity, policy)
    two = run(scenario.tasks, scenario.capacity, policy)
    assert one.records == two.records
    assert_capacity_kept(scenario.tasks, one, scenario.capacity)


@pytest.mark.parametrize("scenario_name", ["logistics", "batch"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_scheduler_never_sees_a_true_duration(policy: str, scenario_name: str) -> None:
    """Change the true run time of every task not finished by T: until the first of them
    finishes, the scheduler has seen nothing different, so every start before then is the
    same. (A start at that very instant may differ: in the first run, a unit was freed then.)
    """
    assert "duration" not in {f.name for f in dataclasses.fields(ScoredTask)}
    scenario = build(scenario_name, tasks=500, seed=3, load=1.3)
    tasks, capacity = scenario.tasks, scenario.capacity
    chosen = get_policy(policy)
    scorer = chosen.make()
    before = simulate(tasks, capacity, scorer, chosen.options())
    finishes = sorted(r.finish or 0.0 for r in before.records.values())
    at = finishes[299]
    changed = {task_id for task_id, r in before.records.items() if (r.finish or 0.0) > at}
    first_changed_finish = min(before.records[task_id].finish or 0.0 for task_id in changed)
    after = simulate(
        [dataclasses.replace(t, duration=3 * t.duration) if t.id in changed else t for t in tasks],
        capacity,
        chosen.make(),
        chosen.options(),
    )
    early = {
        task_id for task_id, r in before.records.items() if (r.start or 0.0) < first_changed_finish
    }
    assert {i: before.records[i].start for i in early} == {i: after.records[i].start for i in early}
    # The case is not trivial: many decisions came before, the pool was contended (later
    # starts do differ), and a learner had refitted its models on outcomes by then.
    assert len(early) >= 300 and 150 <= len(changed) <= 200
    assert sum(before.records[i].start != after.records[i].start for i in before.records) > 50
    if isinstance(scorer, Learned):
        assert finishes[199] < first_changed_finish and scorer.fits


class _Scanned:
    """A static scorer that says it is time-dependent: the simulator ranks all ready tasks
    at every instant instead of keeping them in heaps."""

    time_dependent = True

    def __init__(self, inner: Scorer) -> None:
        self.inner = inner
        self.name = f"{inner.name}-scan"

    def rank(self, request: RankRequest) -> Array:
        return self.inner.rank(request)

    def explain(self, request: RankRequest) -> list[Reason]:
        return self.inner.explain(request)


@pytest.mark.parametrize("scenario_name", ["logistics", "batch"])
@pytest.mark.parametrize("policy", ["fifo", "edf", "wspt"])
def test_heaps_start_the_same_tasks_as_ranking_everything(policy: str, scenario_name: str) -> None:
    scenario = build(scenario_name, tasks=400, seed=4)
    heaps = simulate(scenario.tasks, scenario.capacity, get_scorer(policy))
    scan = simulate(scenario.tasks, scenario.capacity, _Scanned(get_scorer(policy)))
    assert heaps.records == scan.records


@pytest.mark.parametrize("policy", ["fifo", "edf", "wspt", "atc", "easy", "ai"])
def test_the_candidate_cap_still_starts_everything_in_an_unbounded_pool(policy: str) -> None:
    tasks = [wt(f"t{i:02d}", 1.0, pool="free") for i in range(30)]
    result = run(tasks, {}, policy, max_candidates=7)
    assert all(r.start == 0.0 for r in result.records.values())


# --- a training prefix -------------------------------------------------------------------------


def test_a_training_prefix_is_history_and_is_not_measured() -> None:
    trace = load_trace(
        workload=None,
        scenario="logistics",
        tasks=300,
        seed=6,
        load=None,
        capacity=None,
        train_fraction=0.5,
    )
    assert (len(trace.history), len(trace.tasks)) == (150, 150)
    assert max(t.submit_at for t in trace.history) <= min(t.submit_at for t in trace.tasks)
    ai = run_policy("ai", trace)
    assert ai.metrics["tasks"] == ai.metrics["completed"] == 150
    assert set(ai.result.records) == {t.id for t in trace.tasks}
    fifo = run_policy("fifo", trace)
    assert fifo.metrics["tasks"] == 150 and fifo.metrics["escalations"] == 0
    # The learner was fitted on the history: 150 outcomes of the run alone are fewer than it
    # waits for before its first fit, as a learner without history shows.
    fresh = run_policy("ai", dataclasses.replace(trace, history=[]))
    assert isinstance(ai.scorer, Learned) and isinstance(fresh.scorer, Learned)
    assert ai.scorer.fits and not fresh.scorer.fits


# --- the command -------------------------------------------------------------------------------


def invoke(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(cli, ["simulate", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout.count("\n") == 1  # one JSON object, one line
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_cli_simulate_json_for_every_policy() -> None:
    data = invoke("--scenario", "logistics", "--tasks", "300", "--seed", "1", "--json")
    policies = data["policies"]
    assert isinstance(policies, dict) and set(policies) == set(POLICIES)
    for figures in policies.values():
        assert set(figures) >= METRIC_KEYS
        assert figures["tasks"] == figures["completed"] == 300
        assert 0 <= figures["missed_pct"] <= 100
        assert figures["escalations"] == 0
        assert set(figures["utilization"]) == {"drivers"}
    workload = data["workload"]
    assert isinstance(workload, dict)
    assert workload["count"] == 300 and workload["history_tasks"] == 0
    assert workload["capacity"] == build("logistics", tasks=300, seed=1).capacity
    assert data.keys() == {"policies", "workload"}


def test_cli_simulate_measures_only_after_the_training_prefix() -> None:
    data = invoke(
        *("--scenario", "incidents", "--tasks", "400", "--policy", "edf,ai"),
        *("--train-fraction", "0.25", "--json"),
    )
    policies = data["policies"]
    assert isinstance(policies, dict) and set(policies) == {"edf", "ai"}
    assert all(figures["tasks"] == 300 for figures in policies.values())
    workload = data["workload"]
    assert isinstance(workload, dict)
    assert workload["count"] == 300 and workload["history_tasks"] == 100
    assert workload["shifts"]["oncall"]  # the scenario's calendar was used


def test_cli_simulate_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(
        cli,
        [
            *("simulate", "--scenario", "batch", "--tasks", "300", "--seed", "2"),
            *("--policy", "fifo,easy,ai", "--report", str(out)),
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"report: {out / REPORT_MD}" in result.stdout
    for name in (MISSES_PNG, QUEUE_PNG, UTILIZATION_PNG):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE), name
    text = (out / REPORT_MD).read_text(encoding="utf-8")
    assert text.startswith("# Simulation of the batch scenario (300 tasks, seed 2")
    assert "Headline: `mean_bounded_slowdown`" in text
    assert all(f"| {name} |" in text or f"| **{name}** |" in text for name in ("fifo", "easy"))


def test_cli_simulate_a_workload_file(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    write_workload(path, [wt("a", 10, due=100), wt("b", 10, due=10)])
    args = ["simulate", "--workload", str(path), "--capacity", "p=1", "--policy", "fifo,edf"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "fifo" in result.stdout and "edf" in result.stdout
    data = invoke(*args[1:], "--json")
    policies = data["policies"]
    assert isinstance(policies, dict)
    assert [policies[name]["missed_deadlines"] for name in ("fifo", "edf")] == [1, 0]
    # Without deadlines the report leads with slowdown; with them, with missed deadlines.
    write_workload(tmp_path / "free.jsonl", [wt("a", 10), wt("b", 1)])
    for file, headline in (
        ("w.jsonl", "missed_deadlines"),
        ("free.jsonl", "mean_bounded_slowdown"),
    ):
        out = tmp_path / f"report-{file}"
        report = ["--workload", str(tmp_path / file), "--capacity", "p=1", "--report", str(out)]
        assert CliRunner().invoke(cli, ["simulate", *report, "--json"]).exit_code == 0
        assert f"Headline: `{headline}`" in (out / REPORT_MD).read_text(encoding="utf-8")


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["tactician", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return int(exited.value.code or 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--scenario", "logistics", "--policy", "fifo,lifo"),
            "no policy 'lifo'; choose from fifo, edf, wspt, atc, easy, ai",
        ),
        (
            ("--scenario", "logistics", "--policy", " , "),
            "--policy names no policy; choose from fifo, edf, wspt, atc, easy, ai",
        ),
        (
            ("--scenario", "logistics", "--train-fraction", "1"),
            "--train-fraction must be in [0, 1), got 1.0",
        ),
        (
            ("--scenario", "logistics", "--train-fraction", "-0.5"),
            "--train-fraction must be in [0, 1), got -0.5",
        ),
        (
            ("--scenario", "logistics", "--train-fraction", "half"),
            "Invalid value for '--train-fraction': ",
        ),
        (
            ("--scenario", "logistics", "--capacity", "drivers=x"),
            "--capacity must look like pool=N with N >= 1, got 'drivers=x'",
        ),
        (
            ("--scenario", "logistics", "--workload", "w.jsonl"),
            "give exactly one of --workload and --scenario",
        ),
        ((), "give exactly one of --workload and --scenario"),
        (
            ("--scenario", "nope"),
            "no scenario 'nope'; choose one of logistics, incidents, campaigns, batch",
        ),
        (("--workload", "w.jsonl", "--tasks", "5"), "--tasks and --load apply to --scenario only"),
        (("--workload", "missing.jsonl"), "missing.jsonl: cannot read: No such file or directory"),
        (("--scenario", "logistics", "--report", "a-file"), "--report a-file: not a directory"),
    ],
)
def test_cli_simulate_bad_input_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: tuple[str, ...],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    assert run_main(monkeypatch, "simulate", *args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.endswith("\n") and captured.err.count("\n") == 1
    if message.endswith(": "):  # Typer's own words follow
        assert captured.err.startswith(f"error: {message}")
    else:
        assert captured.err == f"error: {message}\n"
