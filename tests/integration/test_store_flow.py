"""The store contract, capacity and flow control: what plan() grants, on SQLite and PostgreSQL.

Pools are never over-committed, a concurrency key runs one task at a time, rate limits, circuit
breakers and adaptive concurrency hold, and grants no worker takes are taken back.
"""

from __future__ import annotations

import math
import time

import pytest

from tactician.domain import Claim, KindSpec, NewTask, Pool, RateLimit, Result, TaskState
from tactician.plan.capacity import plan_starts
from tactician.store.base import SqlStore
from tactician.store.protocol import Finish, ReapReport, TaskFilter
from tests.integration.driving import Opener


@pytest.fixture
def store(opener: Opener) -> SqlStore:
    return opener()


def register(store: SqlStore, *specs: KindSpec) -> dict[str, KindSpec]:
    store.register_kinds(list(specs))
    return store.kinds()


def plan(store: SqlStore, kinds: dict[str, KindSpec]) -> int:
    return store.plan(plan_starts, kinds).started


def finish(
    store: SqlStore,
    kinds: dict[str, KindSpec],
    claim: Claim,
    *,
    ok: bool = True,
    overloaded: bool = False,
    duration: float = 0.01,
) -> None:
    result = Result(
        claim.task_id,
        claim.token,
        ok,
        0.0,
        duration,
        error=None if ok else "boom",
        overloaded=overloaded,
    )
    delay = None if ok else 60.0  # failures wait out of the way in retry_wait
    assert store.finish("w1", [Finish(result, claim.kind, claim.attempt, delay)], kinds) == [True]


def active_units(store: SqlStore, pool: str) -> int:
    """Units leased or running, counted from the tasks themselves."""
    return sum(
        task.units
        for state in ("leased", "running")
        for task in store.list_tasks(TaskFilter(state=state, limit=10_000))
        if task.pool == pool
    )


def usage(store: SqlStore, pool: str) -> tuple[int, int, int, int]:
    [row] = [p for p in store.pools() if p.pool.name == pool]
    return row.used, row.ready, row.leased, row.running


# --- pools ------------------------------------------------------------------------------------


def test_a_pool_is_never_over_committed(store: SqlStore) -> None:
    kinds = register(
        store, KindSpec("small", pool="gpu", units=1), KindSpec("big", pool="gpu", units=2)
    )
    store.set_pool("gpu", 3)
    now = store.db_now()
    ids = store.submit(
        [NewTask("big" if i % 2 else "small", due_at=now + 100 + i) for i in range(10)]
        + [NewTask("small", resources={"gpu": 2}, due_at=now + 200)],
        kinds,
    )
    assert store.get(ids[-1]).units == 2  # resources given with the task win over the kind's
    assert [p.pool for p in store.pools()] == [Pool("gpu", 3)]
    assert usage(store, "gpu") == (0, 11, 0, 0)

    peak = 0
    running: list[Claim] = []
    for _ in range(40):
        plan(store, kinds)
        used = active_units(store, "gpu")
        assert used <= 3
        assert usage(store, "gpu")[0] == used
        peak = max(peak, used)
        running += store.claim("w1", ["small", "big"], 100)
        if not running:
            break
        finish(store, kinds, running.pop(0))  # finishing frees its units for the next plan
    assert peak == 3
    assert store.counts() == {"succeeded": 11}
    assert usage(store, "gpu") == (0, 0, 0, 0)


def test_pool_usage_and_a_full_pool_blocks_with_a_reason(store: SqlStore) -> None:
    kinds = register(store, KindSpec("job", pool="trucks", units=2), KindSpec("free"))
    store.set_pool("trucks", 4)
    ids = store.submit([NewTask("job") for _ in range(3)] + [NewTask("free")], kinds)
    report = store.plan(plan_starts, kinds)
    assert (report.considered, report.started) == (4, 3)
    assert set(report.blocked.values()) == {"pool trucks is full"}
    store.claim("w1", ["job"], 1)
    pools = {p.pool.name: p for p in store.pools()}
    assert pools["trucks"].pool == Pool("trucks", 4)
    assert (pools["trucks"].used, pools["trucks"].ready) == (4, 1)
    assert (pools["trucks"].leased, pools["trucks"].running) == (1, 1)
    assert pools["default"].pool == Pool("default", None)  # undeclared: unbounded
    assert store.get(ids[3]).state is TaskState.LEASED

    store.set_pool("trucks", 8)  # more capacity: the waiting task fits now
    assert plan(store, kinds) == 1
    store.set_pool("trucks", 0)
    assert usage(store, "trucks")[0] == 6


# --- concurrency keys -------------------------------------------------------------------------


