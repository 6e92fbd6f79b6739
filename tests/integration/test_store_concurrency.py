"""The store contract with several connections at once: leadership, claims, races.

Two stores on one database stand for two processes (or machines). On PostgreSQL the races are
forced: a second connection holds a row lock while the store's transaction runs into it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from tactician.domain import Claim, KindSpec, NewTask, Result, TaskState
from tactician.errors import Conflict
from tactician.plan.capacity import plan_starts
from tactician.store.open import open_store
from tactician.store.protocol import Finish, ReapReport, TaskFilter
from tests.integration.driving import Opener, lock_is_free, stores_on

JOB = KindSpec("job")


@pytest.fixture
def pg_opener(pg_url: str) -> Iterator[Opener]:
    yield from stores_on(pg_url)


def ok(claim: Claim) -> Finish:
    return Finish(
        Result(claim.task_id, claim.token, True, 0.0, 0.01), claim.kind, claim.attempt, None
    )


# --- leadership -------------------------------------------------------------------------------


def test_only_one_planner_leads(opener: Opener) -> None:
    first, second = opener(), opener()
    assert first.try_lead("a", 5.0)
    assert not second.try_lead("b", 5.0)
    assert first.try_lead("a", 5.0)  # the leader renews
    assert not second.try_lead("b", 5.0)
    second.resign("b")  # resigning what one does not hold changes nothing
    assert not second.try_lead("b", 5.0)
    first.resign("a")
    assert second.try_lead("b", 5.0)
    assert not first.try_lead("a", 5.0)
    second.resign("b")
    assert first.try_lead("a", 5.0)
    first.resign("a")


def test_sqlite_leadership_lapses_after_its_ttl(sqlite_url: str) -> None:
    for open_ in stores_on(sqlite_url):
        first, second = open_(), open_()
        assert first.try_lead("a", 0.3)
        assert not second.try_lead("b", 0.3)
        time.sleep(0.35)  # a leader that stops renewing loses the lead
        assert second.try_lead("b", 5.0)
        assert not first.try_lead("a", 5.0)


def test_postgres_advisory_lock_decides_the_leader(pg_opener: Opener) -> None:
    first, second = pg_opener(), pg_opener()
    assert first.try_lead("a", 0.05)
    time.sleep(0.1)  # the row's ttl has passed, but the lock is still held
    assert not second.try_lead("b", 0.05)
    first.close()  # the process dies: its session, and so the lock, go with it
    assert second.try_lead("b", 5.0)
    third = pg_opener()
    assert not third.try_lead("c", 5.0)


# --- claims by several workers ----------------------------------------------------------------


def test_two_workers_never_claim_the_same_task(opener: Opener) -> None:
    first, second = opener(), opener()
    first.register_kinds([JOB])
    kinds = first.kinds()
    ids = first.submit([NewTask("job") for _ in range(50)], kinds)
    assert first.plan(plan_starts, kinds).started == 50

    taken: dict[str, list[str]] = {"w1": [], "w2": []}
    while True:
        a = first.claim("w1", ["job"], 7)
        b = second.claim("w2", ["job"], 5)
        taken["w1"] += [c.task_id for c in a]
        taken["w2"] += [c.task_id for c in b]
        if not a and not b:
            break
    assert not set(taken["w1"]) & set(taken["w2"])
    assert sorted(taken["w1"] + taken["w2"]) == sorted(ids)
    assert {t.worker_id for t in first.list_tasks(TaskFilter(state="running"))} == {"w1", "w2"}


def test_concurrent_claims_from_threads_are_disjoint(opener: Opener) -> None:
    workers = [opener() for _ in range(4)]
    workers[0].register_kinds([JOB])
    kinds = workers[0].kinds()
    ids = workers[0].submit([NewTask("job") for _ in range(200)], kinds)
    assert workers[0].plan(plan_starts, kinds).started == 200
    start = threading.Barrier(len(workers))

    def claim_all(index: int) -> list[str]:
        store, mine = workers[index], []
        start.wait()
        while claims := store.claim(f"w{index}", ["job"], 3):
            mine += [c.task_id for c in claims]
            time.sleep(0.002)  # runs what it claimed; a claim loop with no work in it
            # lets SQLite's first writer take every batch before the others' busy
            # handlers wake, and the test would no longer see them side by side
        return mine

    with ThreadPoolExecutor(len(workers)) as pool:
        results = list(pool.map(claim_all, range(len(workers))))
    every = [task_id for mine in results for task_id in mine]
    assert len(every) == len(set(every)) == 200
    assert set(every) == set(ids)
    assert sum(1 for mine in results if mine) >= 2  # they really ran side by side
    assert workers[1].counts() == {"running": 200}


def test_concurrent_submits_with_one_key_make_one_task(opener: Opener) -> None:
    stores = [opener() for _ in range(4)]
    stores[0].register_kinds([JOB])
    kinds = stores[0].kinds()
    start = threading.Barrier(len(stores))

    def submit(index: int) -> list[str]:
        start.wait()
        return stores[index].submit(
            [NewTask("job", {"by": index}, idempotency_key="once"), NewTask("job")], kinds
        )

    with ThreadPoolExecutor(len(stores)) as pool:
        results = list(pool.map(submit, range(len(stores))))
    assert len({ids[0] for ids in results}) == 1
    assert stores[0].counts() == {"ready": 1 + len(stores)}


def test_concurrent_planners_never_over_commit_a_pool(opener: Opener) -> None:
    planners = [opener() for _ in range(3)]
    planners[0].register_kinds([KindSpec("job", pool="p", units=1)])
    planners[0].set_pool("p", 3)
    kinds = planners[0].kinds()
    planners[0].submit([NewTask("job") for _ in range(30)], kinds)
    start = threading.Barrier(len(planners))

    def plan(index: int) -> int:
        start.wait()
        return sum(planners[index].plan(plan_starts, kinds).started for _ in range(5))

    with ThreadPoolExecutor(len(planners)) as pool:
        started = sum(pool.map(plan, range(len(planners))))
    assert started == 3
    assert planners[0].count_state("leased") == 3


def test_a_forked_child_does_not_keep_a_dead_parents_write_lock(sqlite_url: str) -> None:
    """A worker forks a runner, then dies inside a transaction: the SQLite write lock is free."""
    open_store(sqlite_url).close()  # migrated
    lock_file = sqlite_url.removeprefix("sqlite:///") + "-lock"
    read_end, write_end = os.pipe()
    worker = os.fork()
    if worker == 0:  # the worker: never returns into pytest
        try:
            store = open_store(sqlite_url)
            transaction = store._tx()
            transaction.__enter__()  # holds the write lock from here on
            assert not lock_is_free(lock_file)
            runner = os.fork()
            if runner == 0:
                time.sleep(30)  # a runner that outlives its worker
                os._exit(0)
            os.write(write_end, str(runner).encode())
        finally:
            os._exit(0)  # killed inside the transaction
    os.close(write_end)
    runner = int(os.read(read_end, 32) or b"0")
    os.close(read_end)
    os.waitpid(worker, 0)
    try:
        assert runner and os.kill(runner, 0) is None  # the runner lives on
        deadline = time.monotonic() + 2.0
        while not lock_is_free(lock_file):
            assert time.monotonic() < deadline, "the dead worker's runner holds the write lock"
            time.sleep(0.01)
        store = open_store(sqlite_url)
        try:
            store.register_kinds([JOB])
            assert store.submit([NewTask("job")], store.kinds())
        finally:
            store.close()
    finally:
        if runner:
            os.kill(runner, signal.SIGKILL)


# --- forced races on PostgreSQL ---------------------------------------------------------------


def _blocked_on_a_lock(admin: psycopg.Connection[Any]) -> bool:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    ).fetchone()
    return bool(row and row[0])


def _run_against_lock(
    pg_url: str, lock_sql: str, params: tuple[Any, ...], call: Callable[[], Any]
) -> Any:
    """Run `call` while another transaction has run `lock_sql` and not yet committed.

    The other transaction commits once `call` waits on its lock (or returns without waiting),
    which is the moment a real concurrent writer would commit."""
    with psycopg.connect(pg_url) as other, psycopg.connect(pg_url, autocommit=True) as admin:
        other.execute(lock_sql, params)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(call)
            deadline = time.monotonic() + 5.0
            while not future.done() and not _blocked_on_a_lock(admin):
                assert time.monotonic() < deadline, "the call neither returned nor waited"
                time.sleep(0.01)
            other.commit()
            return future.result(timeout=5.0)


def test_reaper_does_not_undo_a_finish_committed_meanwhile(pg_url: str, pg_opener: Opener) -> None:
    store = pg_opener(lease_seconds=0.1)
    store.register_kinds([JOB])
    kinds = store.kinds()
    [task_id] = store.submit([NewTask("job")], kinds)
    store.plan(plan_starts, kinds)
    [claim] = store.claim("w1", ["job"], 1)
    time.sleep(0.15)  # the lease expires just as the worker's result comes in

    # What finish() does for this result, in a transaction that commits while reap() runs.
    report = _run_against_lock(
        pg_url,
        "UPDATE tasks SET state = 'succeeded', lease_expires_at = NULL "
        "WHERE id = %s AND lease_token = %s AND state = 'running'",
        (task_id, claim.token),
        store.reap,
    )
    assert report == ReapReport()
    assert store.get(task_id).state is TaskState.SUCCEEDED
    assert [a.outcome for a in store.attempts(task_id)] == []


def test_cancel_does_not_undo_a_finish_committed_meanwhile(pg_url: str, pg_opener: Opener) -> None:
    store = pg_opener()
    store.register_kinds([JOB])
    kinds = store.kinds()
    [task_id] = store.submit([NewTask("job")], kinds)
    store.plan(plan_starts, kinds)  # leased: a worker claims it and finishes while we cancel

    def cancel() -> str:
        try:
            return str(store.cancel(task_id).state)
        except Conflict as exc:
            return f"conflict: {exc}"

    outcome = _run_against_lock(
        pg_url, "UPDATE tasks SET state = 'succeeded' WHERE id = %s", (task_id,), cancel
    )
    assert outcome.startswith("conflict")
    assert store.get(task_id).state is TaskState.SUCCEEDED


def test_retry_sees_a_retry_committed_meanwhile(pg_url: str, pg_opener: Opener) -> None:
    store = pg_opener()
    store.register_kinds([JOB])
    kinds = store.kinds()
    [task_id] = store.submit([NewTask("job")], kinds)
    store.cancel(task_id)

    def retry() -> str:
        try:
            return str(store.retry(task_id).state)
        except Conflict:
            return "conflict"

    outcome = _run_against_lock(
        pg_url, "UPDATE tasks SET state = 'ready' WHERE id = %s", (task_id,), retry
    )
    assert outcome == "conflict"  # one retry, not two
    assert store.get(task_id).state is TaskState.READY


def test_claim_and_finish_with_real_workers_interleaved(opener: Opener) -> None:
    """Two workers claim and finish in threads while a planner grants: every task runs once."""
    planner, *workers = (opener() for _ in range(3))
    planner.register_kinds([KindSpec("job", pool="p")])
    planner.set_pool("p", 5)
    kinds = planner.kinds()
    planner.submit([NewTask("job") for _ in range(60)], kinds)
    finished: list[list[str]] = [[], []]
    stop = threading.Event()

    def work(index: int) -> None:
        store = workers[index]
        while not stop.is_set():
            claims = store.claim(f"w{index}", ["job"], 2)
            if claims:
                assert all(store.finish(f"w{index}", [ok(c) for c in claims], kinds))
                finished[index] += [c.task_id for c in claims]
            else:
                time.sleep(0.002)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 10.0
        while planner.count_state("succeeded") < 60 and time.monotonic() < deadline:
            planner.plan(plan_starts, kinds)
            assert sum(p.used for p in planner.pools() if p.pool.name == "p") <= 5
            time.sleep(0.002)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    every = finished[0] + finished[1]
    assert len(every) == len(set(every)) == 60
    assert planner.counts() == {"succeeded": 60}
