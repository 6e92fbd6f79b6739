"""`tactician train`, `tactician models …` and `tactician bench decide`, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tactician.domain import KindSpec, NewTask, Result, RetryPolicy
from tactician.plan.capacity import plan_starts
from tactician.settings import Settings
from tactician.store.open import open_store
from tactician.store.protocol import Finish

TACTICIAN = str(Path(sys.executable).parent / "tactician")


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "models"


def run(*args: str, registry: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TACTICIAN_MODELS_DIR": str(registry)}
    return subprocess.run(
        [TACTICIAN, *args],
        cwd=registry.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok_json(*args: str, registry: Path) -> Any:
    done = run(*args, "--json", registry=registry)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def train(scenario: str, registry: Path, *extra: str) -> dict[str, Any]:
    report: dict[str, Any] = ok_json(
        "train", "--scenario", scenario, "--tasks", "2000", "--seed", "0", *extra, registry=registry
    )
    return report


@pytest.mark.parametrize("scenario", ["logistics", "incidents", "campaigns", "batch"])
def test_train_on_a_scenario_reports_each_predictor_against_its_baseline(
    scenario: str, registry: Path
) -> None:
    report = train(scenario, registry)
    assert report["rows"] == 2000
    assert report["trained_from"] < report["trained_to"]
    assert report["features"][:4] == ["estimate", "weight", "units", "kind"]
    assert len(report["features"]) > 9  # the scenario's own features are read too
    assert report["source"] == {"scenario": scenario, "tasks": 2000, "seed": 0, "load": 1.2}
    predictors = report["predictors"]
    assert {"duration_p50", "duration_p90", "miss"} <= set(predictors)
    assert "failure" not in predictors  # a scenario's history holds no failures
    for check in predictors.values():
        assert {"metric", "model", "baseline", "baseline_name", "rows", "accepted"} <= set(check)
    p50 = predictors["duration_p50"]
    assert (p50["metric"], p50["rows"]) == ("mae_s", 400)
    assert p50["accepted"] == (p50["model"] < p50["baseline"])
    assert report["fitted"]["duration"] == p50["accepted"]
    assert predictors["miss"]["metric"] == "log_loss"
    assert predictors["duration_p90"]["metric"] == "coverage"
    # Saved either way, under its version, and listed.
    saved = Path(report["saved"])
    assert saved.name == f"{report['version']}.json" and saved.parent == registry
    assert [e["version"] for e in ok_json("models", "list", registry=registry)] == [
        report["version"]
    ]
    assert report["promoted"] is False and report["active"] is None
    if scenario in ("incidents", "batch"):
        # Features explain these run times far better than the given estimate or kind median.
        assert p50["accepted"] and p50["model"] < 0.5 * p50["baseline"]


def test_models_list_show_promote_rollback_round_trip(registry: Path) -> None:
    first = train("incidents", registry, "--promote")
    assert first["promoted"] is True and first["active"] == first["version"]
    second = train("batch", registry)
    assert second["active"] == first["version"]

    listed = ok_json("models", "list", registry=registry)
    assert [(e["version"], e["active"]) for e in listed] == [
        (first["version"], True),
        (second["version"], False),
    ]
    assert listed[1]["manifest"]["rows"] == 2000

    shown = ok_json("models", "show", second["version"][:7], registry=registry)
    assert shown["version"] == second["version"] and shown["active"] is False
    assert shown["features"] == second["features"]
    assert {v["predictor"] for v in shown["validation"]} == set(second["predictors"])

    event = ok_json("models", "promote", second["version"][:6], registry=registry)
    assert (event["action"], event["version"], event["previous"]) == (
        "promote",
        second["version"],
        first["version"],
    )
    assert ok_json("models", "show", second["version"], registry=registry)["active"] is True
    back = ok_json("models", "rollback", registry=registry)
    assert (back["version"], back["previous"]) == (first["version"], second["version"])
    assert [e["active"] for e in ok_json("models", "list", registry=registry)] == [True, False]

    again = run("models", "rollback", registry=registry)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr == f"error: no model set to roll back to: {first['version']} is the first\n"

    listed_text = run("models", "list", registry=registry)
    assert listed_text.returncode == 0 and first["version"][:10] in listed_text.stdout
    shown_text = run("models", "show", first["version"], registry=registry)
    assert shown_text.returncode == 0 and "duration_p50" in shown_text.stdout


def test_a_refused_duration_model_is_saved_but_not_promoted_without_force(
    registry: Path,
) -> None:
    # Logistics: the route planner's estimate beats the duration model on the held-out tasks.
    report = train("logistics", registry, "--promote")
    assert report["predictors"]["duration_p50"]["accepted"] is False
    assert report["promoted"] is False and report["active"] is None
    assert "duration predictor was refused" in report["not_promoted"]
    assert Path(report["saved"]).exists()

    refused = run("models", "promote", report["version"], registry=registry)
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"error: model set {report['version']}: its duration")
    assert refused.stderr.count("\n") == 1
    forced = ok_json("models", "promote", report["version"], "--force", registry=registry)
    assert forced["forced"] is True and forced["version"] == report["version"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train"], "give exactly one source"),
        (["train", "--scenario", "batch", "--workload", "w.jsonl"], "give exactly one source"),
        (["train", "--scenario", "nope"], "no scenario 'nope'"),
        (["train", "--tasks", "10", "--workload", "w.jsonl"], "go with --scenario"),
        (["train", "--scenario", "batch", "--tasks", "20"], "too few to train on"),
        (["train", "--scenario", "batch", "--valid-fraction", "0.9"], "valid_fraction"),
        (["train", "--scenario", "batch", "--force"], "--force goes with --promote"),
        (["train", "--workload", "missing.jsonl"], "missing.jsonl"),
        (["train", "--db", "mysql://x"], "unsupported database URL"),
        (["train", "--scenario", "batch", "--since", "0"], "--since goes with --db"),
        (["train", "--db", "sqlite:///t.db", "--since", "yesterday"], "--since: not a time"),
        (["models", "show", "abc"], "at least 6 characters"),
        (["models", "show", "abcdef"], "no model set has version 'abcdef'"),
        (["models", "promote", "abcdef"], "no model set has version 'abcdef'"),
        (["models", "rollback"], "none was ever promoted"),
        (["bench", "decide", "--scenario", "nope"], "no scenario 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, registry: Path) -> None:
    done = run(*args, registry=registry)
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert message in done.stderr
    assert done.stdout == ""
    assert not registry.exists() or sorted(p.name for p in registry.iterdir()) == []


def test_a_corrupted_registry_index_is_one_line(registry: Path) -> None:
    registry.mkdir()
    (registry / "index.json").write_text("{broken")
    for args in (["models", "list"], ["train", "--scenario", "incidents", "--tasks", "100"]):
        done = run(*args, registry=registry)
        assert done.returncode == 2
        assert done.stderr.startswith("error: model registry index") and "corrupted" in done.stderr
        assert done.stderr.count("\n") == 1
    assert (registry / "index.json").read_text() == "{broken"


def _record_outcomes(url: str, count: int) -> None:
    """Run `count` tasks through the store as workers would: their run time grows with their
    `size`, and those marked `flaky` fail."""
    store = open_store(url, Settings(db=url))
    try:
        store.register_kinds([KindSpec("resize", retry=RetryPolicy(max_attempts=1))])
        kinds = store.kinds()
        tasks = [
            NewTask(
                "resize",
                {"size": 1 + i % 17, "format": ("png", "jpg", "webp")[i % 3], "flaky": i % 5 == 0},
                estimate=30.0,
            )
            for i in range(count)
        ]
        store.submit(tasks, kinds)
        store.plan(plan_starts, kinds)
        claims = store.claim("w1", ["resize"], count)
        now = store.db_now()
        finishes = []
        for claim in claims:
            payload = json.loads(claim.payload)
            took = 2.0 * payload["size"] + (5.0 if payload["format"] == "webp" else 0.0)
            ok = not payload["flaky"]
            result = Result(
                claim.task_id, claim.token, ok, now - took, took, error=None if ok else "corrupt"
            )
            finishes.append(Finish(result, "resize", claim.attempt, None))
        store.finish("w1", finishes, kinds)
    finally:
        store.close()


def test_train_from_a_database_reads_its_finished_attempts(registry: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/recorded.db"
    _record_outcomes(url, 400)
    report = ok_json("train", "--db", url, "--promote", registry=registry)
    assert report["rows"] == 400
    assert report["source"] == {"db": "sqlite", "since": None, "limit": 100000}
    assert {"size", "format", "flaky"} <= set(report["features"])
    assert {"duration_p50", "duration_p90", "failure"} <= set(report["predictors"])
    assert "miss" not in report["predictors"]  # no task had a deadline
    # The run time is a function of the payload: the model beats the flat estimate by far.
    p50 = report["predictors"]["duration_p50"]
    assert p50["accepted"] and p50["model"] < 0.2 * p50["baseline"]
    failure = report["predictors"]["failure"]
    assert failure["metric"] == "log_loss" and failure["accepted"]
    assert failure["model"] < failure["baseline"]
    assert report["promoted"] is True

    limited = ok_json("train", "--db", url, "--limit", "100", registry=registry)
    assert limited["rows"] == 100
    future = run("train", "--db", url, "--since", "2100-01-01T00:00:00Z", registry=registry)
    assert future.returncode == 2 and "0 finished tasks is too few" in future.stderr


def test_bench_decide_prints_its_figures(registry: Path) -> None:
    figures = ok_json(
        "bench",
        "decide",
        "--backlog",
        "400",
        "--history",
        "600",
        "--runs",
        "1",
        "--repetitions",
        "2",
        "--events",
        "5",
        registry=registry,
    )
    assert figures["backlog"] == 400 and figures["arrivals"] == 5 and figures["scenario"] == "mix"
    assert sum(pool["waiting"] for pool in figures["pools"].values()) == 400
    assert figures["models"]["lightgbm"] is True  # the mix's duration model beats its baseline
    assert {v["predictor"] for v in figures["models"]["validation"]} >= {"duration_p50"}
    keys = {"rank_ms_p50", "rank_ms_p90", "event_ms_p50", "event_ms_p99"}
    assert keys <= set(figures)
    assert set(figures["scorers"]) == {"learned", "atc", "edf"}
    for name, row in figures["scorers"].items():
        assert keys | {"rank_warm_ms_p50", "event_path"} <= set(row), name
        assert all(row[key] > 0 for key in keys)
        assert (
            row["rank_ms_p50"] <= row["rank_ms_p90"] and row["event_ms_p50"] <= row["event_ms_p99"]
        )
    assert figures["scorers"]["learned"]["predict_ms_p50"] > 0
    assert figures["rank_ms_p50"] == figures["scorers"]["learned"]["rank_ms_p50"]
    assert set(figures["ratios"]) == {"learned/atc", "learned/edf"}

    text = run(
        "bench",
        "decide",
        "--backlog",
        "400",
        "--history",
        "600",
        "--runs",
        "1",
        "--repetitions",
        "1",
        "--events",
        "3",
        registry=registry,
    )
    assert text.returncode == 0, text.stderr
    assert "learned" in text.stdout and "edf" in text.stdout and "rank_ms_p50" in text.stdout


def test_a_models_dir_that_cannot_be_a_directory_is_one_line(registry: Path) -> None:
    registry.write_text("a file, not a directory")
    inside = str(registry / "models")
    for args in (["models", "list"], ["train", "--scenario", "incidents", "--tasks", "100"]):
        done = run(*args, "--models-dir", inside, registry=registry)
        assert done.returncode == 2
        assert done.stderr.startswith("error: cannot ") and "Not a directory" in done.stderr
        assert done.stderr.count("\n") == 1
