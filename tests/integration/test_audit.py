"""The audit chain on both databases: real operations append records, triggers refuse UPDATE
and DELETE, and each way of tampering (edit, delete, reorder, insert; a rewritten or truncated
tail, caught by an anchor) is found by `verify`, which names the record. Also through the CLI:
`audit verify [--anchor]`, `audit head`, `audit export`."""

from __future__ import annotations

import itertools
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import tactician.cli.govern as cli_govern
from tactician.app import Tactician
from tactician.cli.main import main
from tactician.domain import KindSpec, NewTask
from tactician.govern.audit import GENESIS, AuditRecord, Verdict, record_hash, verify
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
    """Records of real operations: ten with the default six tasks."""
    ids = [app.submit_many([NewTask("job", {"n": i})], actor=ADMIN)[0] for i in range(tasks)]
    app.store.cancel(ids[0], ADMIN, "not needed")
    app.store.reprioritize(ids[1], weight=3.0, actor=ADMIN, reason="customer called")
    app.gate.create_token(ADMIN, "ci", Role.OPERATOR)
    app.store.hold(ids[-1], ADMIN, "waiting for a window")
    return list(app.store.audit_records())


def raw(db_url: str) -> Callable[[str, tuple[Any, ...]], None]:
    """Run SQL around the store, as the database's owner (on PostgreSQL the superuser of
    TACTICIAN_TEST_PG, `postgres` by default, who may also drop the triggers)."""
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
    if db_url.startswith("sqlite:///"):
        refused: type[Exception] = sqlite3.IntegrityError
        changes = [("UPDATE", "UPDATE audit_log SET actor = 'mallory' WHERE seq = 1")]
    else:
        import psycopg.errors

        refused = psycopg.errors.RaiseException
        changes = [
            ("UPDATE", "UPDATE audit_log SET actor = 'mallory' WHERE seq = 1"),
            ("TRUNCATE", "TRUNCATE audit_log"),
        ]
    changes += [
        ("UPDATE", "UPDATE audit_log SET seq = seq + 100"),
        ("DELETE", "DELETE FROM audit_log WHERE seq = 3"),
        ("DELETE", "DELETE FROM audit_log"),
    ]
    for operation, sql in changes:
        with pytest.raises(refused, match=f"append-only: {operation} refused"):
            run(sql, ())
    assert list(app.store.audit_records()) == records
    assert verify(records).ok


def swap(run: Callable[[str, tuple[Any, ...]], None], a: int, b: int) -> None:
    run("UPDATE audit_log SET seq = -1 WHERE seq = ?", (a,))
    run("UPDATE audit_log SET seq = ? WHERE seq = ?", (a, b))
    run("UPDATE audit_log SET seq = ? WHERE seq = -1", (b,))


def assert_broken_at(verdict: Verdict, seq: int, why: str) -> None:
    assert (verdict.ok, verdict.bad_seq) == (False, seq)
    assert verdict.text().startswith(f"audit chain broken at record {seq}: ")
    assert why in verdict.text()


def test_an_edited_record_is_named(app: Tactician, db_url: str) -> None:
    assert len(fill(app)) == 10
    drop_triggers(db_url)('UPDATE audit_log SET detail = \'{"reason":"ok"}\' WHERE seq = 7', ())
    assert_broken_at(verify(app.store.audit_records()), 7, "edited")


def test_a_deleted_record_is_named(app: Tactician, db_url: str) -> None:
    fill(app)
    drop_triggers(db_url)("DELETE FROM audit_log WHERE seq = 4", ())
    assert_broken_at(verify(app.store.audit_records()), 4, "record 4 is missing")


def test_reordered_records_are_named(app: Tactician, db_url: str) -> None:
    fill(app)
    swap(drop_triggers(db_url), 5, 6)
    assert_broken_at(verify(app.store.audit_records()), 5, "reordered")


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
    after = list(app.store.audit_records())
    assert [r.subject for r in after[3:6]] == [four.subject, "forged", records[4].subject]
    assert after[5].hash == records[4].hash  # moved up one place, otherwise untouched
    # The forged record itself links fine to the one before it; the next one does not.
    assert_broken_at(verify(after), 6, "inserted")


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
    assert anchor[0] == 10
    verdict = verify(app.store.audit_records(), anchor)  # ...but not with the anchor
    assert_broken_at(verdict, 10, "differs from the anchor")
    assert verify(app.store.audit_records(), (6, records[5].hash)).ok  # before the rewrite