def test_one_active_task_per_concurrency_key(store: SqlStore) -> None:
    kinds = register(store, KindSpec("sync", concurrency_key="{customer}"))
    customers = ["acme", "acme", "acme", "globex", "globex"]
    ids = store.submit([NewTask("sync", {"customer": c}) for c in customers], kinds)
    assert store.get(ids[0]).concurrency_key == "sync:acme"

    report = store.plan(plan_starts, kinds)
    assert report.started == 2
    assert "concurrency key sync:acme is busy" in report.blocked.values()
    assert plan(store, kinds) == 0

    done = 0
    while True:
        active = [t for s in ("leased", "running") for t in store.list_tasks(TaskFilter(state=s))]
        keys = [t.concurrency_key for t in active]
        assert len(keys) == len(set(keys))  # never two with one key
        claims = store.claim("w1", ["sync"], 10)
        if not claims and not active:
            break
        for claim in claims:
            finish(store, kinds, claim)
            done += 1
        plan(store, kinds)
    assert done == 5 and store.counts() == {"succeeded": 5}


# --- rate limits ------------------------------------------------------------------------------


def test_rate_limit_grants_the_burst_then_refills_by_time(opener: Opener) -> None:
    store, other = opener(), opener()
    kinds = register(store, KindSpec("api", rate=RateLimit(per_second=4.0, burst=2.0)))
    assert kinds["api"].rate == RateLimit(4.0, 2.0)  # kept through the kinds table
    store.submit([NewTask("api") for _ in range(6)], kinds)

    first = store.plan(plan_starts, kinds)
    assert first.started == 2
    assert "rate limit of api" in first.blocked.values()
    assert plan(other, kinds) == 0  # the bucket lives in the database, not in the planner
    time.sleep(0.3)  # 1.2 tokens flow in
    assert plan(other, kinds) == 1
    assert plan(store, kinds) == 0
    time.sleep(0.55)  # 2.2 + 0.2 left over, but at most a burst of 2 is held
    assert plan(store, kinds) == 2
    assert store.counts() == {"leased": 5, "ready": 1}


# --- circuit breakers -------------------------------------------------------------------------


def test_circuit_breaker_opens_then_lets_one_probe_through(store: SqlStore) -> None:
    kinds = register(store, KindSpec("flaky", breaker_threshold=2, breaker_cooldown=0.3))
    target = kinds["flaky"].target
    store.submit([NewTask("flaky") for _ in range(8)], kinds)
    assert plan(store, kinds) == 8
    claims = store.claim("w1", ["flaky"], 8)

    finish(store, kinds, claims[0], ok=False)
    [state] = store.targets()
    assert (state.target, state.breaker, state.consecutive_failures) == (target, "closed", 1)
    for claim in claims[1:6]:
        finish(store, kinds, claim)  # a success resets the count
    assert store.targets()[0].consecutive_failures == 0
    finish(store, kinds, claims[6], ok=False)
    before = store.db_now()
    finish(store, kinds, claims[7], ok=False)
    [state] = store.targets()
    assert (state.breaker, state.consecutive_failures) == ("open", 2)
    assert state.opened_at is not None and state.opened_at >= before - 0.001

    store.submit([NewTask("flaky") for _ in range(3)], kinds)
    report = store.plan(plan_starts, kinds)
    assert report.started == 0
    assert any(target in reason for reason in report.blocked.values())

    time.sleep(0.35)  # the cooldown passes: exactly one probe
    assert plan(store, kinds) == 1
    assert store.targets()[0].breaker == "half_open"
    assert plan(store, kinds) == 0
    [probe] = store.claim("w1", ["flaky"], 10)
    finish(store, kinds, probe, ok=False)  # the probe fails: open again, a new cooldown
    [state] = store.targets()
    assert state.breaker == "open" and state.opened_at is not None
    assert state.opened_at > before
    assert plan(store, kinds) == 0

    time.sleep(0.35)
    assert plan(store, kinds) == 1
    [probe] = store.claim("w1", ["flaky"], 10)
    finish(store, kinds, probe)  # the probe succeeds: closed
    [state] = store.targets()
    assert (state.breaker, state.consecutive_failures, state.opened_at) == ("closed", 0, None)
    assert plan(store, kinds) == 1  # the last waiting task
    assert store.counts()["leased"] == 1


def test_a_breaker_of_one_target_does_not_block_another(store: SqlStore) -> None:
    kinds = register(
        store,
        KindSpec("flaky", breaker_threshold=1, breaker_cooldown=60),
        KindSpec("fine", breaker_threshold=1),
    )
    store.submit([NewTask("flaky"), NewTask("flaky"), NewTask("fine")], kinds)
    store.plan(plan_starts, kinds)
    finish(store, kinds, store.claim("w1", ["flaky"], 1)[0], ok=False)
    store.submit([NewTask("flaky"), NewTask("fine")], kinds)
    assert plan(store, kinds) == 1
    assert {t.kind for t in store.list_tasks(TaskFilter(state="ready"))} == {"flaky"}


