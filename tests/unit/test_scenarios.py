"""Built-in scenarios: seeded, valid, loaded as asked, realistic, and never leaking run time."""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tactician.cli.main import cli, main
from tactician.errors import InvalidInput
from tactician.sim.scenarios import _WALLTIMES, SCENARIOS, build, generate
from tactician.sim.workload import WorkloadTask, read_workload, summarize, write_workload

NAMES = sorted(SCENARIOS)
POOL = {"logistics": "drivers", "incidents": "oncall", "campaigns": "api", "batch": "cluster"}


def numeric_features(tasks: list[WorkloadTask]) -> dict[str, list[float]]:
    names = {
        name
        for name, value in tasks[0].features.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    return {name: [float(t.features[name]) for t in tasks] for name in names}


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_tasks_other_seed_other_tasks(name: str) -> None:
    first, capacity = generate(name, tasks=300, seed=7)
    again, capacity_again = generate(name, tasks=300, seed=7)
    other, _ = generate(name, tasks=300, seed=8)
    assert first == again and capacity == capacity_again
    assert first != other
    assert [t.duration for t in first] != [t.duration for t in other]


@pytest.mark.parametrize("name", NAMES)
def test_tasks_are_valid_and_round_trip(name: str, tmp_path: Path) -> None:
    tasks, capacity = generate(name, tasks=1000, seed=1)
    assert len(tasks) == 1000
    assert len({t.id for t in tasks}) == 1000
    assert [t.submit_at for t in tasks] == sorted(t.submit_at for t in tasks)
    assert set(capacity) == {POOL[name]}
    assert all(set(t.resources) == {POOL[name]} for t in tasks)
    path = tmp_path / f"{name}.jsonl"
    write_workload(path, tasks)
    assert read_workload(path) == tasks


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("load", [0.6, 1.2, 2.5])
def test_load_is_demanded_work_over_capacity_across_the_span(name: str, load: float) -> None:
    tasks, capacity = generate(name, tasks=1500, seed=3, load=load)
    measured = summarize(tasks, capacity)["load"][POOL[name]]
    assert measured == pytest.approx(load, rel=0.15)


@pytest.mark.parametrize("name", NAMES)
def test_a_given_capacity_is_used_and_arrivals_stretch_to_it(name: str) -> None:
    pool = POOL[name]
    small, _ = generate(name, tasks=800, seed=2, capacity={pool: 8})
    big, capacity = generate(name, tasks=800, seed=2, capacity={pool: 80})
    assert capacity == {pool: 80}
    assert summarize(big, capacity)["load"][pool] == pytest.approx(1.2, rel=0.15)
    assert summarize(big)["span"] < summarize(small)["span"] / 5


def test_bad_arguments_are_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="no scenario 'nope'; choose one of"):
        generate("nope", tasks=10, seed=1)
    with pytest.raises(InvalidInput, match="needs pool 'drivers'"):
        generate("logistics", tasks=10, seed=1, capacity={"cpu": 3})
    with pytest.raises(InvalidInput, match="tasks must be at least 1"):
        generate("batch", tasks=0, seed=1)
    with pytest.raises(InvalidInput, match="load must be a positive number"):
        generate("batch", tasks=5, seed=1, load=0)


@pytest.mark.parametrize("name", NAMES)
def test_features_do_not_reveal_the_duration(name: str) -> None:
    tasks, _ = generate(name, tasks=2000, seed=5)
    durations = [t.duration for t in tasks]
    revealing = sum(1 for t in tasks if t.duration in t.features.values())
    assert revealing < len(tasks) * 0.01
    for feature, values in numeric_features(tasks).items():
        if len(set(values)) > 1:
            assert abs(statistics.correlation(values, durations)) < 0.98, feature


def test_logistics_distance_predicts_the_run_time() -> None:
    tasks, _ = generate("logistics", tasks=2000, seed=5)
    distance = numeric_features(tasks)["distance_km"]
    assert statistics.correlation(distance, [t.duration for t in tasks]) > 0.3
    assert all(t.release_at <= t.due_at for t in tasks if t.due_at is not None)
    assert all(t.due_at is not None for t in tasks)


def test_logistics_storm_slows_one_zone_for_one_hour() -> None:
    scenario = build("logistics", tasks=4000, seed=11)
    [storm] = scenario.events
    assert storm["end"] - storm["start"] == pytest.approx(3600.0)

    def slowness(zone_in_storm: bool, during: bool) -> float:
        ratios = [
            t.duration / t.estimate
            for t in scenario.tasks
            if t.estimate
            and (t.features["zone"] == storm["zone"]) == zone_in_storm
            and (storm["start"] <= t.release_at < storm["end"]) == during
        ]
        assert len(ratios) > 20
        return statistics.mean(ratios)

    calm = slowness(True, during=False)
    assert slowness(True, during=True) > 1.4 * calm
    assert slowness(False, during=True) == pytest.approx(calm, rel=0.2)


def test_incidents_come_in_storms_of_duplicates_with_deadlines_by_severity() -> None:
    tasks, _ = generate("incidents", tasks=2000, seed=4)
    per_fingerprint = statistics.mean(Counter(t.features["fingerprint"] for t in tasks).values())
    assert per_fingerprint > 2
    deadline = {1: 3600.0, 2: 7200.0, 3: 4 * 3600.0, 4: 24 * 3600.0}
    for t in tasks:
        assert t.due_at is not None
        severity = int(t.features["severity"])
        assert t.due_at - t.submit_at == pytest.approx(deadline[severity], abs=0.01)
    assert 0 < sum(t.sensitive for t in tasks) < len(tasks) / 2
    # The alerting system says how many alerts of the fingerprint came before: duplicates know.
    first = [t for t in tasks if t.features["repeat"] == 0]
    again = [t for t in tasks if int(t.features["repeat"]) > 0]
    assert len(first) == len({t.features["fingerprint"] for t in tasks})
    assert statistics.median(t.duration for t in again) < statistics.median(
        t.duration for t in first
    )


