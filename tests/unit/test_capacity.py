"""plan_starts: capacity-aware choice of what starts now, best first, skip and continue."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tactician.decide.shares import AGED
from tactician.plan.capacity import HOLD_BELOW, Candidate, CapacityView, KindLimits, plan_starts
from tactician.plan.flow import Bucket

NOW = 1_000.0


def task(
    task_id: str,
    *,
    kind: str = "k",
    pool: str = "default",
    units: int = 1,
    key: str | None = None,
    target: str = "python:k",
    rank: float = 0.0,
) -> Candidate:
    return Candidate(task_id, kind, pool, units, key, target, rank)


def view(**fields: Any) -> CapacityView:
    fields.setdefault("pool_capacity", {})
    return CapacityView(**fields)


def ids(candidates: list[Candidate]) -> list[str]:
    return [c.id for c in candidates]


def test_unbounded_pools_start_everything_in_order() -> None:
    plan = plan_starts([task("a"), task("b"), task("c")], view(), NOW, 10)
    assert ids(plan.starts) == ["a", "b", "c"]
    assert plan.blocked == {}


def test_limit_caps_the_starts() -> None:
    plan = plan_starts([task(str(i)) for i in range(10)], view(), NOW, 3)
    assert ids(plan.starts) == ["0", "1", "2"]
    assert plan_starts([task("a")], view(), NOW, 0).starts == []


def test_pool_units_are_never_over_committed() -> None:
    capacity = view(pool_capacity={"gpu": 4}, pool_used={"gpu": 1})
    tasks = [task("a", pool="gpu", units=2), task("b", pool="gpu", units=2), task("c", pool="gpu")]
    plan = plan_starts(tasks, capacity, NOW, 10)
    assert ids(plan.starts) == ["a", "c"]  # 1 + 2 + 1 = 4; b would make 5
    assert plan.blocked == {"b": "pool gpu is full"}
    assert capacity.pool_used == {"gpu": 4}


def test_a_zero_capacity_pool_starts_nothing() -> None:
    plan = plan_starts([task("a", pool="off")], view(pool_capacity={"off": 0}), NOW, 10)
    assert plan.starts == []


def test_pools_are_independent() -> None:
    capacity = view(pool_capacity={"a": 1, "b": 1})
    tasks = [task("1", pool="a"), task("2", pool="a"), task("3", pool="b")]
    assert ids(plan_starts(tasks, capacity, NOW, 10).starts) == ["1", "3"]


def test_a_small_task_passes_a_blocked_big_one() -> None:
    capacity = view(pool_capacity={"drivers": 3}, pool_used={"drivers": 1})
    tasks = [
        task("big", pool="drivers", units=3),
        task("small", pool="drivers", units=1),
        task("small2", pool="drivers", units=1),
        task("small3", pool="drivers", units=1),
    ]
    plan = plan_starts(tasks, capacity, NOW, 10)
    assert ids(plan.starts) == ["small", "small2"]
    assert set(plan.blocked) == {"big", "small3"}


@pytest.mark.parametrize("rank", [AGED + NOW, -math.inf])  # waited past max_wait; run now
def test_an_aged_or_run_now_task_that_does_not_fit_holds_its_pool(rank: float) -> None:
    capacity = view(pool_capacity={"drivers": 3, "vans": 1}, pool_used={"drivers": 1})
    tasks = [
        task("first", pool="drivers", units=1, rank=rank - 1.0),  # aged before it, and fits
        task("big", pool="drivers", units=3, rank=rank),
        task("small", pool="drivers", units=1, rank=1.0),
        task("van", pool="vans", units=1, rank=2.0),
    ]
    plan = plan_starts(tasks, capacity, NOW, 10)
    assert ids(plan.starts) == ["first", "van"]  # no one passes big in its own pool
    assert plan.blocked == {
        "big": "pool drivers is full: held for it",
        "small": "pool drivers: would delay a reservation",
    }
    # Once the units are back it starts first; ranked above the bound it would not hold.
    free = view(pool_capacity={"drivers": 3}, pool_used={})
    assert ids(plan_starts(tasks[1:3], free, NOW, 10).starts) == ["big"]
    plain = [task("big", pool="drivers", units=3, rank=HOLD_BELOW), tasks[2]]
    assert ids(plan_starts(plain, capacity, NOW, 10).starts) == ["small"]


def test_one_running_task_per_concurrency_key() -> None:
    capacity = view(busy_keys={"sync:acme"})
    tasks = [
        task("a", key="sync:acme"),
        task("b", key="sync:globex"),
        task("c", key="sync:globex"),
        task("d"),
    ]
    plan = plan_starts(tasks, capacity, NOW, 10)
    assert ids(plan.starts) == ["b", "d"]
    assert plan.blocked["a"] == "concurrency key sync:acme is busy"
    assert plan.blocked["c"] == "concurrency key sync:globex is busy"


def test_target_limits_count_tasks_in_flight() -> None:
    capacity = view(
        target_allowed={"http://api": 3, "http://other": None},
        target_in_flight={"http://api": 1},
    )
    tasks = [task(f"api{i}", target="http://api") for i in range(4)]
    tasks += [task(f"other{i}", target="http://other") for i in range(3)]
    plan = plan_starts(tasks, capacity, NOW, 10)
    assert ids(plan.starts) == ["api0", "api1", "other0", "other1", "other2"]
    assert plan.blocked["api2"] == "target http://api is at its limit (3)"


def test_an_open_breaker_blocks_its_target() -> None:
    capacity = view(target_allowed={"http://down": 0})
    plan = plan_starts([task("a", target="http://down"), task("b")], capacity, NOW, 10)
    assert ids(plan.starts) == ["b"]


def test_rate_buckets_start_with_a_full_burst_and_are_returned_when_changed() -> None:
    capacity = view(kind_limits={"mail": KindLimits(rate_per_second=1.0, rate_burst=2.0)})
    tasks = [task(str(i), kind="mail") for i in range(5)] + [task("free", kind="other")]
    plan = plan_starts(tasks, capacity, NOW, 10)
    assert ids(plan.starts) == ["0", "1", "free"]
    assert plan.buckets == {"kind:mail": Bucket(0.0, NOW)}
    assert plan.blocked["2"] == "rate limit of mail"


def test_rate_buckets_refill_with_time() -> None:
    limits = {"mail": KindLimits(rate_per_second=2.0, rate_burst=5.0)}
    buckets = {"kind:mail": Bucket(0.0, NOW - 1.6)}  # 3.2 tokens by now
    capacity = view(kind_limits=limits, buckets=buckets)
    plan = plan_starts([task(str(i), kind="mail") for i in range(5)], capacity, NOW, 10)
    assert ids(plan.starts) == ["0", "1", "2"]
    assert plan.buckets["kind:mail"].tokens == pytest.approx(0.2)


def test_a_blocked_task_takes_no_token() -> None:
    limits = {"mail": KindLimits(rate_per_second=1.0, rate_burst=1.0)}
    capacity = view(pool_capacity={"p": 0}, kind_limits=limits)
    plan = plan_starts(
        [task("blocked", kind="mail", pool="p"), task("ok", kind="mail")], capacity, NOW, 10
    )
    assert ids(plan.starts) == ["ok"]


def test_an_unchanged_bucket_is_not_returned() -> None:
    limits = {"mail": KindLimits(rate_per_second=1.0, rate_burst=1.0)}
    capacity = view(kind_limits=limits, buckets={"kind:mail": Bucket(0.0, NOW)})
    plan = plan_starts([task("a", kind="mail")], capacity, NOW, 10)
    assert plan.starts == [] and plan.buckets == {}


def test_limit_counts_only_starts_not_blocked_tasks() -> None:
    capacity = view(pool_capacity={"p": 0})
    tasks = [task(f"b{i}", pool="p") for i in range(5)] + [task("x"), task("y"), task("z")]
    assert ids(plan_starts(tasks, capacity, NOW, 2).starts) == ["x", "y"]


def test_the_blocked_map_is_bounded() -> None:
    capacity = view(pool_capacity={"p": 0})
    plan = plan_starts([task(str(i), pool="p") for i in range(500)], capacity, NOW, 10)
    assert plan.starts == []
    assert len(plan.blocked) == 100


def test_all_limits_together() -> None:
    capacity = view(
        pool_capacity={"workers": 3},
        busy_keys={"k:1"},
        target_allowed={"http://api": 1},
        kind_limits={"k": KindLimits(rate_per_second=0.001, rate_burst=2.0)},
    )
    tasks = [
        task("key-busy", key="k:1", pool="workers"),
        task("api-1", target="http://api", pool="workers"),
        task("api-2", target="http://api", pool="workers"),
        task("plain-1", pool="workers"),
        task("plain-2", pool="workers"),  # rate: the burst of 2 is spent by api-1 and plain-1
        task("other-kind", kind="o", pool="workers"),
        task("pool-full", kind="o", pool="workers"),
    ]
    plan = plan_starts(tasks, capacity, NOW, 10)
    assert ids(plan.starts) == ["api-1", "plain-1", "other-kind"]
    assert set(plan.blocked) == {"key-busy", "api-2", "plain-2", "pool-full"}


# --- EASY reservations -------------------------------------------------------------------------


def easy(task_id: str, *, units: int = 1, expected: float | None, pool: str = "p") -> Candidate:
    return Candidate(task_id, "k", pool, units, None, "python:k", 0.0, expected)


def test_easy_backfills_only_what_ends_before_the_reservation() -> None:
    # 4 units: 2 busy until NOW + 100. The head needs all 4: it is reserved NOW + 100, and no
    # unit will be spare then, so only tasks expected to end by then may start before it.
    capacity = view(
        pool_capacity={"p": 4},
        pool_used={"p": 2},
        reserve=True,
        running_ends={"p": [(NOW + 100, 2)]},
    )
    tasks = [
        easy("head", units=4, expected=500),
        easy("ends-at-50", expected=50),
        easy("ends-at-200", expected=200),
        easy("unknown", expected=None),  # assumed long
        easy("ends-at-100", expected=100),  # ends just as the head may start
        easy("other-pool", pool="q", expected=1000),
    ]
    plan = plan_starts(tasks, capacity, NOW, 10)
    assert ids(plan.starts) == ["ends-at-50", "ends-at-100", "other-pool"]
    assert plan.blocked == {
        "head": "pool p is full: reserved for it",
        "ends-at-200": "pool p: would delay a reservation",
        "unknown": "pool p: would delay a reservation",
    }
    # Greedy, the long one takes the last free unit: the head's start would slip to NOW + 200.
    greedy = view(pool_capacity={"p": 4}, pool_used={"p": 2})
    assert ids(plan_starts(tasks, greedy, NOW, 10).starts) == [
        "ends-at-50",
        "ends-at-200",
        "other-pool",
    ]


def test_easy_lets_a_long_task_use_units_the_reserved_one_leaves_spare() -> None:
    # 5 units: 2 busy until NOW + 100. At NOW + 100 all 5 are free and the head takes 4:
    # one unit is spare, so one long task may start; a second one would delay the head.
    capacity = view(
        pool_capacity={"p": 5},
        pool_used={"p": 2},
        reserve=True,
        running_ends={"p": [(NOW + 100, 2)]},
    )
    tasks = [
        easy("head", units=4, expected=500),
        easy("long-1", expected=200),
        easy("long-2", expected=200),
        easy("short", expected=10),
    ]
    plan = plan_starts(tasks, capacity, NOW, 10)
    assert ids(plan.starts) == ["long-1", "short"]
    assert plan.blocked["long-2"] == "pool p: would delay a reservation"
    assert capacity.pool_used == {"p": 4}


def test_easy_counts_tasks_started_in_the_same_pass_when_reserving() -> None:
    # 6 units, 1 busy until NOW + 100. "first" takes 2 of the 5 free ones until NOW + 300: only
    # then are 5 units free for the head (at NOW + 100 there are 4), with 1 spare. A task
    # ending at NOW + 200 may start; one of 2 units ending at NOW + 400 would delay the head.
    capacity = view(
        pool_capacity={"p": 6},
        pool_used={"p": 1},
        reserve=True,
        running_ends={"p": [(NOW + 100, 1)]},
    )
    tasks = [
        easy("first", units=2, expected=300),
        easy("head", units=5, expected=500),
        easy("ends-at-200", expected=200),
        easy("ends-at-400", units=2, expected=400),
    ]
    plan = plan_starts(tasks, capacity, NOW, 10)
    assert ids(plan.starts) == ["first", "ends-at-200"]
    assert plan.blocked["ends-at-400"] == "pool p: would delay a reservation"
    assert capacity.pool_used == {"p": 4}


def test_a_head_that_can_never_fit_blocks_nothing() -> None:
    capacity = view(pool_capacity={"p": 2}, reserve=True)
    tasks = [easy("huge", units=3, expected=10), easy("a", expected=1e9), easy("b", expected=None)]
    plan = plan_starts(tasks, capacity, NOW, 10)
    assert ids(plan.starts) == ["a", "b"]
