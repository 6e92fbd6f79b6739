"""The decision service against a real store (SQLite and PostgreSQL): a ranker orders the
planner's pass and workers claim in that order; waiting tasks are read for `why`; a task is
reprioritised at once; bad input changes nothing."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import pytest

from tactician.decide.scorers import RankRequest, get_scorer
from tactician.domain import KindSpec, NewTask, Result, TaskState
from tactician.errors import Conflict, InvalidInput, NotFound
from tactician.govern.policy import FairShareSpec
from tactician.plan.capacity import CapacityView, plan_starts
from tactician.run.ranking import LiveRanker
from tactician.store.base import SqlStore
from tactician.store.protocol import Finish, ReadyRow

KIND = KindSpec("job", pool="p")


@pytest.fixture
def store(job_store: SqlStore) -> SqlStore:
    return job_store


def submit(store: SqlStore, **fields: object) -> str:
    task = NewTask(kind="job", **fields)  # type: ignore[arg-type]
    return store.submit([task], store.kinds())[0]


def test_the_ranker_orders_the_pass_and_workers_claim_in_that_order(store: SqlStore) -> None:
    now = time.time()
    # Due soonest but longest: wspt puts it last, earliest-deadline-first would put it first.
    long = submit(store, due_at=now + 100, estimate=500.0)
    short = submit(store, due_at=now + 300, estimate=5.0)
    middle = submit(store, due_at=now + 200, estimate=50.0)
    store.set_pool("p", 3)
    seen: list[Sequence[ReadyRow]] = []
    wspt = LiveRanker(get_scorer("wspt"))

    def ranker(rows: Sequence[ReadyRow], view: CapacityView, at: float) -> list[float]:
        seen.append(rows)
        return wspt(rows, view, at)

    report = store.plan(plan_starts, store.kinds(), ranker)
    assert report.started == 3
    assert {r.id for r in seen[0]} == {long, short, middle}
    assert [r.estimate for r in seen[0]] == [500.0, 50.0, 5.0]  # read earliest deadline first
    claims = store.claim("w1", ["job"], 1)
    claims += store.claim("w1", ["job"], 1)
    claims += store.claim("w1", ["job"], 1)
    assert [c.task_id for c in claims] == [short, middle, long]


def test_equal_ranks_keep_the_deadline_order(store: SqlStore) -> None:
    now = time.time()
    ids = [submit(store, due_at=now + 300 - 100 * i) for i in range(3)]
    store.set_pool("p", 3)
    store.plan(plan_starts, store.kinds(), lambda rows, view, at: [0.0] * len(rows))
    claimed = [store.claim("w1", ["job"], 1)[0].task_id for _ in ids]
    assert claimed == list(reversed(ids))


def test_a_scorer_that_gives_no_rank_does_not_stop_the_planner(store: SqlStore) -> None:
    """A NaN rank (a scorer's bug) would be stored as NULL and fail the planner's pass; the
    live ranker puts such tasks last instead, and the pass starts everything that fits."""
    ids = [submit(store) for _ in range(3)]
    store.set_pool("p", 3)

    class Broken:
        name = "broken"
        time_dependent = False

        def rank(self, request: RankRequest) -> np.ndarray:
            return np.array([math.nan, 1.0, 0.0][: len(request.rows)])

    report = store.plan(plan_starts, store.kinds(), LiveRanker(Broken()))  # type: ignore[arg-type]
    assert report.started == 3
    claimed = [store.claim("w1", ["job"], 1)[0].task_id for _ in ids]
    assert claimed == [ids[2], ids[1], ids[0]]


def test_waiting_lists_what_has_not_started(store: SqlStore) -> None:
    now = time.time()
    first = submit(store, due_at=now + 60)
    later = submit(store, release_at=now + 3600)
    rows = store.waiting(100)
    assert [r.id for r in rows] == [first, later]
    assert [r.state for r in rows] == ["ready", "pending"]
    assert rows[0].due_at == pytest.approx(now + 60)


def test_reprioritize_changes_weight_and_deadline_and_the_next_pass_sees_it(
    store: SqlStore,
) -> None:
    now = time.time()
    a = submit(store, due_at=now + 60)
    b = submit(store, due_at=now + 600)
    changed = store.reprioritize(b, weight=7.0, due_at=now + 10)
    assert changed.weight == 7.0
    assert changed.due_at == pytest.approx(now + 10)
    assert [r.id for r in store.waiting(10)] == [b, a]  # earliest deadline first, at once
    assert store.reprioritize(b, clear_due=True).due_at is None
    assert [r.id for r in store.waiting(10)] == [a, b]
    store.plan(plan_starts, store.kinds())
    assert store.claim("w1", ["job"], 1)[0].task_id == a


def test_bad_reprioritize_changes_nothing(store: SqlStore) -> None:
    task = submit(store, due_at=time.time() + 60, weight=2.0)
    before = store.get(task)
    for bad in ({"weight": -1.0}, {"weight": float("nan")}, {"due_at": float("inf")}, {}):
        with pytest.raises(InvalidInput):
            store.reprioritize(task, **bad)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        store.reprioritize("nope", weight=2.0)
    assert store.get(task) == before
    store.cancel(task)
    with pytest.raises(Conflict):
        store.reprioritize(task, weight=3.0)
    assert store.get(task).state is TaskState.CANCELLED
    assert store.get(task).weight == 2.0


def test_waiting_rows_carry_the_weight_of_their_dependents(store: SqlStore) -> None:
    parent = submit(store, weight=1.0)
    kinds = store.kinds()
    store.submit(
        [
            NewTask(kind="job", weight=2.0, depends_on=(parent,)),
            NewTask(kind="job", weight=3.0, depends_on=(parent,)),
        ],
        kinds,
    )
    rows = {r.id: r for r in store.waiting(10)}
    assert rows[parent].dependents == pytest.approx(5.0)
    assert sorted(r.dependents for r in rows.values()) == [0.0, 0.0, 5.0]


def test_with_max_wait_an_aged_wide_task_holds_its_pool_until_it_starts(store: SqlStore) -> None:
    """A bundle's objective.max_wait: a task released longer ago goes first and, if it does not
    fit, no other task starts in its pool, so that units come free together for it."""
    store.set_pool("p", 4)
    for _ in range(3):
        submit(store)
    assert store.plan(plan_starts, store.kinds()).started == 3
    running = store.claim("w1", ["job"], 3)
    now = time.time()
    wide = submit(store, resources={"p": 4}, release_at=now - 100.0, estimate=1.0)
    narrow = [submit(store, estimate=0.5) for _ in range(3)]
    ranker = LiveRanker(get_scorer("wspt"))  # by itself: the narrow tasks first
    ranker.use_policy("aging", get_scorer("wspt"), (), max_wait=30.0)
    held = store.plan(plan_starts, store.kinds(), ranker)
    assert held.started == 0  # one unit is free, and no narrow task takes it
    assert store.get(wide).state is TaskState.READY
    # Without the bound, the free unit goes to a narrow task at once.
    ranker.use_policy("no-aging", get_scorer("wspt"), ())
    assert store.plan(plan_starts, store.kinds(), ranker).started == 1
    ranker.use_policy("aging", get_scorer("wspt"), (), max_wait=30.0)
    taken = store.claim("w1", ["job"], 1)
    for claim in [*running, *taken]:
        done = Result(claim.task_id, claim.token, True, 0.0, 0.01)
        assert store.finish("w1", [Finish(done, claim.kind, claim.attempt, None)], store.kinds())
    # All four units are back: the wide task starts, and nothing beside it.
    assert store.plan(plan_starts, store.kinds(), ranker).started == 1
    assert store.get(wide).state is TaskState.LEASED
    assert sum(store.get(t).state is TaskState.READY for t in narrow) == 2


def test_fair_share_puts_the_tenant_that_used_less_first(store: SqlStore) -> None:
    """A bundle's objective.fair_share: the live ranker counts each tenant's unit-seconds from
    the outcomes it reads, and a tenant over its share slides back in the order."""
    store.set_pool("p", 2)
    heavy = [submit(store, tenant="a") for _ in range(2)]
    assert store.plan(plan_starts, store.kinds()).started == 2
    for claim in store.claim("w1", ["job"], 2):  # tenant a ran 2 x 100 s
        done = Result(claim.task_id, claim.token, True, time.time() - 100.0, 100.0)
        assert store.finish("w1", [Finish(done, claim.kind, claim.attempt, None)], store.kinds())
    first = submit(store, tenant="a")  # a's task came first: fifo alone runs it first
    second = submit(store, tenant="b")
    ranker = LiveRanker(get_scorer("fifo"), store=store)
    shares = FairShareSpec(shares={"a": 1.0, "b": 1.0}, weight=2.0)  # moves a 1.5 x the order
    ranker.use_policy("fair", get_scorer("fifo"), (), fair_share=shares)
    ranker.refresh(time.time())
    assert ranker.fair is not None and ranker.fair.factor("a", time.time()) < 0.5 < 1.0 == (
        ranker.fair.factor("b", time.time())
    )
    seen: list[Sequence[ReadyRow]] = []

    def watched(rows: Sequence[ReadyRow], view: CapacityView, at: float) -> list[float]:
        seen.append(rows)
        return ranker(rows, view, at)

    assert store.plan(plan_starts, store.kinds(), watched).started == 2
    claimed = [store.claim("w1", ["job"], 1)[0].task_id for _ in range(2)]
    assert claimed == [second, first]
    plain = LiveRanker(get_scorer("fifo"))(seen[0], CapacityView(pool_capacity={}), time.time())
    by_id = dict(zip([r.id for r in seen[0]], plain, strict=True))
    assert by_id[first] < by_id[second]  # without fair share, a's task goes first
    assert set(heavy).isdisjoint(claimed)
