"""The store contract: every test runs on a real SQLite file and on a fresh PostgreSQL database.

Migrations, submitting (all-or-nothing, idempotency), the task state machine through
plan → claim → finish, fencing and the reaper, heartbeats, operator cancel and retry,
dependencies, listing, and schedule rows. Capacity and flow control are in test_store_flow.py,
several connections at once in test_store_concurrency.py.
"""

from __future__ import annotations

import time

import pytest

from tactician.domain import Claim, KindSpec, NewTask, RateLimit, Result, RetryPolicy, TaskState
from tactician.errors import Conflict, InvalidInput, NotFound, TacticianError, UnknownKind
from tactician.plan.capacity import plan_starts
from tactician.store.base import SqlStore
from tactician.store.open import open_store
from tactician.store.protocol import Finish, ReapReport, TaskFilter
from tests.integration.driving import Opener

LEASE = 0.3  # seconds: short enough to let leases expire inside a test
NOOP = KindSpec("noop")
ONCE = KindSpec("once", retry=RetryPolicy(max_attempts=1))


@pytest.fixture
def store(opener: Opener) -> SqlStore:
    return opener(lease_seconds=LEASE)


def register(store: SqlStore, *specs: KindSpec) -> dict[str, KindSpec]:
    store.register_kinds(list(specs) or [NOOP])
    return store.kinds()


def start(store: SqlStore, kinds: dict[str, KindSpec], worker: str = "w1") -> list[Claim]:
    """Grant capacity to what is ready, then claim all of it as `worker`."""
    store.plan(plan_starts, kinds)
    return store.claim(worker, sorted(kinds), 1000)


def ok(claim: Claim, duration: float = 0.01) -> Finish:
    return Finish(
        Result(claim.task_id, claim.token, True, 0.0, duration), claim.kind, claim.attempt, None
    )


def failed(claim: Claim, delay: float | None, error: str = "boom", **flags: bool) -> Finish:
    result = Result(
        claim.task_id,
        claim.token,
        False,
        0.0,
        0.01,
        error=error,
        traceback=f"Traceback: {error}",
        **flags,
    )
    return Finish(result, claim.kind, claim.attempt, delay)


def total(store: SqlStore) -> int:
    return sum(store.counts().values())


# --- migrations -------------------------------------------------------------------------------


def _migration_rows(store: SqlStore) -> list[tuple[int, str]]:
    with store._read() as cur:
        cur.execute("SELECT version, applied_at FROM schema_migrations ORDER BY version")
        return [(int(row[0]), row[1]) for row in cur.fetchall()]


def test_open_applies_every_migration_once(opener: Opener) -> None:
    first = opener()
    shipped = [version for version, _ in first._migrations()]
    assert shipped, "the package ships no migrations"
    rows = _migration_rows(first)
    assert [version for version, _ in rows] == shipped
    assert first.counts() == {}  # the tables exist and are empty

    kinds = register(first)
    [task_id] = first.submit([NewTask("noop")], kinds)
    first.close()

    again = opener()  # re-open: nothing is applied twice, nothing is lost
    assert _migration_rows(again) == rows
    assert again.get(task_id).state is TaskState.READY

    other = opener()  # a second store on the same database at the same time
    assert _migration_rows(other) == rows
    [second_id] = other.submit([NewTask("noop")], other.kinds())
    assert {t.id for t in again.list_tasks(TaskFilter())} == {task_id, second_id}


def test_kinds_round_trip_and_pools_are_checked(store: SqlStore) -> None:
    specs = [
        KindSpec(
            "py",
            pool="cpu",
            units=2,
            retry=RetryPolicy(max_attempts=7, initial_delay=0.5),
            timeout=12.5,
            concurrency_key="{customer}",
            rate=RateLimit(3.0, 5.0),
            max_concurrency=8,
            breaker_threshold=3,
            breaker_cooldown=9.0,
        ),
        KindSpec("hook", executor="http", url="https://api.example.com/hook"),
        KindSpec("sh", executor="shell", command=("echo", "hi")),
    ]
    store.register_kinds(specs)
    assert store.kinds() == {spec.name: spec for spec in specs}
    store.register_kinds([KindSpec("py", timeout=1.0)])  # registering again replaces
    assert store.kinds()["py"] == KindSpec("py", timeout=1.0)
    for name, capacity in (("", 1), ("cpu", -1)):
        with pytest.raises(InvalidInput):
            store.set_pool(name, capacity)
    assert store.pools() == []


def test_the_in_memory_store_runs_the_same_lifecycle() -> None:
    store = open_store("sqlite:///:memory:")
    try:
        kinds = register(store)
        [task_id] = store.submit([NewTask("noop")], kinds)
        [claim] = start(store, kinds)
        assert store.finish("w1", [ok(claim)], kinds) == [True]
        assert store.get(task_id).state is TaskState.SUCCEEDED
    finally:
        store.close()


# --- submitting -------------------------------------------------------------------------------


