"""The KPI report (`tactician report`) on real databases, from a history made by real tasks: a
real worker runs tasks that meet and miss their deadlines, an operator pins one and cancels
another, an approver lets a held task through, and a drift is detected, engages the fallback
(a task runs under it) and is cleared. The report's numbers must be what was done; its charts
valid PNGs the HTML points to; an empty window says so; a bad window is a one-line error."""

from __future__ import annotations

import json
import re
import sqlite3
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tactician.app import Tactician
from tactician.cli.main import main
from tactician.domain import NewTask, TaskState
from tactician.govern.audit import Entry
from tactician.govern.roles import SYSTEM, Actor, Role
from tactician.observe.report import (
    INTERVENTIONS_PNG,
    MISSED_PNG,
    QUEUE_PNG,
    SLA_PNG,
    TIERS_PNG,
    gather,
    grid_for,
)
from tactician.settings import Settings
from tactician.store.base import INTERVENTIONS
from tests.integration.driving import final, run_until

ROOT = Actor("root", Role.ADMIN)
OPS = Actor("olga", Role.OPERATOR)
ALICE = Actor("alice", Role.APPROVER)
CHARTS = (SLA_PNG, MISSED_PNG, INTERVENTIONS_PNG, QUEUE_PNG, TIERS_PNG)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

BUNDLE = """
name: report-test
objective: {scorer: edf}
pools: {p: 2}
approvals:
  - name: fixes-need-one
    match: {kinds: [fix]}
    approvers: {roles: [approver, admin]}
    required: 1
    expires_after: 1h
"""
DRIFT = {
    "signal": "duration_error:work",
    "detector": "ADWIN",
    "before": 0.01,
    "after": 0.69,
    "samples": 212,
    "text": "duration error of work rose: 0.01 → 0.69 (ADWIN, after 212 outcomes)",
}


def work(ms: float) -> None:
    time.sleep(ms / 1000.0)


def fix(host: str) -> str:
    return f"fixed {host}"


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[Tactician]:
    settings = Settings(
        db=db_url, lease_seconds=10, poll_interval=0.01, models_dir=str(tmp_path / "models")
    )
    app = Tactician(settings=settings)
    app.task(work, pool="p", retries=0)
    app.task(fix, pool="p", retries=0)
    app.gate.deploy(ROOT, BUNDLE, "report.yaml")
    yield app
    app.close()


@dataclass(frozen=True)
class History:
    started: int
    """Tasks that ran (every start a grant recorded)."""


def make_history(app: Tactician) -> History:
    """3 on time, 2 late, 1 pinned by an operator, 1 cancelled by her, 1 held for approval and
    approved; then a drift: detected, fallback engaged, 1 task run under it, cleared."""
    store = app.store
    now = store.db_now()

    def submit(count: int, ms: float, due_in: float) -> list[str]:
        return app.submit_many([NewTask("work", {"ms": ms}, due_at=now + due_in)] * count)

    on_time = submit(3, 5, 600)
    late = submit(2, 300, 0.1)
    (pinned,) = submit(1, 5, 600)
    store.set_override(pinned, "pin", 0.0, OPS, "customer escalation")
    (dropped,) = submit(1, 5, 600)
    store.cancel(dropped, OPS, "not needed any more")
    (held,) = app.submit_many([NewTask("fix", {"host": "db1"}, due_at=now + 600)], actor=ROOT)
    assert app.get(held).state is TaskState.AWAITING_APPROVAL
    app.gate.vote(ALICE, held, "approve", "the runbook says so")
    ran = [*on_time, *late, pinned, held]
    assert run_until(app, final(app, *ran), timeout=30)

    # The drift, written as the drift watch writes it (run.drift.DriftWatch._act).
    store.audit(Entry(SYSTEM.name, "drift.detected", DRIFT["signal"], {**DRIFT, "at": now}))
    assert store.engage_fallback(DRIFT["signal"], DRIFT["text"], "report-test", DRIFT)
    (under_fallback,) = submit(1, 5, 600)
    assert run_until(app, final(app, under_fallback), timeout=30)
    store.clear_fallback(OPS, "durations back to normal")

    assert all(app.get(t).state is TaskState.SUCCEEDED for t in [*ran, under_fallback])
    assert all(app.get(t).finished_at > app.get(t).due_at for t in late)
    assert app.get(dropped).state is TaskState.CANCELLED
    return History(started=len(ran) + 1)


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Ran]:
    """`tactician ARGS` through `main()` in this process (a process costs over a second)."""

    def run(*args: str) -> Ran:
        code: int | str | None = 0
        with monkeypatch.context() as patch:
            patch.setattr(sys, "argv", ["tactician", *args])
            try:
                main()
            except SystemExit as exc:
                code = exc.code
        captured = capsys.readouterr()
        return Ran(code if isinstance(code, int) else 1, captured.out, captured.err)

    return run