def test_a_truncated_tail_is_caught_by_the_anchor(app: Tactician, db_url: str) -> None:
    fill(app)
    anchor = app.store.audit_head()
    drop_triggers(db_url)("DELETE FROM audit_log WHERE seq > 8", ())
    assert verify(app.store.audit_records()).ok  # a shorter chain is a chain...
    assert_broken_at(verify(app.store.audit_records(), anchor), 10, "truncated")


def test_the_anchor_of_an_empty_chain_holds(app: Tactician) -> None:
    anchor = app.store.audit_head()
    assert anchor == (0, GENESIS)
    assert verify(app.store.audit_records(), anchor).ok
    fill(app, tasks=2)
    assert verify(app.store.audit_records(), anchor).ok


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Ran]:
    """`tactician ARGS` through `main()` in this process (a process costs over a second here);
    the apps a command opens are closed after it."""

    def run(*args: str) -> Ran:
        opened: list[Tactician] = []

        def open_app(db: str | None) -> Tactician:
            opened.append(real_open_app(db))
            return opened[-1]

        real_open_app = cli_govern.open_app
        code: int | str | None = 0
        with monkeypatch.context() as patch:
            patch.setattr(cli_govern, "open_app", open_app)
            patch.setattr(sys, "argv", ["tactician", *args])
            try:
                main()
            except SystemExit as exc:
                code = exc.code
            finally:
                for opened_app in opened:
                    opened_app.close()
        captured = capsys.readouterr()
        return Ran(code if isinstance(code, int) else 1, captured.out, captured.err)

    return run


def tactician_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "tactician"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_verifies_prints_the_head_and_exports(
    app: Tactician, db_url: str, cli: Callable[..., Ran]
) -> None:
    records = fill(app)
    good = cli("audit", "verify", "--db", db_url)
    assert good.returncode == 0 and "intact: 10 records" in good.stdout, good.stderr
    head = cli("audit", "head", "--db", db_url).stdout.strip()
    seq, digest = app.store.audit_head()
    assert head == f"{seq}:{digest}"
    anchored = cli("audit", "verify", "--db", db_url, "--anchor", head)
    assert anchored.returncode == 0 and "intact" in anchored.stdout, anchored.stderr
    lines = cli("audit", "export", "--db", db_url, "--since", "-1d").stdout.splitlines()
    exported = [json.loads(line) for line in lines]
    assert exported == [r.to_json() for r in records]  # one line a record, in seq order
    assert [e["seq"] for e in exported] == list(range(1, 11))
    assert exported[0]["prev_hash"] == GENESIS and exported[-1]["hash"] == digest
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(exported))
    bad = cli("audit", "verify", "--db", db_url, "--anchor", "7:abc")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --anchor must look like")
    assert len(bad.stderr.strip().splitlines()) == 1
    run = drop_triggers(db_url)
    run("DELETE FROM audit_log WHERE seq = 10", ())  # the tail: only the anchor notices
    assert cli("audit", "verify", "--db", db_url).returncode == 0
    truncated = cli("audit", "verify", "--db", db_url, "--anchor", head)
    assert truncated.returncode == 1 and "broken at record 10" in truncated.stdout
    run("DELETE FROM audit_log WHERE seq = 3", ())
    broken = tactician_process("audit", "verify", "--db", db_url)  # the real command's exit code
    assert broken.returncode == 1 and "broken at record 3" in broken.stdout, broken.stderr


HASH = "ab" * 32


@pytest.mark.parametrize(
    "anchor",
    [
        pytest.param("7:abc", id="short-hash"),
        pytest.param("", id="empty"),
        pytest.param(f"7{HASH}", id="no-colon"),
        pytest.param(f"x:{HASH}", id="seq-not-a-number"),
        pytest.param(f"-1:{HASH}", id="negative-seq"),
        pytest.param(f"7:{HASH}0", id="long-hash"),
        pytest.param(f"7:{'z' * 64}", id="hash-not-hex"),
        pytest.param(f"\u00b2:{HASH}", id="seq-superscript-two"),
    ],
)
def test_a_bad_anchor_is_one_line_and_exit_2(
    sqlite_url: str, cli: Callable[..., Ran], anchor: str
) -> None:
    """Checked before the database is read, so on SQLite only."""
    app = Tactician(settings=Settings(db=sqlite_url))
    app.store.register_kinds([KindSpec("job", pool="p")])
    fill(app, tasks=6)
    app.close()
    ran = cli("audit", "verify", "--db", sqlite_url, "--anchor", anchor)
    assert (ran.returncode, ran.stdout) == (2, ""), ran
    assert ran.stderr == "error: --anchor must look like SEQ:HASH (from `tactician audit head`)\n"