def test_submit_returns_time_sortable_ids_in_input_order(store: SqlStore) -> None:
    kinds = register(store)
    before = store.db_now()
    ids = store.submit([NewTask("noop", {"i": i}) for i in range(20)], kinds)
    after = store.db_now()
    assert len(set(ids)) == 20
    assert ids == sorted(ids), "ids of one batch must sort in submission order"
    for i, task_id in enumerate(ids):
        task = store.get(task_id)
        assert task.payload == {"i": i}
        assert before - 0.001 <= task.created_at <= after + 0.001  # the database's clock
        assert abs(int(task_id[:12], 16) / 1000 - task.created_at) < 0.002
    time.sleep(0.003)
    later = store.submit([NewTask("noop", {"i": i}) for i in range(3)], kinds)
    assert min(later) > max(ids)
    assert store.submit([], kinds) == []


def test_submit_takes_whole_numbers_and_fractions_in_one_batch(store: SqlStore) -> None:
    kinds = register(store)
    now = int(store.db_now())
    ids = store.submit(
        [
            NewTask("noop", weight=1, release_at=now - 5, due_at=now + 100, estimate=3),
            NewTask("noop", weight=2.5, release_at=now - 5.5, due_at=now + 99.5, estimate=0.5),
            NewTask("noop", tags=("a", "b"), tenant="t1", source="cron"),
        ],
        kinds,
    )
    first, second, third = (store.get(task_id) for task_id in ids)
    assert (first.weight, first.release_at, first.due_at, first.estimate) == (
        1.0,
        now - 5,
        now + 100,
        3.0,
    )
    assert (second.weight, second.estimate) == (2.5, 0.5)
    assert (third.tags, third.tenant, third.source, third.due_at) == (
        ("a", "b"),
        "t1",
        "cron",
        None,
    )
    assert (third.pool, third.units, third.target) == ("default", 1, "python:noop")


def _bad_tasks(now: float) -> dict[str, tuple[NewTask, type[TacticianError]]]:
    return {
        "unknown kind": (NewTask("nope"), UnknownKind),
        "due before release": (NewTask("noop", due_at=now - 60), InvalidInput),
        "payload not JSON": (NewTask("noop", {"when": {1, 2}}), InvalidInput),
        "payload NaN": (NewTask("noop", {"x": float("nan")}), InvalidInput),
        "unknown dependency": (NewTask("noop", depends_on=("0" * 32,)), InvalidInput),
        "two pools": (NewTask("noop", resources={"a": 1, "b": 1}), InvalidInput),
        "concurrency key field missing": (NewTask("keyed", {"other": 1}), InvalidInput),
    }


@pytest.mark.parametrize("case", sorted(_bad_tasks(0.0)))
def test_submit_with_one_bad_task_writes_nothing(store: SqlStore, case: str) -> None:
    kinds = register(store, NOOP, KindSpec("keyed", concurrency_key="{customer}"))
    [existing] = store.submit([NewTask("noop", idempotency_key="old")], kinds)
    bad, error = _bad_tasks(store.db_now())[case]
    batch = [
        NewTask("noop", {"n": 1}, idempotency_key="new-1"),
        bad,
        NewTask("keyed", {"customer": "acme"}, idempotency_key="new-2"),
    ]
    with pytest.raises(error) as raised:
        store.submit(batch, kinds)
    assert "\n" not in str(raised.value) and str(raised.value)
    assert store.counts() == {"ready": 1}
    assert [t.id for t in store.list_tasks(TaskFilter())] == [existing]
    # The keys of the refused batch were not taken: the good tasks go in afterwards.
    new_ids = store.submit([batch[0], batch[2]], kinds)
    assert existing not in new_ids and len(set(new_ids)) == 2
    assert store.counts() == {"ready": 3}


def test_idempotency_key_gives_the_same_task(opener: Opener) -> None:
    store = opener()
    kinds = register(store)
    [first] = store.submit([NewTask("noop", {"v": 1}, idempotency_key="k1")], kinds)
    [again] = store.submit([NewTask("noop", {"v": 2}, idempotency_key="k1")], kinds)
    assert again == first
    assert store.get(first).payload == {"v": 1}  # the first one wins
    assert total(store) == 1

    ids = store.submit(
        [
            NewTask("noop", {"v": 3}, idempotency_key="k2"),
            NewTask("noop", {"v": 4}, idempotency_key="k2"),
            NewTask("noop", {"v": 5}, idempotency_key="k1"),
            NewTask("noop", {"v": 6}),
        ],
        kinds,
    )
    assert ids[0] == ids[1] and ids[2] == first
    assert len({ids[0], ids[2], ids[3]}) == 3
    assert store.get(ids[0]).payload == {"v": 3}
    assert total(store) == 3

    other = opener()  # another connection sees the same keys
    assert other.submit([NewTask("noop", idempotency_key="k1")], kinds) == [first]
    assert other.submit([NewTask("noop", idempotency_key="k2")], kinds) == [ids[0]]
    assert total(store) == 3


def test_idempotent_duplicate_does_not_add_dependencies(store: SqlStore) -> None:
    kinds = register(store)
    parent, other = store.submit([NewTask("noop"), NewTask("noop")], kinds)
    [child] = store.submit([NewTask("noop", depends_on=(parent,), idempotency_key="c")], kinds)
    store.submit([NewTask("noop", depends_on=(other,), idempotency_key="c")], kinds)
    assert store.get(child).depends_on == (parent,)


