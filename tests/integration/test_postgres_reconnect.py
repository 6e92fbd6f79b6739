"""PostgreSQL connections lost and found again: sessions terminated by the server (as a restart
or a network cut would end them), reconnection with backoff, leadership that does not outlive
its session, LISTEN issued again, and a worker that neither completes a task whose lease it
lost nor forgets one it claimed in a commit whose answer never came.

Sessions are ended with pg_terminate_backend, picked by application_name: the shared server
itself is never restarted (tests/e2e/test_failover.py restarts a private one).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tactician.app import Tactician
from tactician.domain import Claim, KindSpec, NewTask, Result
from tactician.errors import StoreUnavailable
from tactician.plan.capacity import plan_starts
from tactician.run.worker import Worker, WorkerOptions
from tactician.settings import Settings
from tactician.store.open import open_store
from tactician.store.postgres import CHANNEL_WORKERS, PostgresStore
from tactician.store.protocol import Finish

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]
JOB = KindSpec("job")


def named(url: str, name: str) -> str:
    return f"{url}?application_name={name}"


@pytest.fixture
def admin(pg_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        yield conn


def terminate(admin: psycopg.Connection, name: str) -> int:
    """End every session of this application name, as a server restart would; how many.

    Waits until each backend has exited (up to 5 s): a backend signalled but not yet gone
    still holds its advisory locks.
    """
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = %s",
        (name,),
    ).fetchall()
    assert all(gone for (gone,) in rows), f"a session of {name} outlived 5 s"
    return len(rows)


def open_pg(url: str, name: str, **settings: float) -> PostgresStore:
    store = open_store(named(url, name), Settings(db=url, **settings))  # type: ignore[arg-type]
    assert isinstance(store, PostgresStore)
    return store


def ok(claim: Claim) -> Finish:
    return Finish(Result(claim.task_id, claim.token, True, 0.0, 0.01), claim.kind, 1, None)


def test_an_ended_session_is_replaced_at_the_next_transaction(
    pg_url: str, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_pg(pg_url, "idle")
    try:
        store.register_kinds([JOB])
        assert terminate(admin, "idle") == 1
        caplog.set_level(logging.WARNING, "tactician.store")
        # BEGIN fails on the dead connection; nothing of the transaction reached the server,
        # so it runs again, at once, on a new connection.
        store.submit([NewTask("job")], store.kinds())
        assert store.counts() == {"ready": 1}
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 2, lines
        assert lines[0].startswith("database connection lost (terminating connection")
        assert lines[1].startswith("database connection back after")
    finally:
        store.close()


def test_a_transaction_cut_off_mid_way_is_not_run_again(
    pg_url: str, admin: psycopg.Connection
) -> None:
    store = open_pg(pg_url, "cut")
    try:
        store.register_kinds([JOB])
        (task_id,) = store.submit([NewTask("job")], store.kinds())
        with admin.transaction():
            admin.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE", (task_id,))
            errors: list[BaseException] = []

            def cancel() -> None:
                try:
                    store.cancel(task_id)
                except BaseException as exc:  # the thread hands it to the test
                    errors.append(exc)

            thread = threading.Thread(target=cancel)
            thread.start()
            wait_for_lock_wait(admin, "cut")
            terminate(admin, "cut")
            thread.join(10)
        assert len(errors) == 1 and isinstance(errors[0], StoreUnavailable), errors
        # The body had reached the server: the store did not run it again on its own.
        assert store.get(task_id).state == "ready"
        assert store.cancel(task_id).state == "cancelled"  # the caller may, and it works
    finally:
        store.close()


def wait_for_lock_wait(admin: psycopg.Connection, name: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        (waiting,) = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock'",
            (name,),
        ).fetchone() or (0,)
        if waiting:
            return
        time.sleep(0.01)
    raise AssertionError(f"{name} never waited for the row lock")


def test_reconnect_backs_off_logs_once_and_says_when_the_database_is_back(
    pg_url: str, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_pg(pg_url, "away")
    real_url = store.url
    try:
        store.url = "postgresql://postgres@127.0.0.1:1/nothing"  # a server that is down
        terminate(admin, "away")
        caplog.set_level(logging.DEBUG, "tactician.store")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.counts()
        assert time.monotonic() - started < 2.0  # a short-lived caller fails fast
        started = time.monotonic()
        assert not store.reconnect(within=1.5)
        assert 1.4 < time.monotonic() - started < 2.5
        attempts = [r for r in caplog.records if "reconnect attempt" in r.getMessage()]
        gaps = [b.created - a.created for a, b in itertools.pairwise(attempts)]
        # 0.1 s doubling, each wait 50-100 % of it: a handful of attempts, further apart
        # each time, never a tight loop.
        assert 3 <= len(attempts) <= 8, [r.getMessage() for r in attempts]
        assert gaps[-1] > gaps[0] and min(gaps) >= 0.04, gaps
        store.url = real_url
        assert store.reconnect(within=10.0)
        assert store.counts() == {}
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 2, warnings  # one line when it went, one when it came back
        assert warnings[0].startswith("database connection lost")
        assert warnings[1].startswith("database connection back after")
    finally:
        store.url = real_url
        store.close()


def test_a_leader_whose_session_ends_stops_granting_and_a_standby_takes_over(
    pg_url: str, admin: psycopg.Connection
) -> None:
    first = open_pg(pg_url, "first")
    second = open_pg(pg_url, "second")
    try:
        first.register_kinds([JOB])
        kinds = first.kinds()
        assert first.try_lead("first", 5.0)
        assert not second.try_lead("second", 5.0)
        first.submit([NewTask("job") for _ in range(3)], kinds)
        # Every session of `first` ends; its main connection comes back at the next
        # transaction, but the lock went with the old session.
        terminate(admin, "first")
        assert second.try_lead("second", 5.0)  # freed the moment the session ended
        with pytest.raises(StoreUnavailable, match="leader lock was lost"):
            first.plan(plan_starts, kinds)
        assert first.counts() == {"ready": 3}  # nothing granted by the old leader
        assert not first.try_lead("first", 5.0)  # it asks again, and stands by
        assert second.plan(plan_starts, kinds).started == 3
    finally:
        first.close()
        second.close()


def test_listen_is_issued_again_after_the_connection_comes_back(
    pg_url: str, admin: psycopg.Connection
) -> None:
    worker = open_pg(pg_url, "listener")
    planner = open_pg(pg_url, "granter")
    try:
        planner.register_kinds([JOB])
        kinds = planner.kinds()
        worker.listen(CHANNEL_WORKERS)
        assert terminate(admin, "listener") == 2  # the main and the listening session
        worker.wait_for_work(0.05)  # finds the listening connection dead
        assert worker.counts() == {}  # the main one is replaced, and LISTEN issued again
        planner.submit([NewTask("job")], kinds)

        def grant() -> None:
            time.sleep(0.2)
            assert planner.plan(plan_starts, kinds).started == 1

        thread = threading.Thread(target=grant)
        started = time.monotonic()
        thread.start()
        worker.wait_for_work(10.0)
        thread.join()
        assert time.monotonic() - started < 5.0  # woken by the NOTIFY, not the timeout
    finally:
        worker.close()
        planner.close()


def test_a_result_for_a_lease_lost_during_an_outage_is_refused(
    pg_url: str, admin: psycopg.Connection
) -> None:
    slow = open_pg(pg_url, "slow", lease_seconds=0.3)
    other = open_pg(pg_url, "other", lease_seconds=30.0)
    try:
        slow.register_kinds([JOB])
        kinds = slow.kinds()
        (task_id,) = slow.submit([NewTask("job")], kinds)
        other.plan(plan_starts, kinds)
        (old,) = slow.claim("w-slow", ["job"], 1)
        terminate(admin, "slow")  # the worker is cut off; its lease runs out meanwhile
        time.sleep(0.4)
        assert other.reap().returned == 1
        other.plan(plan_starts, kinds)
        (new,) = other.claim("w-other", ["job"], 1)
        assert new.token == old.token + 1
        assert slow.finish("w-slow", [ok(old)], kinds) == [False]  # after reconnecting
        assert other.get(task_id).state == "running"  # w-other's lease stands
        assert other.finish("w-other", [ok(new)], kinds) == [True]
        outcomes = [(a.worker_id, a.outcome) for a in other.attempts(task_id)]
        assert outcomes == [("w-slow", "lost"), ("w-other", "succeeded")]
    finally:
        slow.close()
        other.close()


# --- a real worker -------------------------------------------------------------------------


def note(path: str, key: str) -> None:
    with open(path, "a") as out:
        out.write(f"{key}\n")


def test_a_worker_adopts_a_claim_whose_commit_it_never_heard_of(
    pg_url: str, admin: psycopg.Connection, tmp_path: Path
) -> None:
    """The worker's claim committed, then the connection broke before the answer came: the
    task runs under the worker's lease, and its heartbeats would keep it there for ever. After
    the outage the worker finds it among the leases it holds, and runs it, once."""
    effects = tmp_path / "effects"
    app = Tactician(settings=Settings(db=named(pg_url, "worker"), lease_seconds=30.0))
    app.task(name="note")(note)
    helper = open_pg(pg_url, "helper")
    try:
        kinds = app.store.kinds()
        (orphan,) = helper.submit([NewTask("note", {"path": str(effects), "key": "o"})], kinds)
        helper.plan(plan_starts, kinds)
        # The claim the worker made and never heard back from.
        (claim,) = helper.claim("w-adopter", ["note"], 1)
        worker = Worker(
            app.store,
            app.kinds,
            app.handlers,
            WorkerOptions(heartbeat_every=0.2, poll_interval=0.01),
            30.0,
            worker_id="w-adopter",
        )

        def cut_during_a_heartbeat() -> None:
            # The worker's heartbeat waits for this row lock; its session ends while it
            # waits, so the heartbeat's outcome is unknown to it: an outage.
            with admin.transaction():
                admin.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE", (orphan,))
                wait_for_lock_wait(admin, "worker")
                terminate(admin, "worker")

        cutter = threading.Thread(target=cut_during_a_heartbeat)
        cutter.start()
        deadline = time.monotonic() + 20
        worker.run(lambda: helper.get(orphan).state.is_final or time.monotonic() > deadline)
        cutter.join(10)
        task = helper.get(orphan)
        assert task.state == "succeeded", task
        assert effects.read_text() == "o\n"  # run once
        attempts = [(a.attempt, a.token, a.worker_id, a.outcome) for a in helper.attempts(orphan)]
        assert attempts == [(1, claim.token, "w-adopter", "succeeded")]  # no extra attempt
    finally:
        helper.close()
        app.close()
