"""The `tactician` command as a user runs it: real processes, a real database file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TACTICIAN = str(Path(sys.executable).parent / "tactician")
APP = """
from tactician import Tactician

app = Tactician()

@app.task(retries=0)
def greet(name: str) -> None:
    pass
"""


def run(*args: str, cwd: Path, db: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TACTICIAN_DB": db}
    return subprocess.run(
        [TACTICIAN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "shop.py").write_text(APP)
    return tmp_path


def count_tasks(workdir: Path, db: str) -> int:
    listed = run("tasks", "list", "--json", "--limit", "10000", cwd=workdir, db=db)
    assert listed.returncode == 0, listed.stderr
    return len(json.loads(listed.stdout))


def test_submit_list_show_cancel_retry(workdir: Path, sqlite_url: str) -> None:
    submitted = run(
        "submit",
        "greet",
        '{"name": "ada"}',
        "--app",
        "shop:app",
        "--json",
        "--key",
        "k1",
        cwd=workdir,
        db=sqlite_url,
    )
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["id"]
    again = run(
        "submit", "greet", '{"name": "ada"}', "--json", "--key", "k1", cwd=workdir, db=sqlite_url
    )
    assert json.loads(again.stdout)["id"] == task_id  # same key, same task
    shown = json.loads(run("tasks", "show", task_id, "--json", cwd=workdir, db=sqlite_url).stdout)
    assert shown["state"] == "ready" and shown["payload"] == {"name": "ada"}
    cancelled = run("tasks", "cancel", task_id, "--json", cwd=workdir, db=sqlite_url)
    assert json.loads(cancelled.stdout)["state"] == "cancelled"
    retried = run("tasks", "retry", task_id, "--json", cwd=workdir, db=sqlite_url)
    assert json.loads(retried.stdout)["state"] == "ready"
    pools = json.loads(run("pools", "--json", cwd=workdir, db=sqlite_url).stdout)
    assert pools["pools"][0]["name"] == "default" and pools["pools"][0]["ready"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "nosuchkind", "{}"], "unknown kind 'nosuchkind'"),
        (["submit", "greet", "{not json"], "payload is not JSON"),
        (["submit", "greet", "[1, 2]"], "payload must be a JSON object"),
        (["submit", "greet", "{}", "--estimate", "-5"], "estimate must be >= 0"),
        (
            ["submit", "greet", "{}", "--release-at", "2000", "--due-at", "1000"],
            "due_at is before release_at",
        ),
        (["submit", "greet", "{}", "--due-at", "tomorrow"], "not a time"),
        (["tasks", "show", "nope"], "no task has id 'nope'"),
        (["tasks", "list", "--state", "weird"], "unknown state 'weird'"),
        (["pools", "--set", "drivers=-1"], "units must be a whole number"),
        (["worker", "--app", "nosuchmodule:app"], "cannot import nosuchmodule"),
        (["schedules", "add", "s1", "--kind", "greet", "--cron", "61 * * * *"], "schedule s1"),
        (["purge", "--before", "soon"], "--before: not a time"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    workdir: Path, sqlite_url: str, args: list[str], message: str
) -> None:
    setup = run("submit", "greet", '{"name": "x"}', "--app", "shop:app", cwd=workdir, db=sqlite_url)
    assert setup.returncode == 0, setup.stderr
    before = count_tasks(workdir, sqlite_url)
    result = run(*args, cwd=workdir, db=sqlite_url)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert count_tasks(workdir, sqlite_url) == before


def test_unreachable_databases(workdir: Path) -> None:
    for db, message in [
        ("sqlite:////no/such/folder/t.db", "folder /no/such/folder does not exist"),
        ("postgresql://127.0.0.1:1/nothing", "cannot connect to postgresql://127.0.0.1:1"),
        ("mysql://x", "unsupported database URL"),
    ]:
        result = run("submit", "greet", "{}", cwd=workdir, db=db)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr


@pytest.mark.slow
def test_bench_throughput_prints_one_verified_json_object(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/bench.db"
    result = run(
        "bench",
        "throughput",
        "--tasks",
        "300",
        "--runs",
        "1",
        "--json",
        "--db",
        db,
        cwd=tmp_path,
        db=db,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["tasks"] == 300 and figures["verified_succeeded"] == 300
    assert figures["complete_per_s"] > 0 and figures["e2e_s"] > 0


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path: Path) -> None:
    """`make demo` from a fresh folder: its own database under .demo/, the console's URL."""
    from tests.e2e.serving import free_port

    result = subprocess.run(
        [TACTICIAN, "demo", "--duration", "8", "--port", str(free_port())],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Console: http://127.0.0.1:" in result.stdout and "succeeded" in result.stdout
    assert (tmp_path / ".demo" / "tactician.db").exists()


def test_drift_status_and_clear(workdir: Path, sqlite_url: str) -> None:
    from tactician.app import Tactician
    from tactician.settings import Settings

    status = run("drift", "status", cwd=workdir, db=sqlite_url)
    assert status.returncode == 0, status.stderr
    assert "not engaged" in status.stdout and "no drift records" in status.stdout
    nothing = run("drift", "clear", "--reason", "fine", cwd=workdir, db=sqlite_url)
    assert nothing.returncode == 2
    assert nothing.stderr == "error: no drift fallback is engaged: nothing to clear\n"

    app = Tactician(settings=Settings(db=sqlite_url))
    app.store.engage_fallback("miss_rate", "miss rate rose: 3% → 9%", "v1", {"detector": "ADWIN"})
    app.close()
    status = run("drift", "status", "--json", cwd=workdir, db=sqlite_url)
    shown = json.loads(status.stdout)
    assert shown["fallback"]["signal"] == "miss_rate"
    assert [r["action"] for r in shown["records"]] == ["drift.fallback"]
    assert "ENGAGED" in run("drift", "status", cwd=workdir, db=sqlite_url).stdout
    no_reason = run("drift", "clear", "--reason", " ", cwd=workdir, db=sqlite_url)
    assert no_reason.returncode == 2 and "needs a reason" in no_reason.stderr
    cleared = run("drift", "clear", "--reason", "fixed the disks", cwd=workdir, db=sqlite_url)
    assert cleared.returncode == 0, cleared.stderr
    assert "cleared" in cleared.stdout
    shown = json.loads(run("drift", "status", "--json", cwd=workdir, db=sqlite_url).stdout)
    assert shown["fallback"] is None
    assert [r["action"] for r in shown["records"]] == ["drift.fallback", "drift.cleared"]
    assert shown["records"][-1]["detail"]["reason"] == "fixed the disks"