def test_pending_or_ready_by_release_time_and_dependencies(store: SqlStore) -> None:
    kinds = register(store)
    now = store.db_now()
    ready, past, later = store.submit(
        [
            NewTask("noop"),
            NewTask("noop", release_at=now - 10),
            NewTask("noop", release_at=now + 0.3),
        ],
        kinds,
    )
    [child] = store.submit([NewTask("noop", depends_on=(ready,))], kinds)
    state = {task_id: store.get(task_id).state for task_id in (ready, past, later, child)}
    assert state == {ready: "ready", past: "ready", later: "pending", child: "pending"}
    assert store.get(later).release_at == pytest.approx(now + 0.3)

    assert store.promote() == 0
    assert store.get(later).state is TaskState.PENDING
    time.sleep(0.35)
    assert store.promote() == 1
    assert store.get(later).state is TaskState.READY
    assert store.get(child).state is TaskState.PENDING  # its dependency has not succeeded


def test_claims_come_in_deadline_then_submission_order(store: SqlStore) -> None:
    kinds = register(store)
    now = store.db_now()
    late = store.submit([NewTask("noop", due_at=now + 200) for _ in range(3)], kinds)
    time.sleep(0.002)  # ids carry milliseconds
    early = store.submit([NewTask("noop", due_at=now + 100)], kinds)
    time.sleep(0.002)
    also_early = store.submit([NewTask("noop", due_at=now + 100)], kinds)
    undated = store.submit([NewTask("noop") for _ in range(3)], kinds)
    store.plan(plan_starts, kinds)
    [first] = store.claim("w1", ["noop"], 1)
    rest = store.claim("w1", ["noop"], 10)  # a batch comes in the planner's order too
    order = [first.task_id] + [claim.task_id for claim in rest]
    assert order == early + also_early + late + undated


# --- the state machine ------------------------------------------------------------------------


def test_plan_claim_finish_succeeds(store: SqlStore) -> None:
    kinds = register(store)
    [task_id] = store.submit([NewTask("noop", {"x": 1})], kinds)

    before = store.db_now()
    report = store.plan(plan_starts, kinds)
    assert (report.considered, report.started) == (1, 1)
    leased = store.get(task_id)
    assert leased.state is TaskState.LEASED and leased.attempt == 0
    assert leased.lease_expires_at is not None
    assert leased.lease_expires_at >= before + store.settings.dispatch_timeout - 0.001

    before = store.db_now()
    [claim] = store.claim("w1", ["noop"], 10)
    after = store.db_now()
    assert claim == Claim(task_id, "noop", '{"x":1}', 1, 1)
    running = store.get(task_id)
    assert running.state is TaskState.RUNNING and running.worker_id == "w1"
    assert running.lease_token == 1 and running.attempt == 1
    assert running.lease_expires_at is not None
    assert before + LEASE - 0.001 <= running.lease_expires_at <= after + LEASE + 0.001
    assert store.claim("w2", ["noop"], 10) == []  # nothing else to take

    assert store.finish("w1", [ok(claim)], kinds) == [True]
    done = store.get(task_id)
    assert done.state is TaskState.SUCCEEDED
    assert done.finished_at is not None and done.finished_at >= after - 0.001
    assert done.lease_expires_at is None
    [attempt] = store.attempts(task_id)
    assert (attempt.attempt, attempt.token, attempt.worker_id, attempt.outcome) == (
        1,
        1,
        "w1",
        "succeeded",
    )
    assert store.counts() == {"succeeded": 1}
    # Finishing twice is refused: the lease is gone.
    assert store.finish("w1", [ok(claim)], kinds) == [False]
    assert len(store.attempts(task_id)) == 1


def test_claim_takes_only_its_kinds_and_its_limit(store: SqlStore) -> None:
    kinds = register(store, NOOP, KindSpec("other"))
    store.submit([NewTask("noop") for _ in range(5)] + [NewTask("other")], kinds)
    store.plan(plan_starts, kinds)
    assert store.claim("w1", [], 10) == []
    assert len(store.claim("w1", ["noop"], 3)) == 3
    assert len(store.claim("w1", ["noop"], 3)) == 2
    [other] = store.claim("w1", ["other", "noop"], 3)
    assert other.kind == "other"


def test_failure_with_retry_delay_waits_then_runs_again(store: SqlStore) -> None:
    kinds = register(store)
    [task_id] = store.submit([NewTask("noop")], kinds)
    [claim] = start(store, kinds)
    before = store.db_now()
    assert store.finish("w1", [failed(claim, 0.2, "first try")], kinds) == [True]
    after = store.db_now()

    waiting = store.get(task_id)
    assert waiting.state is TaskState.RETRY_WAIT
    assert waiting.run_at is not None
    assert before + 0.2 - 0.001 <= waiting.run_at <= after + 0.2 + 0.001  # the DB's clock
    assert waiting.last_error == "first try"
    assert waiting.finished_at is None and waiting.lease_expires_at is None
    assert start(store, kinds) == []  # not ready yet
    assert store.promote() == 0

    time.sleep(0.25)
    assert store.promote() == 1
    assert store.get(task_id).state is TaskState.READY
    [again] = start(store, kinds, worker="w2")
    assert (again.token, again.attempt) == (2, 2)
    assert store.finish("w2", [ok(again)], kinds) == [True]

    done = store.get(task_id)
    assert done.state is TaskState.SUCCEEDED
    assert done.last_error is None and done.last_traceback is None
    assert [
        (a.attempt, a.token, a.worker_id, a.outcome, a.error) for a in store.attempts(task_id)
    ] == [
        (1, 1, "w1", "failed", "first try"),
        (2, 2, "w2", "succeeded", None),
    ]