def test_grants_not_yet_claimed_are_taken_back_when_the_breaker_opens(store: SqlStore) -> None:
    kinds = register(store, KindSpec("flaky", breaker_threshold=2, breaker_cooldown=60))
    store.submit([NewTask("flaky") for _ in range(6)], kinds)
    assert plan(store, kinds) == 6  # a burst, all granted before anything failed
    first, second = store.claim("w1", ["flaky"], 2)
    finish(store, kinds, first, ok=False)
    assert store.count_state("leased") == 4  # one failure: the grants stand
    finish(store, kinds, second, ok=False)
    assert store.targets()[0].breaker == "open"
    assert store.counts() == {"retry_wait": 2, "ready": 4}
    assert store.claim("w1", ["flaky"], 10) == []  # the rest of the burst does not run
    assert plan(store, kinds) == 0


# --- adaptive concurrency ---------------------------------------------------------------------


def test_adaptive_concurrency_shrinks_on_overload_and_grows_back(store: SqlStore) -> None:
    kinds = register(store, KindSpec("api", max_concurrency=4, breaker_threshold=0))
    target = kinds["api"].target
    store.submit([NewTask("api") for _ in range(40)], kinds)

    def in_flight() -> int:
        return sum(store.count_state(s) for s in ("leased", "running"))

    # The ceiling holds from the first plan on, before any result is known.
    assert plan(store, kinds) == 4
    claims = store.claim("w1", ["api"], 3)
    assert in_flight() == 4 and len(claims) == 3

    finish(store, kinds, claims[0], ok=False, overloaded=True)
    [state] = store.targets()
    assert state.target == target and state.limit == pytest.approx(4 * 0.7)
    assert state.breaker == "closed"  # threshold 0: no breaker
    # The grant no worker took yet is taken back: 2 running is the new limit, floor(2.8).
    assert store.count_state("leased") == 0
    assert plan(store, kinds) == 0
    finish(store, kinds, claims[1], ok=False, overloaded=True)
    assert store.targets()[0].limit == pytest.approx(4 * 0.7 * 0.7)
    finish(store, kinds, claims[2])
    limit = store.targets()[0].limit
    assert limit == pytest.approx(1.96 + 1 / 1.96)
    assert plan(store, kinds) == 2

    grew = [limit]
    for _ in range(30):
        claims = store.claim("w1", ["api"], 10)
        for claim in claims:
            finish(store, kinds, claim)
        limit = store.targets()[0].limit
        assert limit is not None
        grew.append(limit)
        if limit >= 4:
            break
        plan(store, kinds)
        assert in_flight() <= math.floor(limit)
    assert grew == sorted(grew)  # successes only raise it
    assert store.targets()[0].limit == 4.0  # back to the ceiling, never above it
    assert plan(store, kinds) == 4


# --- dispatch timeout -------------------------------------------------------------------------


def test_a_grant_no_worker_takes_goes_back_to_ready(opener: Opener) -> None:
    store = opener(dispatch_timeout=0.2)
    kinds = register(store, KindSpec("job", pool="p"))
    store.set_pool("p", 1)
    [first, second] = store.submit([NewTask("job"), NewTask("job")], kinds)
    assert plan(store, kinds) == 1
    assert store.reap() == ReapReport()
    assert usage(store, "p") == (1, 1, 1, 0)

    time.sleep(0.25)
    assert store.reap() == ReapReport(undispatched=1)
    back = store.get(first)
    assert back.state is TaskState.READY and back.attempt == 0 and back.lease_expires_at is None
    assert store.attempts(first) == []  # no attempt was made
    assert usage(store, "p") == (0, 2, 0, 0)
    assert plan(store, kinds) == 1
    [claim] = store.claim("w1", ["job"], 10)
    assert claim.attempt == 1
    time.sleep(0.25)
    assert store.reap() == ReapReport()  # a claimed task is not taken back by this timeout
    assert store.get(claim.task_id).state is TaskState.RUNNING
    assert claim.task_id in (first, second)


def test_plan_keeps_at_most_dispatch_ahead_grants(opener: Opener) -> None:
    store = opener(dispatch_ahead=3)
    kinds = register(store, KindSpec("job"))
    store.submit([NewTask("job") for _ in range(5)], kinds)
    assert plan(store, kinds) == 3
    assert plan(store, kinds) == 0
    store.claim("w1", ["job"], 2)
    assert plan(store, kinds) == 2