def test_incidents_on_call_works_in_shifts() -> None:
    scenario = build("incidents", tasks=2000, seed=4)
    shifts = scenario.calendar["oncall"]
    by_hour = {at % 86400 / 3600: cap for at, cap in shifts[:-1]}
    assert by_hour[8.0] > by_hour[0.0] == by_hour[20.0]  # more engineers by day than by night
    span = max(t.submit_at for t in scenario.tasks)
    assert shifts[-1][0] > span  # the calendar outlasts the arrivals
    assert shifts[-1][1] == by_hour[8.0]  # and ends on a day shift, so the backlog drains


def test_campaign_messages_wait_for_the_customers_window() -> None:
    tasks, _ = generate("campaigns", tasks=1000, seed=4)
    assert all(t.submit_at <= t.release_at < t.due_at for t in tasks if t.due_at is not None)
    assert len({t.submit_at for t in tasks}) <= 6  # messages are queued at campaign launches
    assert {t.kind for t in tasks} <= {"send_email", "send_sms", "send_push", "send_whatsapp"}


def test_batch_users_over_estimate_and_deadlines_are_few_and_loose() -> None:
    tasks, _ = generate("batch", tasks=2000, seed=9)
    ratios = [t.estimate / t.duration for t in tasks if t.estimate is not None]
    assert len(ratios) == len(tasks)
    assert sum(r > 1 for r in ratios) > 0.8 * len(tasks)
    assert 1.5 <= statistics.median(ratios) <= 8.0
    # Requests are the queue's standard wall times, chosen from belief, not from the job.
    assert {t.estimate for t in tasks} <= set(_WALLTIMES)
    crashed = sum(t.duration < 100 for t in tasks) / len(tasks)
    assert 0.02 < crashed < 0.3  # some jobs die in their first minute
    assert all(1 <= t.resources["cluster"] <= 8 for t in tasks)
    with_deadline = [t for t in tasks if t.due_at is not None]
    assert len(with_deadline) < 0.4 * len(tasks)
    assert all(t.due_at - t.release_at >= 4 * 3600 - 0.01 for t in with_deadline if t.due_at)
    assert any(t.depends_on for t in tasks)


def test_batch_truth_holds_each_jobs_run_time_distribution() -> None:
    scenario = build("batch", tasks=2000, seed=9)
    assert set(scenario.truth) == {t.id for t in scenario.tasks}
    crashed = kept = 0
    for task in scenario.tasks:
        truth = scenario.truth[task.id]
        rate, uncrashed = truth["crash_rate"], truth["uncrashed_s"]
        assert rate in (0.02, 0.05, 0.1, 0.3)
        if task.duration == pytest.approx(uncrashed, abs=1e-3):
            kept += 1
        else:  # it crashed: its run is drawn between 10 and 90 s instead
            crashed += 1
            assert 10.0 <= task.duration <= 90.0
        # The mixture's moments: a crash's mean run is 50 s, its mean inverse ln(9) / 80.
        assert truth["mean_run_s"] == pytest.approx(rate * 50 + (1 - rate) * uncrashed)
        assert truth["mean_inverse_run"] == pytest.approx(
            rate * math.log(9) / 80 + (1 - rate) / uncrashed
        )
    assert 0.02 * len(scenario.tasks) < crashed < 0.3 * len(scenario.tasks) < kept
    assert min(t["uncrashed_s"] for t in scenario.truth.values()) >= 10.0  # E[1/max(run, 10)]
    assert all(
        not build(name, tasks=50, seed=1, load=1.0).truth for name in SCENARIOS if name != "batch"
    )


# --- the command -------------------------------------------------------------------------------


def test_cli_generate_then_inspect(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    runner = CliRunner()
    made = runner.invoke(
        cli,
        [
            *("workload", "generate", "--scenario", "batch", "--tasks", "200", "--seed", "3"),
            *("--load", "1.5", "--out", str(path)),
        ],
    )
    assert made.exit_code == 0, made.output
    assert "wrote 200 batch tasks" in made.output
    _, capacity = generate("batch", tasks=200, seed=3, load=1.5)
    assert f"--capacity cluster={capacity['cluster']}" in made.output
    assert len(read_workload(path)) == 200

    shown = runner.invoke(
        cli,
        [
            "workload",
            "inspect",
            str(path),
            "--capacity",
            f"cluster={capacity['cluster']}",
            "--json",
        ],
    )
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.output)
    assert summary["count"] == 200
    assert summary["load"]["cluster"] == pytest.approx(1.5, rel=0.15)


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["tactician", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return int(exited.value.code or 0)


def test_cli_inspect_of_a_bad_file_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "kind": "k", "submit_at": 0, "duration": 1}\n{"id": "b"}\n')
    assert run_main(monkeypatch, "workload", "inspect", str(path)) == 2
    assert capsys.readouterr().err == f"error: {path} line 2: kind is missing\n"


def test_cli_bad_capacity_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_main(
        monkeypatch,
        *("workload", "generate", "--scenario", "logistics", "--out", str(tmp_path / "w")),
        *("--capacity", "drivers"),
    )
    assert code == 2
    assert (
        capsys.readouterr().err
        == "error: --capacity must look like pool=N with N >= 1, got 'drivers'\n"
    )
    assert not (tmp_path / "w").exists()