def test_failure_without_retry_is_a_dead_letter(store: SqlStore) -> None:
    kinds = register(store)
    failing, slow = store.submit([NewTask("noop"), NewTask("noop")], kinds)
    claims = {c.task_id: c for c in start(store, kinds)}
    accepted = store.finish(
        "w1",
        [
            failed(claims[failing], None, "ValueError: bad"),
            failed(claims[slow], None, "timed out after 300 s", timed_out=True),
        ],
        kinds,
    )
    assert accepted == [True, True]
    dead = store.get(failing)
    assert dead.state is TaskState.DEAD
    assert dead.last_error == "ValueError: bad"
    assert dead.last_traceback == "Traceback: ValueError: bad"
    assert dead.finished_at is not None and dead.run_at is None
    assert [a.outcome for a in store.attempts(failing)] == ["failed"]
    assert [a.outcome for a in store.attempts(slow)] == ["timeout"]
    assert {t.id for t in store.list_tasks(TaskFilter(state="dead"))} == {failing, slow}
    assert store.promote() == 0 and start(store, kinds) == []  # dead stays dead


def test_a_failed_attempt_of_a_task_asked_to_cancel_is_not_retried(store: SqlStore) -> None:
    kinds = register(store)
    [task_id] = store.submit([NewTask("noop")], kinds)
    [claim] = start(store, kinds)
    store.cancel(task_id)
    assert store.finish("w1", [failed(claim, 0.0, "boom")], kinds) == [True]
    task = store.get(task_id)
    assert task.state is TaskState.CANCELLED and task.run_at is None
    assert task.finished_at is not None and task.last_error == "boom"
    assert [a.outcome for a in store.attempts(task_id)] == ["failed"]
    assert store.promote() == 0


# --- fencing and the reaper -------------------------------------------------------------------


def _expire_and_reap(store: SqlStore) -> ReapReport:
    time.sleep(LEASE + 0.05)
    return store.reap()


def test_expired_lease_is_reaped_and_the_stale_result_refused(store: SqlStore) -> None:
    kinds = register(store)
    [task_id] = store.submit([NewTask("noop")], kinds)
    [old] = start(store, kinds, worker="w1")
    assert store.reap() == ReapReport()  # the lease is still good

    assert _expire_and_reap(store) == ReapReport(returned=1)
    back = store.get(task_id)
    assert back.state is TaskState.READY and back.attempt == 1 and back.lease_expires_at is None
    assert back.last_error is not None and "w1" in back.last_error
    [lost] = store.attempts(task_id)
    assert (lost.attempt, lost.token, lost.worker_id, lost.outcome) == (1, old.token, "w1", "lost")

    [new] = start(store, kinds, worker="w2")
    assert new.token == old.token + 1 and new.attempt == 2

    # The first worker comes back from a pause: its results are refused and change nothing.
    assert store.finish("w1", [ok(old)], kinds) == [False]
    assert store.finish("w1", [failed(old, None)], kinds) == [False]
    still = store.get(task_id)
    assert still.state is TaskState.RUNNING and still.worker_id == "w2"
    assert still.lease_token == new.token and still.last_traceback is None
    assert [a.outcome for a in store.attempts(task_id)] == ["lost"]
    assert store.targets() == []

    assert store.finish("w2", [ok(new)], kinds) == [True]
    assert store.get(task_id).state is TaskState.SUCCEEDED
    assert [a.outcome for a in store.attempts(task_id)] == ["lost", "succeeded"]


def test_without_fencing_the_stale_result_is_accepted(opener: Opener) -> None:
    store = opener(lease_seconds=LEASE, fencing=False)
    kinds = register(store)
    [task_id] = store.submit([NewTask("noop")], kinds)
    [old] = start(store, kinds, worker="w1")
    assert _expire_and_reap(store).returned == 1
    [new] = start(store, kinds, worker="w2")
    assert new.token != old.token
    # The check is what refuses a stale token: without it, w1 overwrites w2's lease.
    assert store.finish("w1", [ok(old)], kinds) == [True]
    assert store.get(task_id).state is TaskState.SUCCEEDED
    # The attempts table shows what happened: the "lost" attempt did finish after all.
    assert store.finish("w2", [ok(new)], kinds) == [True]
    attempts = [(a.token, a.worker_id, a.outcome) for a in store.attempts(task_id)]
    assert attempts == [(old.token, "w1", "succeeded"), (new.token, "w2", "succeeded")]


