"""`tactician.sim.report`: the time series behind the plots and the written report."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from tactician.decide.scorers import get_scorer
from tactician.errors import InvalidInput
from tactician.sim.metrics import compute_metrics
from tactician.sim.report import (
    MISSES_PNG,
    QUEUE_PNG,
    UTILIZATION_PNG,
    busy_units,
    compute_series,
    cumulative_misses,
    queue_depth,
    write_report,
)
from tactician.sim.scenarios import build
from tactician.sim.simulator import SimResult, TaskRecord, simulate
from tactician.sim.workload import WorkloadTask, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INF = math.inf


def wt(task_id: str, release: float, due: float | None, units: int = 1) -> WorkloadTask:
    return WorkloadTask(
        id=task_id,
        kind="k",
        submit_at=0.0,
        release_at=release,
        due_at=due,
        duration=1.0,
        resources={"p": units},
    )


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """The metrics table of report.md: policy → header → cell, bold marks removed."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(headers, cells, strict=True))
    return rows


# --- the series on a hand-made example ------------------------------------------------------
#
#   a  released 0, due 10, runs 0-5        on time
#   b  released 2, due 6,  runs 5-9        missed at 6
#   c  released 4, due 8,  never starts    missed at 8, waits until the end

RELEASE = np.array([0.0, 2.0, 4.0])
DUE = np.array([10.0, 6.0, 8.0])
START = np.array([0.0, 5.0, INF])
FINISH = np.array([5.0, 9.0, INF])


def test_cumulative_misses_count_each_miss_at_its_due_time() -> None:
    at = np.array([0.0, 5.9, 6.0, 7.9, 8.0, 100.0])
    assert cumulative_misses(DUE, FINISH, at).tolist() == [0, 0, 1, 1, 2, 2]


def test_finishing_exactly_on_time_or_without_a_deadline_is_no_miss() -> None:
    due = np.array([5.0, math.nan, math.nan])
    finish = np.array([5.0, 9.0, INF])
    assert cumulative_misses(due, finish, np.array([0.0, 5.0, 100.0])).tolist() == [0, 0, 0]


def test_queue_depth_counts_released_tasks_not_yet_started() -> None:
    at = np.array([0.0, 1.0, 2.0, 4.0, 4.99, 5.0, 100.0])
    # a starts the instant it is released; c never starts, so it stays queued to the end.
    assert queue_depth(RELEASE, START, at).tolist() == [0, 0, 1, 2, 2, 1, 1]


def test_busy_units_are_exact_means_per_bin() -> None:
    edges = np.array([0.0, 5.0, 10.0])
    units = np.array([1.0, 1.0, 1.0])
    assert busy_units(START, FINISH, units, edges).tolist() == pytest.approx([1.0, 0.8])
    # Two units from 2.5 and never finished: held to the end.
    held = busy_units(np.array([2.5]), np.array([INF]), np.array([2.0]), edges)
    assert held.tolist() == pytest.approx([1.0, 2.0])


def test_series_of_records_match_the_metrics() -> None:
    tasks = [wt("a", 0.0, 10.0), wt("b", 2.0, 6.0), wt("c", 4.0, 8.0)]
    records = {
        "a": TaskRecord("a", 0.0, 5.0),
        "b": TaskRecord("b", 5.0, 9.0),
        "c": TaskRecord("c", None, None),
    }
    result = SimResult("fifo", records, planning_calls=2, decide_cpu_s=0.0)
    # The horizon ends at the last finish (9); c never starts, so it is queued to the end.
    series = compute_series(tasks, {"fifo": result}, {"p": 2}, samples=10, bins=3)
    assert series.times.tolist() == pytest.approx([float(t) for t in range(10)])
    assert series.misses["fifo"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 2, 2]
    assert series.queue["fifo"].tolist() == [0, 0, 1, 1, 2, 1, 1, 1, 1, 1]
    missed = compute_metrics(tasks, result, {"p": 2})["missed_deadlines"]
    assert series.misses["fifo"][-1] == missed == 2
    # Bins 0-3, 3-6, 6-9 of 2 units: a for 3 s; a for 2 s and b for 1 s; b for 3 s.
    assert series.utilization["fifo"]["p"].tolist() == pytest.approx([0.5, 0.5, 0.5])


