"""PostgreSQL wake-ups: a submit NOTIFYs the planner, a grant NOTIFYs the workers."""

from __future__ import annotations

import threading
import time

from tactician.domain import KindSpec, NewTask
from tactician.plan.capacity import plan_starts
from tactician.store.open import open_store
from tactician.store.postgres import CHANNEL_PLANNER, CHANNEL_WORKERS, PostgresStore


def _woken_within(listener: PostgresStore, action: threading.Thread, timeout: float) -> float:
    started = time.monotonic()
    action.start()
    listener.wait_for_work(timeout)
    action.join()
    return time.monotonic() - started


def test_submit_wakes_the_planner_and_a_grant_wakes_the_workers(pg_url: str) -> None:
    planner = open_store(pg_url)
    worker = open_store(pg_url)
    client = open_store(pg_url)
    assert isinstance(planner, PostgresStore) and isinstance(worker, PostgresStore)
    try:
        client.register_kinds([KindSpec("noop")])
        kinds = client.kinds()
        planner.listen(CHANNEL_PLANNER)
        worker.listen(CHANNEL_WORKERS)

        def submit() -> None:
            time.sleep(0.2)
            client.submit([NewTask("noop")], kinds)

        # Without the NOTIFY the wait would last the whole 10 s.
        assert _woken_within(planner, threading.Thread(target=submit), 10.0) < 5.0

        def grant() -> None:
            time.sleep(0.2)
            assert planner.plan(plan_starts, kinds).started == 1

        assert _woken_within(worker, threading.Thread(target=grant), 10.0) < 5.0
        # Nothing more happens: the next wait runs to its timeout.
        started = time.monotonic()
        worker.wait_for_work(0.3)
        assert time.monotonic() - started >= 0.25
    finally:
        for store in (planner, worker, client):
            store.close()