def test_reap_when_attempts_are_exhausted_is_dead(store: SqlStore) -> None:
    kinds = register(store, ONCE)
    [task_id] = store.submit([NewTask("once")], kinds)
    [claim] = start(store, kinds)
    assert _expire_and_reap(store) == ReapReport(dead=1)
    dead = store.get(task_id)
    assert dead.state is TaskState.DEAD and dead.finished_at is not None
    assert dead.last_error is not None and "attempt 1 of 1" in dead.last_error
    assert [a.outcome for a in store.attempts(task_id)] == ["lost"]
    assert store.finish("w1", [ok(claim)], kinds) == [False]


def test_reap_of_a_task_asked_to_cancel_is_cancelled(store: SqlStore) -> None:
    kinds = register(store)
    [task_id] = store.submit([NewTask("noop")], kinds)
    start(store, kinds)
    store.cancel(task_id)
    assert _expire_and_reap(store) == ReapReport(cancelled=1)
    assert store.get(task_id).state is TaskState.CANCELLED


def test_db_clock_is_consistent(opener: Opener) -> None:
    first, second = opener(), opener()
    a = first.db_now()
    b = second.db_now()
    c = first.db_now()
    assert a <= b <= c and c - a < 1.0
    assert abs(a - time.time()) < 5.0  # the same machine here; only a sanity check
    time.sleep(0.02)
    assert first.db_now() - c >= 0.015


# --- heartbeats -------------------------------------------------------------------------------


def test_heartbeat_extends_the_lease(store: SqlStore) -> None:
    kinds = register(store)
    ids = store.submit([NewTask("noop"), NewTask("noop")], kinds)
    claims = start(store, kinds, worker="w1")
    held = {c.task_id: c.token for c in claims}
    assert set(held) == set(ids)

    deadline = time.monotonic() + 2.5 * LEASE
    while time.monotonic() < deadline:
        reply = store.heartbeat("w1")
        assert reply.held == held and reply.cancel == frozenset()
        assert store.reap() == ReapReport()
        time.sleep(LEASE / 6)
    assert all(store.get(task_id).state is TaskState.RUNNING for task_id in ids)

    other = store.heartbeat("w2")  # another worker's heartbeat neither holds nor extends these
    assert other.held == {} and other.cancel == frozenset()
    assert _expire_and_reap(store).returned == 2
    assert store.heartbeat("w1").held == {}


# --- operators: cancel and retry -------------------------------------------------------------


def test_cancel_running_asks_the_worker_and_final_is_a_conflict(store: SqlStore) -> None:
    kinds = register(store)
    [task_id] = store.submit([NewTask("noop")], kinds)
    [claim] = start(store, kinds)
    asked = store.cancel(task_id)
    assert asked.state is TaskState.RUNNING and asked.cancel_requested
    reply = store.heartbeat("w1")
    assert reply.cancel == {task_id} and reply.held == {task_id: claim.token}
    result = failed(claim, None, "cancelled by an operator", cancelled=True)
    assert store.finish("w1", [result], kinds) == [True]
    done = store.get(task_id)
    assert done.state is TaskState.CANCELLED
    assert [a.outcome for a in store.attempts(task_id)] == ["cancelled"]
    assert store.targets() == []  # a cancel says nothing about the target's health
    with pytest.raises(Conflict):
        store.cancel(task_id)


def test_cancel_of_a_task_not_running_is_immediate_and_retry_brings_it_back(
    store: SqlStore,
) -> None:
    kinds = register(store, NOOP, KindSpec("idle"))
    [retrying] = store.submit([NewTask("noop")], kinds)
    [claim] = start(store, kinds)
    store.finish("w1", [failed(claim, 60.0)], kinds)
    [leased] = store.submit([NewTask("idle")], kinds)
    store.plan(plan_starts, kinds)
    now = store.db_now()
    ready, pending = store.submit([NewTask("noop"), NewTask("noop", release_at=now + 60)], kinds)
    expected = {
        ready: TaskState.READY,
        pending: TaskState.PENDING,
        retrying: TaskState.RETRY_WAIT,
        leased: TaskState.LEASED,
    }
    assert {task_id: store.get(task_id).state for task_id in expected} == expected

    for task_id in expected:
        cancelled = store.cancel(task_id)
        assert cancelled.state is TaskState.CANCELLED
        assert cancelled.finished_at is not None and cancelled.lease_expires_at is None
        with pytest.raises(Conflict):
            store.cancel(task_id)
    assert store.counts() == {"cancelled": 4}
    assert store.claim("w1", ["idle"], 10) == []  # a cancelled grant cannot be claimed
    assert all(pool.used == 0 for pool in store.pools())

    again = store.retry(retrying)
    assert again.state is TaskState.READY and again.finished_at is None
    assert again.attempt == 1
    with pytest.raises(Conflict):
        store.retry(retrying)  # ready: neither dead nor cancelled
    # A retried task still waits for its release time.
    assert store.retry(pending).state is TaskState.PENDING
    [claim] = start(store, kinds)
    assert (claim.task_id, claim.attempt) == (retrying, 2)
    with pytest.raises(Conflict):
        store.retry(retrying)  # running


