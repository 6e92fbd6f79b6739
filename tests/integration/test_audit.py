"""The audit chain on both databases: real operations append records, triggers refuse UPDATE
and DELETE, and each way of tampering (edit, delete, reorder, insert, a rewritten tail caught by
an anchor) is found by `verify`, which names the record. Also through the CLI."""

from __future__ import annotations

import itertools
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tactician.app import Tactician
from tactician.domain import KindSpec, NewTask
from tactician.govern.audit import AuditRecord, record_hash, verify
from tactician.govern.roles import Actor, Role
from tactician.settings import Settings

ADMIN = Actor("root", Role.ADMIN)


@pytest.fixture
def app(db_url: str) -> Iterator[Tactician]:
    app = Tactician(settings=Settings(db=db_url))
    app.store.register_kinds([KindSpec("job", pool="p")])
    yield app
    app.close()


def fill(app: Tactician, tasks: int = 6) -> list[AuditRecord]:
    """About ten records of real operations."""
    ids = [app.submit_many([NewTask("job", {"n": i})], actor=ADMIN)[0] for i in range(tasks)]
    app.store.cancel(ids[0], ADMIN, "not needed")
    app.store.reprioritize(ids[1], weight=3.0, actor=ADMIN, reason="customer called")
    app.gate.create_token(ADMIN, "ci", Role.OPERATOR)
    app.store.hold(ids[-1], ADMIN, "waiting for a window")
    return list(app.store.audit_records())


def raw(db_url: str) -> Callable[[str, tuple[Any, ...]], None]:
    """Run SQL as a superuser would, around the store (triggers dropped first)."""
    if db_url.startswith("sqlite:///"):
        path = db_url.removeprefix("sqlite:///")

        def run_sqlite(sql: str, params: tuple[Any, ...] = ()) -> None:
            with closing(sqlite3.connect(path)) as conn:
                conn.execute(sql, params)
                conn.commit()

        return run_sqlite
    import psycopg

    def run_pg(sql: str, params: tuple[Any, ...] = ()) -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]

    return run_pg


def drop_triggers(db_url: str) -> Callable[[str, tuple[Any, ...]], None]:
    run = raw(db_url)
    if db_url.startswith("sqlite:///"):
        run("DROP TRIGGER audit_log_no_update", ())
        run("DROP TRIGGER audit_log_no_delete", ())
    else:
        run("DROP TRIGGER audit_log_no_change ON audit_log", ())
    return run


def test_operations_append_a_chain_that_verifies(app: Tactician) -> None:
    records = fill(app)
    actions = [r.action for r in records]
    assert actions[:6] == ["task.submitted"] * 6
    for action in ("task.cancelled", "task.reprioritized", "token.created", "task.held"):
        assert action in actions
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    verdict = verify(records)
    assert verdict.ok and verdict.checked == len(records)
    assert (records[-1].seq, verdict.head) == app.store.audit_head()
    cancelled = next(r for r in records if r.action == "task.cancelled")
    assert cancelled.actor == "root" and cancelled.details["reason"] == "not needed"


def test_triggers_refuse_update_and_delete(app: Tactician, db_url: str) -> None:
    records = fill(app, tasks=2)
    run = raw(db_url)
    for sql in ("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1", "DELETE FROM audit_log"):
        with pytest.raises(Exception, match="append-only"):
            run(sql, ())
    assert list(app.store.audit_records()) == records


def swap(run: Callable[[str, tuple[Any, ...]], None], a: int, b: int) -> None:
    run("UPDATE audit_log SET seq = -1 WHERE seq = ?", (a,))
    run("UPDATE audit_log SET seq = ? WHERE seq = ?", (a, b))
    run("UPDATE audit_log SET seq = ? WHERE seq = -1", (b,))


def test_an_edited_record_is_named(app: Tactician, db_url: str) -> None:
    fill(app)
    drop_triggers(db_url)('UPDATE audit_log SET detail = \'{"reason":"ok"}\' WHERE seq = 7', ())
    verdict = verify(app.store.audit_records())
    assert (verdict.ok, verdict.bad_seq) == (False, 7)
    assert "record 7" in verdict.text() and "edited" in verdict.text()


def test_a_deleted_record_is_named(app: Tactician, db_url: str) -> None:
    fill(app)
    drop_triggers(db_url)("DELETE FROM audit_log WHERE seq = 4", ())
    verdict = verify(app.store.audit_records())
    assert (verdict.ok, verdict.bad_seq) == (False, 4)
    assert "missing" in verdict.text()


def test_reordered_records_are_named(app: Tactician, db_url: str) -> None:
    fill(app)
    swap(drop_triggers(db_url), 5, 6)
    verdict = verify(app.store.audit_records())
    assert (verdict.ok, verdict.bad_seq) == (False, 5)


def test_an_inserted_record_breaks_the_link_after_it(app: Tactician, db_url: str) -> None:
    records = fill(app)
    run = drop_triggers(db_url)
    for seq in range(len(records), 4, -1):  # make room after record 4
        run("UPDATE audit_log SET seq = ? WHERE seq = ?", (seq + 1, seq))
    four = records[3]
    detail = json.dumps({"tasks": ["forged"]})
    digest = record_hash(5, four.at, "root", "task.cancelled", "forged", detail, four.hash)
    run(
        "INSERT INTO audit_log (seq, at, actor, action, subject, detail, prev_hash, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (5, four.at, "root", "task.cancelled", "forged", detail, four.hash, digest),
    )
    verdict = verify(app.store.audit_records())
    assert (verdict.ok, verdict.bad_seq) == (False, 6)  # the forged record itself links fine
    assert "inserted" in verdict.text()


def test_a_rewritten_tail_is_caught_by_the_anchor(app: Tactician, db_url: str) -> None:
    records = fill(app)
    anchor = app.store.audit_head()
    run = drop_triggers(db_url)
    prev = records[5].hash
    for record in records[6:]:  # edit record 7 and re-chain everything after it
        detail = '{"reason":"rewritten"}' if record.seq == 7 else record.detail
        digest = record_hash(
            record.seq, record.at, record.actor, record.action, record.subject, detail, prev
        )
        run(
            "UPDATE audit_log SET detail = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (detail, prev, digest, record.seq),
        )
        prev = digest
    assert verify(app.store.audit_records()).ok  # consistent inside...
    verdict = verify(app.store.audit_records(), anchor)
    assert (verdict.ok, verdict.bad_seq) == (False, anchor[0])  # ...but not with the anchor
    assert "anchor" in verdict.text()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "tactician"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_verifies_prints_the_head_and_exports(app: Tactician, db_url: str) -> None:
    records = fill(app)
    good = cli("audit", "verify", "--db", db_url)
    assert good.returncode == 0 and "intact" in good.stdout
    head = cli("audit", "head", "--db", db_url).stdout.strip()
    seq, digest = app.store.audit_head()
    assert head == f"{seq}:{digest}"
    assert cli("audit", "verify", "--db", db_url, "--anchor", head).returncode == 0
    lines = cli("audit", "export", "--db", db_url, "--since", "-1d").stdout.splitlines()
    exported = [json.loads(line) for line in lines]
    assert [e["seq"] for e in exported] == [r.seq for r in records]
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(exported))
    bad = cli("audit", "verify", "--db", db_url, "--anchor", "7:abc")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --anchor must look like")
    assert len(bad.stderr.strip().splitlines()) == 1
    drop_triggers(db_url)("DELETE FROM audit_log WHERE seq = 3", ())
    broken = cli("audit", "verify", "--db", db_url)
    assert broken.returncode == 1 and "broken at record 3" in broken.stdout
