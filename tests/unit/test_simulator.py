"""The discrete-event simulator, its metrics and `tactician simulate`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tactician.cli.main import cli, main
from tactician.decide.scorers import SCORERS, Atc, ScoredTask, get_scorer
from tactician.errors import InvalidInput
from tactician.sim.metrics import compute_metrics
from tactician.sim.scenarios import generate
from tactician.sim.simulator import SimResult, TaskRecord, simulate
from tactician.sim.workload import WorkloadTask, write_workload


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


def starts(result: SimResult) -> dict[str, float | None]:
    return {task_id: r.start for task_id, r in result.records.items()}


def assert_capacity_kept(
    tasks: list[WorkloadTask], result: SimResult, capacity: dict[str, int]
) -> None:
    for pool, cap in capacity.items():
        held = [(result.records[t.id], t.resources[pool]) for t in tasks if pool in t.resources]
        for record, _ in held:
            at = record.start
            if at is None:
                continue
            running = sum(
                units
                for other, units in held
                if other.start is not None
                and other.finish is not None
                and other.start <= at < other.finish
            )
            assert running <= cap, f"{pool} holds {running} > {cap} at {at}"


def test_edf_meets_a_deadline_fifo_misses() -> None:
    tasks = [wt("a", 10, due=100), wt("b", 10, due=10)]
    fifo = simulate(tasks, {"p": 1}, get_scorer("fifo"))
    edf = simulate(tasks, {"p": 1}, get_scorer("edf"))
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
    result = simulate(tasks, {"p": 1}, get_scorer("wspt"))
    finish = {task_id: r.finish for task_id, r in result.records.items()}
    got = sum(t.weight * (finish[t.id] or 0.0) for t in tasks)

    def weighted_completion(order: tuple[WorkloadTask, ...]) -> float:
        clock = total = 0.0
        for t in order:
            clock += t.duration
            total += t.weight * clock
        return total

    assert got == min(weighted_completion(p) for p in itertools.permutations(tasks))
    assert [t for t, _ in sorted(starts(result).items(), key=lambda kv: kv[1] or 0)] == [
        "c",
        "b",
        "d",
        "a",
    ]


@pytest.mark.parametrize("policy", sorted(SCORERS))
def test_capacity_dependencies_and_releases_hold(policy: str) -> None:
    tasks, capacity = generate("batch", tasks=300, seed=1)
    result = simulate(tasks, capacity, get_scorer(policy))
    assert all(r.finish is not None for r in result.records.values())
    assert_capacity_kept(tasks, result, capacity)
    for t in tasks:
        record = result.records[t.id]
        assert record.start is not None and record.start >= t.release_at
        for dep in t.depends_on:
            parent = result.records[dep].finish
            assert parent is not None and record.start >= parent
    assert any(t.depends_on for t in tasks)


def test_small_tasks_pass_a_large_one_without_exceeding_the_pool() -> None:
    tasks = [
        wt("long", 10, units=2),
        wt("big", 5, units=4),
        wt("small", 3, units=1),
        wt("tiny", 1, units=1, submit=1),
    ]
    result = simulate(tasks, {"p": 4}, get_scorer("fifo"))
    assert starts(result) == {"long": 0.0, "small": 0.0, "tiny": 1.0, "big": 10.0}
    assert_capacity_kept(tasks, result, {"p": 4})


def test_releases_dependencies_and_unbounded_pools() -> None:
    tasks = [
        wt("parent", 5, pool="free"),
        wt("child", 1, pool="free", deps=("parent",)),
        wt("later", 1, release=7.5),
        wt("x", 1, pool="free"),
    ]
    result = simulate(tasks, {"p": 1}, get_scorer("edf"))
    assert starts(result) == {"parent": 0.0, "child": 5.0, "later": 7.5, "x": 0.0}


def test_a_task_too_big_for_its_pool_never_runs() -> None:
    tasks = [wt("huge", 1, units=3), wt("ok", 1)]
    result = simulate(tasks, {"p": 2}, get_scorer("fifo"))
    assert result.records["huge"] == TaskRecord("huge", None, None)
    metrics = compute_metrics(tasks, result, {"p": 2})
    assert (metrics["tasks"], metrics["completed"]) == (2, 1)


def test_a_task_in_two_pools_is_refused() -> None:
    task = dataclasses.replace(wt("a", 1), resources={"p": 1, "q": 1})
    with pytest.raises(InvalidInput, match="task a: holds 2 pools"):
        simulate([task], {}, get_scorer("fifo"))


@pytest.mark.parametrize("policy", sorted(SCORERS))
def test_same_input_same_records(policy: str) -> None:
    tasks, capacity = generate("logistics", tasks=400, seed=2)
    one = simulate(tasks, capacity, get_scorer(policy))
    two = simulate(tasks, capacity, get_scorer(policy))
    assert one.records == two.records
    assert_capacity_kept(tasks, one, capacity)


@pytest.mark.parametrize("policy", sorted(SCORERS))
def test_a_true_duration_does_not_leak_into_earlier_decisions(policy: str) -> None:
    tasks, capacity = generate("logistics", tasks=400, seed=3)
    before = simulate(tasks, capacity, get_scorer(policy))
    started = sorted((r.start or 0.0, r.id) for r in before.records.values())
    at, victim = started[len(started) // 2]
    changed = [
        dataclasses.replace(t, duration=t.duration * 7 + 1) if t.id == victim else t for t in tasks
    ]
    after = simulate(changed, capacity, get_scorer(policy))
    early = {task_id for task_id, r in before.records.items() if (r.start or 0.0) <= at}
    assert {i: before.records[i].start for i in early} == {i: after.records[i].start for i in early}
    assert after.records[victim].finish != before.records[victim].finish


def test_metrics_by_hand() -> None:
    tasks = [
        wt("a", 4, due=5, weight=2),  # starts 0, finishes 4: on time
        wt("b", 20, due=10, weight=3),  # starts 4, finishes 24: 14 late
        wt("c", 2, release=1),  # starts 24, finishes 26: waited 23
    ]
    result = simulate(tasks, {"p": 1}, get_scorer("fifo"))
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


# --- the command -------------------------------------------------------------------------------


def test_cli_simulate_json_on_a_scenario() -> None:
    result = CliRunner().invoke(
        cli,
        [
            *("simulate", "--scenario", "logistics", "--tasks", "200", "--seed", "1"),
            *("--policy", "fifo,edf,wspt,atc", "--json"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data["policies"]) == {"fifo", "edf", "wspt", "atc"}
    for figures in data["policies"].values():
        assert figures["tasks"] == figures["completed"] == 200
        assert 0 <= figures["missed_pct"] <= 100
        assert set(figures["utilization"]) == {"drivers"}
    assert data["workload"]["count"] == 200
    assert data["workload"]["capacity"] == generate("logistics", tasks=200, seed=1)[1]


def test_cli_simulate_a_workload_file_as_a_table(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    write_workload(path, [wt("a", 10, due=100), wt("b", 10, due=10)])
    result = CliRunner().invoke(
        cli, ["simulate", "--workload", str(path), "--capacity", "p=1", "--policy", "fifo,edf"]
    )
    assert result.exit_code == 0, result.output
    assert "fifo" in result.output and "edf" in result.output


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
            "no policy 'lifo'; choose from fifo, edf, wspt, atc",
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
    ],
)
def test_cli_simulate_bad_input_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    assert run_main(monkeypatch, "simulate", *args) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


class _AtcWithoutFloor:
    """ATC as a plain time-dependent scorer: the simulator must rank every ready task."""

    name = "atc-scan"
    time_dependent = True

    def __init__(self, p_bar: float) -> None:
        self._atc = Atc(p_bar=p_bar)

    def rank(self, task: ScoredTask, now: float) -> float:
        return self._atc.rank(task, now)


@pytest.mark.parametrize("scenario", ["logistics", "batch"])
def test_lazy_ranking_by_floor_matches_ranking_everything(scenario: str) -> None:
    # With p̄ fixed (every task has an estimate) both rank the same pure function.
    tasks, capacity = generate(scenario, tasks=400, seed=4)
    assert all(t.estimate is not None for t in tasks)
    lazy = simulate(tasks, capacity, Atc(p_bar=900.0))
    scan = simulate(tasks, capacity, _AtcWithoutFloor(p_bar=900.0))
    assert lazy.records == scan.records


def test_the_candidate_cap_still_starts_everything_in_an_unbounded_pool() -> None:
    tasks = [wt(f"t{i}", 1.0, pool="free") for i in range(30)]
    for policy in ("fifo", "atc"):
        result = simulate(tasks, {}, get_scorer(policy), max_candidates=7)
        assert all(r.start == 0.0 for r in result.records.values())