def test_retry_gives_a_dead_task_one_more_attempt(store: SqlStore) -> None:
    kinds = register(store, ONCE)
    [task_id] = store.submit([NewTask("once")], kinds)
    [claim] = start(store, kinds)
    store.finish("w1", [failed(claim, None)], kinds)
    assert store.get(task_id).state is TaskState.DEAD

    again = store.retry(task_id)
    assert again.state is TaskState.READY and again.finished_at is None
    [second] = start(store, kinds)
    assert (second.attempt, second.token) == (2, 2)
    # One more attempt, not more: losing this lease makes it dead again.
    assert _expire_and_reap(store) == ReapReport(dead=1)
    store.retry(task_id)
    [third] = start(store, kinds)
    assert store.finish("w1", [ok(third)], kinds) == [True]
    with pytest.raises(Conflict):
        store.retry(task_id)  # succeeded
    assert [a.outcome for a in store.attempts(task_id)] == ["failed", "lost", "succeeded"]


def test_unknown_ids_are_not_found(store: SqlStore) -> None:
    register(store)
    for call in (store.get, store.cancel, store.retry):
        with pytest.raises(NotFound, match="no task has id"):
            call("0" * 32)
    assert store.attempts("0" * 32) == []


# --- dependencies -----------------------------------------------------------------------------


def test_child_waits_for_its_parent_to_succeed(store: SqlStore) -> None:
    kinds = register(store)
    [parent] = store.submit([NewTask("noop")], kinds)
    [child] = store.submit([NewTask("noop", depends_on=(parent,))], kinds)
    [grandchild] = store.submit([NewTask("noop", depends_on=(child, parent))], kinds)
    assert store.get(grandchild).depends_on == tuple(sorted((child, parent)))
    listed = {t.id: t.depends_on for t in store.list_tasks(TaskFilter())}
    assert listed == {parent: (), child: (parent,), grandchild: tuple(sorted((child, parent)))}

    [claim] = start(store, kinds)
    assert claim.task_id == parent
    assert store.promote() == 0
    assert store.get(child).state is TaskState.PENDING
    store.finish("w1", [ok(claim)], kinds)
    assert store.promote() == 1
    assert store.get(child).state is TaskState.READY
    assert store.get(grandchild).state is TaskState.PENDING
    [claim] = start(store, kinds)
    store.finish("w1", [ok(claim)], kinds)
    store.promote()
    assert store.get(grandchild).state is TaskState.READY


def test_dead_parent_kills_its_descendants(store: SqlStore) -> None:
    kinds = register(store)
    [parent, bystander] = store.submit([NewTask("noop"), NewTask("noop")], kinds)
    [child] = store.submit([NewTask("noop", depends_on=(parent,))], kinds)
    [grandchild] = store.submit([NewTask("noop", depends_on=(child,))], kinds)
    [unrelated] = store.submit([NewTask("noop", depends_on=(bystander,))], kinds)
    claims = {c.task_id: c for c in start(store, kinds)}
    store.finish("w1", [failed(claims[parent], None)], kinds)

    assert store.promote() == 2
    child_task, grandchild_task = store.get(child), store.get(grandchild)
    assert child_task.state is TaskState.DEAD and grandchild_task.state is TaskState.DEAD
    assert child_task.last_error == f"dependency {parent} did not succeed"
    assert grandchild_task.last_error == f"dependency {child} did not succeed"
    assert child_task.finished_at is not None
    assert store.get(unrelated).state is TaskState.PENDING  # its parent is still running

    # Retrying the child does not let it run before its dependency succeeds.
    assert store.retry(child).state is TaskState.PENDING
    store.promote()
    assert store.get(child).state is TaskState.DEAD
    store.retry(parent)
    [claim] = start(store, kinds)
    store.finish("w1", [ok(claim)], kinds)
    store.retry(child)
    store.promote()
    assert store.get(child).state is TaskState.READY


def test_cancelled_parent_kills_its_children(store: SqlStore) -> None:
    kinds = register(store)
    now = store.db_now()
    [parent] = store.submit([NewTask("noop", release_at=now + 60)], kinds)
    [child] = store.submit([NewTask("noop", depends_on=(parent,))], kinds)
    store.cancel(parent)
    store.promote()
    assert store.get(child).state is TaskState.DEAD


# --- reading ----------------------------------------------------------------------------------


def test_list_tasks_filters_and_pages(store: SqlStore) -> None:
    kinds = register(store, NOOP, KindSpec("other"))
    ids = store.submit(
        [NewTask("noop", source="api") for _ in range(5)]
        + [NewTask("other", source="cron") for _ in range(3)],
        kinds,
    )
    store.plan(plan_starts, kinds)
    [claim] = store.claim("w1", ["other"], 1)
    store.finish("w1", [ok(claim)], kinds)

    everything = store.list_tasks(TaskFilter())
    assert [t.id for t in everything] == sorted(ids)
    assert {t.id for t in store.list_tasks(TaskFilter(kind="other"))} == set(ids[5:])
    assert {t.id for t in store.list_tasks(TaskFilter(source="api"))} == set(ids[:5])
    assert [t.id for t in store.list_tasks(TaskFilter(state="succeeded"))] == [claim.task_id]
    assert store.list_tasks(TaskFilter(state="succeeded", kind="noop")) == []

    pages, after = [], None
    while True:
        page = store.list_tasks(TaskFilter(limit=3, after_id=after))
        if not page:
            break
        assert len(page) <= 3
        pages.append([t.id for t in page])
        after = page[-1].id
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [task_id for page in pages for task_id in page] == sorted(ids)

    with pytest.raises(InvalidInput, match="unknown state"):
        store.list_tasks(TaskFilter(state="nope"))
    for limit in (0, 10_001):
        with pytest.raises(InvalidInput):
            store.list_tasks(TaskFilter(limit=limit))

    assert store.counts() == {"succeeded": 1, "leased": 7}
    assert store.count_state("leased") == 7