def test_series_of_100000_tasks_under_six_policies() -> None:
    count, rng = 100_000, np.random.default_rng(7)
    release = np.round(rng.uniform(0, 86_400, count), 3)
    tasks = [
        wt(f"t{i}", float(r), float(r) + 3600.0 if i % 3 else None) for i, r in enumerate(release)
    ]
    results = {}
    for n in range(6):
        wait = rng.exponential(600.0 * (n + 1), count)
        run = rng.exponential(300.0, count)
        records = {
            task.id: TaskRecord(task.id, task.release_at + w, task.release_at + w + r)
            for task, w, r in zip(tasks, wait, run, strict=True)
        }
        results[f"p{n}"] = SimResult(f"p{n}", records, planning_calls=1, decide_cpu_s=0.0)
    series = compute_series(tasks, results, {"p": 50})
    missed = compute_metrics(tasks, results["p0"], {"p": 50})["missed_deadlines"]
    assert series.misses["p0"][-1] == missed
    for name in results:
        assert series.queue[name][-1] == 0
        assert series.utilization[name]["p"].shape == (200,)


# --- the report -----------------------------------------------------------------------------


def simulated(policies: tuple[str, ...] = ("fifo", "edf")) -> dict[str, Any]:
    scenario = build("logistics", tasks=300, seed=1)
    results = {
        name: simulate(scenario.tasks, scenario.capacity, get_scorer(name)) for name in policies
    }
    return {
        "title": "Logistics, 300 tasks",
        "tasks": scenario.tasks,
        "capacity": scenario.capacity,
        "results": results,
        "metrics": {
            name: compute_metrics(scenario.tasks, result, scenario.capacity)
            for name, result in results.items()
        },
        "workload_summary": {
            **summarize(scenario.tasks, scenario.capacity),
            "capacity": scenario.capacity,
        },
        "events": scenario.events,
    }


@pytest.fixture(scope="module")
def run() -> dict[str, Any]:
    return simulated()


def test_report_writes_markdown_and_three_plots(run: dict[str, Any], tmp_path: Path) -> None:
    report = write_report(tmp_path / "out", headline="missed_deadlines", **run)
    assert report == tmp_path / "out" / "report.md"
    text = report.read_text(encoding="utf-8")
    for name in (MISSES_PNG, QUEUE_PNG, UTILIZATION_PNG):
        path = report.parent / name
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        image = imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 800
        assert image.std() > 0.01, f"{name} is blank"
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted([MISSES_PNG, QUEUE_PNG, UTILIZATION_PNG])
    assert all((report.parent / link).is_file() for link in links)

    metrics = run["metrics"]
    rows = table_rows(text)
    assert set(rows) == {"fifo", "edf"}
    for name, figures in metrics.items():
        assert int(rows[name]["missed"]) == figures["missed_deadlines"]
        assert int(rows[name]["completed"]) == figures["completed"]
    best = min(metrics, key=lambda name: metrics[name]["missed_deadlines"])
    assert f"| **{best}** |" in text
    assert rows[best]["vs best classic"] == "1.00"
    assert "storm in zone" in text and " h to " in text
    assert "drivers" in text and "With deadlines: 100.0 %" in text


def test_report_without_headline_or_events(run: dict[str, Any], tmp_path: Path) -> None:
    text = write_report(tmp_path, **{**run, "events": ()}).read_text()
    assert "**" not in text and "vs best classic" not in text and "## Events" not in text


def test_same_run_writes_the_same_bytes(run: dict[str, Any], tmp_path: Path) -> None:
    first = write_report(tmp_path / "1", **run).parent
    second = write_report(tmp_path / "2", **run).parent
    for name in ("report.md", MISSES_PNG, QUEUE_PNG, UTILIZATION_PNG):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_headline_must_be_a_numeric_metric(run: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="headline 'utilization' is not a number"):
        write_report(tmp_path, headline="utilization", **run)
    assert not (tmp_path / "report.md").exists()


def test_results_and_metrics_must_name_the_same_policies(
    run: dict[str, Any], tmp_path: Path
) -> None:
    metrics = run["metrics"]
    with pytest.raises(InvalidInput, match="same policies"):
        write_report(tmp_path, **{**run, "metrics": {"fifo": metrics["fifo"]}})
