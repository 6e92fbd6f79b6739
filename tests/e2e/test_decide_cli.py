"""`tactician tasks why` and `tactician tasks reprioritize` as a user runs them: real processes,
a real database file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_cli import run

APP = """
from tactician import Tactician

app = Tactician()

@app.task(pool="drivers")
def deliver(stop: str) -> None:
    pass
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "fleet.py").write_text(APP)
    return tmp_path


def submit(workdir: Path, db: str, *extra: str) -> str:
    done = run(
        "submit",
        "deliver",
        '{"stop": "a"}',
        "--app",
        "fleet:app",
        "--json",
        *extra,
        cwd=workdir,
        db=db,
    )
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["id"])


def why(workdir: Path, db: str, task_id: str) -> dict[str, object]:
    done = run("tasks", "why", task_id, "--json", cwd=workdir, db=db)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_why_explains_and_reprioritize_rescores_at_once(workdir: Path, sqlite_url: str) -> None:
    pools = run("pools", "--set", "drivers=1", cwd=workdir, db=sqlite_url)
    assert pools.returncode == 0, pools.stderr
    soon = submit(workdir, sqlite_url, "--due-at", "+1800", "--estimate", "600")
    later = submit(workdir, sqlite_url, "--due-at", "+7200", "--estimate", "600")

    first = why(workdir, sqlite_url, later)
    decision = first["decision"]
    assert isinstance(decision, dict)
    assert decision["scorer"] == "learned"
    assert decision["action"] == "run"
    assert decision["policy_version"] == "builtin"
    texts = " ".join(r["text"] for r in decision["reasons"])
    assert ("due in 120 min" in texts or "due in 119 min" in texts) and "p90" in texts
    assert "predicted run 10 min" in texts
    assert "2 of 2 in its pool" in texts
    assert first["pending_reason"]

    # The later delivery becomes the urgent one: it is first in the very next ranking.
    changed = run(
        "tasks",
        "reprioritize",
        later,
        "--due-at",
        "+900",
        "--weight",
        "3",
        "--json",
        cwd=workdir,
        db=sqlite_url,
    )
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["weight"] == 3.0
    texts = " ".join(r["text"] for r in why(workdir, sqlite_url, later)["decision"]["reasons"])  # type: ignore[index]
    assert "1 of 2 in its pool" in texts and "weight 3" in texts
    assert "2 of 2 in its pool" in " ".join(
        r["text"]
        for r in why(workdir, sqlite_url, soon)["decision"]["reasons"]  # type: ignore[index]
    )

    plain = run("tasks", "why", soon, cwd=workdir, db=sqlite_url)
    assert plain.returncode == 0 and "factor" in plain.stdout and soon in plain.stdout


def test_bad_reprioritize_is_one_line_and_changes_nothing(workdir: Path, sqlite_url: str) -> None:
    task = submit(workdir, sqlite_url, "--due-at", "+600", "--weight", "2")
    for args, message in (
        (["--weight", "-1"], "weight must be a positive number"),
        (["--due-at", "soon"], "--due-at: not a time"),
        (["--due-at", "+60", "--no-due"], "not both"),
        ([], "nothing to change"),
    ):
        done = run("tasks", "reprioritize", task, *args, cwd=workdir, db=sqlite_url)
        assert done.returncode == 2, done.stdout
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    missing = run("tasks", "why", "nosuchtask", cwd=workdir, db=sqlite_url)
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    shown = run("tasks", "show", task, "--json", cwd=workdir, db=sqlite_url)
    assert json.loads(shown.stdout)["weight"] == 2.0