# --- schedule rows ----------------------------------------------------------------------------


def test_schedule_rows(store: SqlStore) -> None:
    kinds = register(store)
    assert store.schedules() == []
    now = store.db_now()
    store.save_schedule("nightly", {"cron": "0 3 * * *", "kind": "noop"}, paused=False)
    [row] = store.schedules()
    assert (row.name, row.spec, row.paused, row.buffered_tick) == (
        "nightly",
        {"cron": "0 3 * * *", "kind": "noop"},
        False,
        None,
    )
    assert row.last_tick is not None and abs(row.last_tick - now) < 1.0

    store.save_schedule("nightly", {"cron": "0 4 * * *", "kind": "noop"}, paused=True)
    store.save_schedule("hourly", {"cron": "0 * * * *", "kind": "noop"}, paused=False)
    hourly, nightly = store.schedules()
    assert hourly.name == "hourly"
    assert nightly.spec["cron"] == "0 4 * * *" and nightly.paused
    assert nightly.last_tick == row.last_tick  # saving again keeps the schedule's progress

    store.set_schedule_paused("nightly", False)
    store.advance_schedule("nightly", now + 3600, now + 7200)
    nightly = store.schedules()[1]
    assert not nightly.paused
    assert (nightly.last_tick, nightly.buffered_tick) == (now + 3600, now + 7200)
    store.advance_schedule("nightly", now + 7200, None)
    assert store.schedules()[1].buffered_tick is None

    done, waiting = store.submit(
        [
            NewTask("noop", schedule="nightly"),
            NewTask("noop", schedule="nightly", release_at=now + 60),
        ],
        kinds,
    )
    store.submit([NewTask("noop", schedule="hourly")], kinds)
    claims = {c.task_id: c for c in start(store, kinds)}
    store.finish("w1", [ok(claims[done])], kinds)
    assert store.schedule_unfinished("nightly") == [waiting]
    assert store.schedule_unfinished("never") == []

    store.delete_schedule("nightly")
    assert [r.name for r in store.schedules()] == ["hourly"]
    for call in (
        lambda: store.set_schedule_paused("nightly", True),
        lambda: store.delete_schedule("nightly"),
        lambda: store.advance_schedule("nightly", now, None),
    ):
        with pytest.raises(NotFound, match="nightly"):
            call()


# --- outcomes: the training data of the predictors ----------------------------------------------


def test_outcomes_are_finished_attempts_with_what_was_known_at_submission(
    store: SqlStore,
) -> None:
    kinds = register(store)
    now = store.db_now()
    delivered, flaky, stopped, waiting = store.submit(
        [
            NewTask(
                "noop",
                {"zone": "north", "km": 3.5},
                due_at=now + 600,
                weight=2.0,
                estimate=40.0,
                tenant="acme",
            ),
            NewTask("noop", {"zone": "south"}),
            NewTask("noop"),
            NewTask("noop", release_at=now + 3600),
        ],
        kinds,
    )
    assert store.outcomes() == []
    claims = {c.task_id: c for c in start(store, kinds)}
    assert set(claims) == {delivered, flaky, stopped}

    def result(claim: Claim, ok: bool, **flags: bool) -> Result:
        began = store.db_now() - 2.0  # the worker's clock: it started two seconds ago
        return Result(
            claim.task_id, claim.token, ok, began, 2.0, error=None if ok else "x", **flags
        )

    store.finish("w1", [Finish(result(claims[delivered], True), "noop", 1, None)], kinds)
    time.sleep(0.01)
    store.finish("w1", [Finish(result(claims[flaky], False), "noop", 1, 0.0)], kinds)
    time.sleep(0.01)
    store.cancel(stopped)
    store.finish(
        "w1", [Finish(result(claims[stopped], False, cancelled=True), "noop", 1, None)], kinds
    )
    store.promote()
    [again] = start(store, kinds, worker="w2")
    assert again.task_id == flaky
    time.sleep(0.01)
    store.finish("w2", [Finish(result(again, True), "noop", 2, None)], kinds)

    rows = store.outcomes()
    # Oldest first; the cancelled attempt and the task that never ran are not outcomes.
    assert [(r.task_id, r.attempt, r.outcome, r.failed) for r in rows] == [
        (delivered, 1, "succeeded", False),
        (flaky, 1, "failed", True),
        (flaky, 2, "succeeded", False),
    ]
    assert waiting not in {r.task_id for r in rows}
    first = rows[0]
    assert first.kind == "noop" and first.payload == {"zone": "north", "km": 3.5}
    assert (first.due_at, first.weight, first.estimate) == (now + 600, 2.0, 40.0)
    assert (first.pool, first.units, first.tenant) == ("default", 1, "acme")
    assert first.created_at <= first.release_at <= first.started_at + 2.0
    assert (
        rows[1].due_at is None and rows[1].estimate is None and rows[1].payload == {"zone": "south"}
    )
    for row in rows:
        assert 1.9 <= row.finished_at - row.started_at <= 5.0
    assert [r.finished_at for r in rows] == sorted(r.finished_at for r in rows)

    # The latest `limit`, still oldest first; `since` keeps those finished at or after it.
    assert [(r.task_id, r.attempt) for r in store.outcomes(limit=2)] == [(flaky, 1), (flaky, 2)]
    assert [(r.task_id, r.attempt) for r in store.outcomes(since=rows[1].finished_at)] == [
        (flaky, 1),
        (flaky, 2),
    ]
    assert store.outcomes(since=rows[2].finished_at + 1.0) == []
    for limit in (0, 1_000_001):
        with pytest.raises(InvalidInput, match="limit"):
            store.outcomes(limit=limit)
    with pytest.raises(InvalidInput, match="since"):
        store.outcomes(since=float("nan"))


