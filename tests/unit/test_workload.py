"""Workload files: round trip, one-line errors naming file, line and field, and the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tactician.errors import InvalidInput
from tactician.sim.workload import (
    WorkloadTask,
    parse_line,
    read_workload,
    summarize,
    write_workload,
)


def line(**fields: Any) -> str:
    task: dict[str, Any] = {"id": "t1", "kind": "k", "submit_at": 0.0, "duration": 10.0}
    task.update(fields)
    return json.dumps({k: v for k, v in task.items() if v is not ...})


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    tasks = [
        WorkloadTask(id="j0", kind="deliver", submit_at=0.0, release_at=0.0, duration=20.0),
        WorkloadTask(
            id="j1",
            kind="deliver",
            submit_at=1.5,
            release_at=2.0,
            due_at=120.0,
            duration=35.0,
            estimate=40.0,
            weight=3.0,
            resources={"drivers": 1},
            features={"distance_km": 12.3, "zone": "north", "urgent": True, "stops": 2},
            sensitive=True,
            depends_on=("j0",),
        ),
    ]
    path = tmp_path / "w.jsonl"
    write_workload(path, tasks)
    assert read_workload(path) == tasks
    assert len(path.read_text().splitlines()) == 2


def test_defaults_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "w.jsonl", "", line(submit_at=5), "   ")
    [task] = read_workload(path)
    assert task.release_at == 5.0
    assert (task.due_at, task.estimate, task.weight) == (None, None, 1.0)
    assert (task.resources, task.features, task.sensitive, task.depends_on) == ({}, {}, False, ())


def test_an_empty_file_is_an_empty_workload(tmp_path: Path) -> None:
    assert read_workload(write(tmp_path / "w.jsonl", "")) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": "t1",', "not valid JSON: Expecting property name enclosed in double quotes"),
        ("[1, 2]", "a task must be a JSON object, got [1, 2]"),
        (line(colour="red"), "unknown field 'colour'"),
        (line(duration=...), "duration is missing"),
        (line(id=...), "id is missing"),
        (line(id=7), "id must be a non-empty string, got 7"),
        (line(duration="10s"), 'duration must be a number, got "10s"'),
        (line(submit_at=True), "submit_at must be a number, got true"),
        (line(duration=-3), "duration (-3.0) must be > 0"),
        (line(duration=0), "duration (0.0) must be > 0"),
        (line(submit_at=-1), "submit_at (-1.0) must be >= 0"),
        (line(submit_at=10, release_at=5), "release_at (5.0) is before submit_at (10.0)"),
        (line(release_at=45, due_at=30), "due_at (30.0) is before release_at (45.0)"),
        (line(estimate=-1), "estimate (-1.0) must be >= 0"),
        (line(weight=-0.5), "weight (-0.5) must be >= 0"),
        (line(resources={"drivers": 0}), "resources.drivers must be a positive integer, got 0"),
        (line(resources=[1]), "resources must be an object, got [1]"),
        (line(features={"a": [1]}), "features.a must be a number, string or boolean, got [1]"),
        (line(sensitive="yes"), 'sensitive must be true or false, got "yes"'),
        (line(depends_on="t0"), 'depends_on must be a list of task ids, got "t0"'),
        ('{"id": "t1", "kind": "k", "submit_at": 0, "duration": NaN}', "must be a finite number"),
    ],
)
def test_a_bad_line_names_file_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "workload.jsonl", line(id="t0"), "", text)
    with pytest.raises(InvalidInput) as caught:
        read_workload(path)
    assert caught.value.message.startswith(f"{path} line 3: ")
    assert message in caught.value.message
    assert "\n" not in caught.value.message


def test_parse_line_alone_names_the_line() -> None:
    with pytest.raises(InvalidInput, match=r"^workload line 7: due_at \(30.0\) is before"):
        parse_line(line(release_at=45, due_at=30), 7)
    assert parse_line(line(), 1).id == "t1"


def test_a_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "w.jsonl", line(id="a"), line(id="b"), line(id="a"))
    with pytest.raises(InvalidInput) as caught:
        read_workload(path)
    assert caught.value.message == f"{path} line 3: id 'a' is already used on line 1"


def test_an_unknown_dependency_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "w.jsonl", line(id="a"), line(id="b", depends_on=["a", "zz"]))
    with pytest.raises(InvalidInput) as caught:
        read_workload(path)
    assert caught.value.message == f"{path} line 2: depends_on names 'zz', which is not in the file"


def test_a_dependency_may_come_later_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "w.jsonl", line(id="a", depends_on=["b"]), line(id="b"))
    assert [t.id for t in read_workload(path)] == ["a", "b"]


def test_a_cycle_is_an_error_naming_its_first_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "w.jsonl",
        line(id="x"),
        line(id="a", depends_on=["c", "x"]),
        line(id="b", depends_on=["a"]),
        line(id="c", depends_on=["b"]),
        line(id="d", depends_on=["c"]),
    )
    with pytest.raises(InvalidInput) as caught:
        read_workload(path)
    assert caught.value.message == f"{path} line 2: depends_on makes a cycle: a -> c -> b -> a"


def test_a_task_depending_on_itself_is_a_cycle(tmp_path: Path) -> None:
    path = write(tmp_path / "w.jsonl", line(id="a"), line(id="b", depends_on=["b"]))
    with pytest.raises(InvalidInput, match=r"line 2: depends_on makes a cycle: b -> b$"):
        read_workload(path)


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"nope.jsonl: cannot read"):
        read_workload(tmp_path / "nope.jsonl")


def test_summary_counts_demand_and_load() -> None:
    def task(task_id: str, **fields: Any) -> WorkloadTask:
        fields.setdefault("release_at", fields["submit_at"])
        return WorkloadTask(id=task_id, kind=fields.pop("kind", "k"), **fields)

    tasks = [
        task("a", submit_at=0.0, duration=100.0, resources={"cpu": 2}, due_at=50.0),
        task("b", submit_at=10.0, release_at=100.0, duration=300.0, resources={"cpu": 1}),
        task("c", kind="other", submit_at=20.0, duration=50.0, estimate=60.0, sensitive=True),
    ]
    summary = summarize(tasks, {"cpu": 2, "gpu": 1})
    assert summary["count"] == 3
    assert summary["kinds"] == {"k": 2, "other": 1}
    assert summary["span"] == 100.0
    assert summary["demand"] == {"cpu": 500.0}
    assert summary["deadline_share"] == round(1 / 3, 4)
    assert summary["estimate_share"] == round(1 / 3, 4)
    assert summary["sensitive_share"] == round(1 / 3, 4)
    assert summary["mean_duration"] == 150.0
    assert summary["load"] == {"cpu": 2.5, "gpu": 0.0}
    assert summarize([])["count"] == 0