def measure(markdown: str, name: str) -> str:
    """The value of one row of the summary table."""
    found = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", markdown, re.MULTILINE)
    assert found, f"no {name!r} row in the summary"
    return found[1]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert len(data) > 5_000, f"{path.name} is suspiciously small ({len(data)} bytes)"
    return width, height


def test_the_report_counts_what_was_done(
    app: Tactician, db_url: str, tmp_path: Path, cli: Callable[..., Ran]
) -> None:
    history = make_history(app)
    out = tmp_path / "kpi"
    ran = cli("report", "--since", "1h", "--out", str(out), "--db", db_url)
    assert ran.returncode == 0, ran.stderr
    written = ran.stdout.split()
    expected = [out / name for name in (*CHARTS, "report.md", "report.html")]
    assert written == [str(p) for p in expected]

    md = (out / "report.md").read_text()
    assert measure(md, "Tasks ended") == "9 (cancelled 1, succeeded 8)"
    assert measure(md, "Success rate") == "100.0 % (8 of 8 that ran to an end)"
    # 8 ran with a deadline: the 2 late ones missed it; the cancelled one is left out.
    assert measure(md, "SLA adherence") == "75.0 % (6 of 8 with a deadline met it)"
    assert measure(md, "Missed deadlines") == "2"
    # The pin, the cancel, the vote and the drift's clearing; not the engine's own records.
    assert measure(md, "Manual interventions") == "4"
    assert measure(md, "Starts decided") == (
        f"{history.started} (human override 1, tier 1: drift fallback 1, "
        f"tier 1: heuristic {history.started - 2})"
    )
    assert measure(md, "Drift events") == "3 (cleared 1, detected 1, fallback 1)"
    assert re.search(r"^\| work \| 2 \| 2 \| 0 \| 0 \| 0 \|$", md, re.MULTILINE)  # missed, by kind
    for action in ("override.set", "task.cancelled", "approval.voted"):
        assert re.search(rf"^\| {re.escape(action)} \| 1 \|$", md, re.MULTILINE), action
    assert "| tier 1: heuristic | edf | none |" in md
    drift_rows = [line for line in md.splitlines() if "| duration_error:work |" in line]
    assert [row.split(" | ")[1] for row in drift_rows] == [
        "drift.detected",
        "drift.fallback",
        "drift.cleared",
    ]
    assert "ADWIN" in drift_rows[0] and DRIFT["text"] in drift_rows[0]
    assert "durations back to normal" in drift_rows[2] and "olga" in drift_rows[2]
    # The tasks waited moments only, inside one bucket: its peak shows them.
    assert re.search(
        r"^\| Queue depth \| 0 at the start, 0 at the end, at most [1-9]\d* \|$", md, re.M
    )

    html = (out / "report.html").read_text()
    for name in CHARTS:
        assert png_size(out / name) == (990, 440)  # 9 x 4 inches at 110 dpi
        assert f'src="{name}"' in html and f"({name})" in md
    assert "75.0 %" in html and "duration_error:work" in html

    # The same numbers through the JSON output.
    ran = cli("report", "--since", "1h", "--out", str(out), "--db", db_url, "--json")
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout)["summary"]
    assert summary["sla_adherence"] == 0.75 and summary["missed_deadlines"] == 2
    assert summary["manual_interventions"] == 4 and summary["tier2_recorded"] is True