@pytest.mark.parametrize("blocker", ["pool", "key"])
def test_a_backlog_that_cannot_start_does_not_hide_the_tasks_behind_it(
    opener: Opener, blocker: str
) -> None:
    """The earliest-due batch of a pass is all one full pool's (or one busy key's) tasks: the
    tasks of other pools still start on the next pass."""
    store = opener(plan_batch=10)
    if blocker == "pool":
        crowded = KindSpec("crowded", pool="narrow")
        store.set_pool("narrow", 1)
    else:
        crowded = KindSpec("crowded", concurrency_key="{customer}")
    kinds = register(store, crowded, KindSpec("other", pool="wide"))
    now = time.time()
    big = [NewTask("crowded", {"customer": "big"}, due_at=now + 100 + i) for i in range(40)]
    store.submit(big, kinds)
    store.submit([NewTask("other", due_at=now + 3600 + i) for i in range(5)], kinds)
    for _ in range(3):
        store.plan(plan_starts, kinds)
    leased = [t.kind for t in store.list_tasks(TaskFilter(state=TaskState.LEASED))]
    assert sorted(leased) == ["crowded"] + ["other"] * 5


def test_purge_removes_what_ended_before_the_cutoff_and_keeps_the_rest(store: SqlStore) -> None:
    kinds = register(store)
    due = time.time() + 3600
    old_ok, old_dead, parent = store.submit(
        [NewTask("noop", idempotency_key="k-ok", due_at=due), NewTask("noop"), NewTask("noop")],
        kinds,
    )
    (child,) = store.submit([NewTask("noop", depends_on=(parent,))], kinds)
    claims = {c.task_id: c for c in start(store, kinds)}
    assert set(claims) == {old_ok, old_dead, parent}
    dead = failed(claims[old_dead], None, retryable=False)
    done = [ok(claims[old_ok]), ok(claims[parent]), dead]
    assert all(store.finish("w1", done, kinds))
    store.promote()  # the child is ready now (it runs, unfinished): its parent stays
    time.sleep(0.01)
    cutoff = store.db_now()
    (recent,) = store.submit([NewTask("noop")], kinds)
    later = {c.task_id: c for c in start(store, kinds)}
    assert set(later) == {recent, child}
    assert store.finish("w1", [ok(later[recent])], kinds)  # ended after the cutoff: it stays

    assert store.purge(cutoff, dry_run=True) == 2
    assert total(store) == 5  # a dry run changes nothing
    counted = store.metrics_snapshot()
    assert store.purge(cutoff) == 2
    after = store.metrics_snapshot()  # the counters of /metrics never go back
    assert (after.attempts, after.retries, after.deadlines) == (
        counted.attempts,
        counted.retries,
        counted.deadlines,
    )
    assert after.deadlines[("default", "met")] == 1
    assert after.run_seconds["noop"][0] == counted.run_seconds["noop"][0] == 3
    assert after.run_seconds["noop"][1] == pytest.approx(counted.run_seconds["noop"][1])
    assert sum(after.tasks.values()) == 3
    for gone in (old_ok, old_dead):
        with pytest.raises(NotFound):
            store.get(gone)
        assert store.attempts(gone) == []
    assert {store.get(t).state for t in (parent, recent)} == {TaskState.SUCCEEDED}
    assert not store.get(child).state.is_final
    # Once the child has ended too (after the cutoff), its parent still stays: a retry of the
    # child must see what the parent did.
    assert store.finish("w1", [ok(later[child])], kinds)
    assert store.purge(cutoff, dry_run=True) == 0
    assert store.purge(cutoff) == 0  # nothing more; recorded all the same
    purged = [r for r in store.audit_records() if r.action == "tasks.purged"]
    assert [r.details["count"] for r in purged] == [2, 0]
    assert store.purge(store.db_now() + 1) == 3  # parent and child go together
    assert total(store) == 0
    (again,) = store.submit([NewTask("noop", idempotency_key="k-ok")], kinds)
    assert again != old_ok  # the key is free again