def test_queue_depth_counts_tasks_submitted_and_not_started(app: Tactician) -> None:
    """Nothing runs them (no planner, no worker): one task submitted before the window waits
    at its start, two more join it, so three wait at its end."""
    store = app.store
    app.submit_many([NewTask("work", {"ms": 1})])
    time.sleep(0.2)
    since = store.db_now()
    time.sleep(0.05)
    app.submit_many([NewTask("work", {"ms": 1})] * 2)
    report = gather(store, since, store.db_now() + 1.0, INTERVENTIONS)
    assert report.queue[0] == 1 and report.queue[-1] == 3
    assert max(report.queue_peak) == 3
    assert report.has_data and report.summary()["tasks_ended"] == 0


def test_an_empty_window_says_so(
    app: Tactician, db_url: str, tmp_path: Path, cli: Callable[..., Ran]
) -> None:
    make_history(app)
    out = tmp_path / "empty"
    ran = cli(
        "report",
        "--since",
        "2001-01-01T00:00:00Z",
        "--until",
        "2001-01-08T00:00:00+00:00",
        "--out",
        str(out),
        "--db",
        db_url,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == [str(out / "report.md"), str(out / "report.html")]
    md = (out / "report.md").read_text()
    assert "No data in this window" in md and "2001-01-01 00:00 UTC" in md
    assert "(7.0 d), in buckets of 1 day" in md
    assert not list(out.glob("*.png"))
    assert "No data in this window" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "--since: not a time (epoch, ISO 8601, +30m, -7d)"),
        (["--since", "2024-05-01T00:00:00"], "--since: give a time zone"),
        (["--since", "7d", "--until", "8d"], "--since must be before --until"),
        (["--until", "soon"], "--until: not a time"),
        (["--format", "pdf"], "--format must be one of md, html, both"),
    ],
)
def test_a_bad_window_is_a_one_line_error(
    sqlite_url: str, tmp_path: Path, cli: Callable[..., Ran], args: list[str], message: str
) -> None:
    out = tmp_path / "never"
    ran = cli("report", *args, "--out", str(out), "--db", sqlite_url)
    assert ran.returncode == 2
    assert ran.stderr.startswith(f"error: {message}") and ran.stderr.count("\n") == 1
    assert ran.stdout == "" and not out.exists()


def test_the_reads_are_bounded_by_indexes(sqlite_url: str, tmp_path: Path) -> None:
    """No report query reads a whole table on SQLite (EXPLAIN QUERY PLAN of each one it ran)."""
    app = Tactician(settings=Settings(db=sqlite_url, poll_interval=0.01))
    app.task(work, pool="p", retries=0)
    try:
        now = app.store.db_now()
        ids = app.submit_many([NewTask("work", {"ms": 1}, due_at=now + 60)] * 3)
        assert run_until(app, final(app, *ids), timeout=30)
        store = app.store
        statements: list[str] = []
        store.conn.set_trace_callback(statements.append)
        gather(store, now - 86400.0, store.db_now() + 1.0, INTERVENTIONS)
        store.conn.set_trace_callback(None)
    finally:
        app.close()
    reads = [s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]
    assert len(reads) >= 8  # the waits' ranks included: three tasks ended
    conn = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    try:
        for sql in reads:
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
            scans = [p for p in plan if re.fullmatch(r"SCAN (tasks|t|audit_log|attempts|a)", p)]
            assert not scans, f"a whole table is read by: {sql[:120]}… ({plan})"
    finally:
        conn.close()


def test_buckets_follow_the_window() -> None:
    day = 86400.0
    assert grid_for(10 * day + 5, 17 * day + 5).step == day  # 7 days: daily, from midnight UTC
    assert grid_for(10 * day + 5, 17 * day + 5).origin == 10 * day
    assert grid_for(0.0, 2 * day).step == 3600.0
    assert grid_for(0.0, 1800.0).step == 300.0
    grid = grid_for(5 * 3600.0 + 600, 5 * 3600.0 + 600 + day)  # hourly; cut at both ends
    assert (grid.origin, grid.count) == (5 * 3600.0, 25)
    assert grid.start(0) == 5 * 3600.0 + 600 and grid.end(0) == 6 * 3600.0
    assert grid.end(24) == 5 * 3600.0 + 600 + day and grid.index(grid.until) is None
