"""The online start-order improvement: the list-scheduling evaluator and the search."""

from __future__ import annotations

import random
import time

import pytest

from tactician.errors import InvalidInput
from tactician.plan.improve import (
    Improvement,
    ReadyTask,
    RunningTask,
    _Problem,
    evaluate_order,
    improve_order,
)


def rt(task_id: str, p: float, **fields: object) -> ReadyTask:
    fields.setdefault("pool", "p")
    return ReadyTask(id=task_id, p=p, **fields)  # type: ignore[arg-type]


def key_not_worse(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """a <= b lexicographically, with float noise allowed."""
    for x, y in zip(a, b, strict=True):
        if x < y - 1e-9 * max(1.0, abs(y)):
            return True
        if x > y + 1e-9 * max(1.0, abs(y)):
            return False
    return True


# --- the evaluator ---------------------------------------------------------------------------


def test_one_unit_pool_runs_the_list_back_to_back() -> None:
    ready = [rt("a", 10), rt("b", 5), rt("c", 1)]
    result = evaluate_order(["b", "a", "c"], ready, [], {"p": 1}, 100.0, "slowdown")
    assert dict(result.starts) == {"a": 105.0, "b": 100.0, "c": 115.0}
    # (end - now) / max(p, 10): a 15/10, b 5/10 -> 1, c 16/10.
    assert result.mean_slowdown == pytest.approx((1.5 + 1.0 + 1.6) / 3)
    assert result.value == result.mean_slowdown


def test_running_tasks_hold_units_until_their_expected_end_and_overruns_until_now() -> None:
    running = [
        RunningTask(pool="p", units=1, ends_at=120.0),
        RunningTask(pool="p", units=1, ends_at=90.0),  # overran: treated as ending now
        RunningTask(pool="other", units=5, ends_at=1000.0),
    ]
    ready = [rt("a", 10), rt("b", 10), rt("c", 10)]
    result = evaluate_order(["a", "b", "c"], ready, running, {"p": 2}, 100.0, "missed")
    assert dict(result.starts) == {"a": 100.0, "b": 110.0, "c": 120.0}


def test_an_overcommitted_pool_starts_nothing_until_enough_units_are_back() -> None:
    running = [RunningTask(pool="p", units=2, ends_at=50.0)]
    result = evaluate_order(["a"], [rt("a", 1)], running, {"p": 1}, 0.0, "missed")
    assert result.starts["a"] == 50.0


def test_a_later_task_uses_a_gap_only_if_it_fits_there_entirely() -> None:
    running = [RunningTask(pool="p", units=2, ends_at=110.0)]
    ready = [rt("big", 10, units=4), rt("small", 5, units=2), rt("long", 20, units=2)]
    result = evaluate_order(
        ["big", "small", "long"], ready, running, {"p": 4}, 100.0, "weighted_tardiness"
    )
    # big waits for the running task; small fits before it; long would delay big: after it.
    assert dict(result.starts) == {"big": 110.0, "small": 100.0, "long": 120.0}


def test_unbounded_pools_start_everything_now() -> None:
    ready = [rt("a", 10, pool=""), rt("b", 10, pool="elsewhere"), rt("c", 10)]
    result = evaluate_order(["c", "a", "b"], ready, [], {"p": 1}, 7.0, "missed")
    assert dict(result.starts) == {"a": 7.0, "b": 7.0, "c": 7.0}


def test_missed_and_weighted_tardiness_by_hand() -> None:
    ready = [rt("a", 10, due_at=100.0, weight=2.0), rt("b", 10, due_at=10.0, weight=3.0)]
    fifo = evaluate_order(["a", "b"], ready, [], {"p": 1}, 0.0, "missed")
    assert (fifo.missed, fifo.weighted_tardiness) == (1, 30.0)
    assert fifo.value == 1.0 and fifo.key == (1, 30.0)
    edf = evaluate_order(["b", "a"], ready, [], {"p": 1}, 0.0, "weighted_tardiness")
    assert (edf.missed, edf.weighted_tardiness, edf.value) == (0, 0.0, 0.0)


def test_the_deadline_test_uses_p90_when_known() -> None:
    ready = [rt("a", 10, due_at=20.0, p90=30.0)]
    result = evaluate_order(["a"], ready, [], {"p": 1}, 0.0, "missed")
    assert result.missed == 1
    assert result.weighted_tardiness == 0.0  # the predicted end (10) is on time


def test_slowdown_counts_the_time_already_waited() -> None:
    ready = [rt("a", 20, release_at=60.0), rt("b", 2)]
    result = evaluate_order(["a", "b"], ready, [], {"p": 1}, 100.0, "slowdown")
    # a: (120 - 60) / 20 = 3; b: (122 - 100) / 10 = 2.2.
    assert result.value == pytest.approx((3.0 + 2.2) / 2)


def test_the_unit_fast_path_equals_the_general_profile() -> None:
    rng = random.Random(7)
    for _ in range(50):
        cap = rng.randint(1, 4)
        running = [
            RunningTask(pool="p", units=rng.randint(1, 3), ends_at=rng.uniform(-5, 30))
            for _ in range(rng.randint(0, 4))
        ]
        ready = [rt(f"t{i}", rng.choice([0.0, rng.uniform(0.5, 20)])) for i in range(12)]
        problem = _Problem(ready, running, {"p": cap}, 0.0, "missed")
        sequence = list(range(len(ready)))
        rng.shuffle(sequence)
        fast = problem.starts("p", sequence)
        problem.unit_pools.clear()
        assert problem.starts("p", sequence) == pytest.approx(fast)


def test_evaluate_order_rejects_bad_input() -> None:
    ready = [rt("a", 1), rt("b", 1)]
    with pytest.raises(InvalidInput, match="every ready task exactly once"):
        evaluate_order(["a"], ready, [], {"p": 1}, 0.0, "missed")
    with pytest.raises(InvalidInput, match="every ready task exactly once"):
        evaluate_order(["a", "a"], ready, [], {"p": 1}, 0.0, "missed")
    with pytest.raises(InvalidInput, match="no objective"):
        evaluate_order(["a", "b"], ready, [], {"p": 1}, 0.0, "makespan")
    with pytest.raises(InvalidInput, match="given twice"):
        evaluate_order(["a", "a"], [rt("a", 1), rt("a", 2)], [], {"p": 1}, 0.0, "missed")
    with pytest.raises(InvalidInput, match="needs 3 units of p, which has 2"):
        evaluate_order(["a"], [rt("a", 1, units=3)], [], {"p": 2}, 0.0, "missed")
    with pytest.raises(InvalidInput, match=">= 0"):
        evaluate_order(["a"], [rt("a", -1)], [], {"p": 2}, 0.0, "missed")
    with pytest.raises(InvalidInput, match="finite expected end"):
        running = [RunningTask(pool="p", units=1, ends_at=float("inf"))]
        evaluate_order(["a"], [rt("a", 1)], running, {"p": 2}, 0.0, "missed")


# --- the search ------------------------------------------------------------------------------


def hopeless_first() -> list[ReadyTask]:
    """Every classic rule puts h first; it cannot make its deadline and delays a and b."""
    return [rt("h", 10, due_at=5.0), rt("a", 10, due_at=15.0), rt("b", 10, due_at=25.0)]


def test_cp_sat_finds_the_obvious_better_order() -> None:
    ready = hopeless_first()
    result = improve_order(ready, [], {"p": 1}, 0.0, "missed", budget_s=5.0)
    assert result.initial.missed == 3
    assert result.order == ("a", "b", "h")
    assert result.evaluation.missed == 1
    assert result.method == "cp-sat"
    assert result.cp_sat_optimal


def test_local_search_finds_the_obvious_better_order() -> None:
    ready = hopeless_first()
    result = improve_order(ready, [], {"p": 1}, 0.0, "missed", budget_s=5.0, cp_sat_max_tasks=0)
    assert result.order == ("a", "b", "h")
    assert result.method == "local-search"
    assert not result.cp_sat_optimal


def test_p90_changes_which_order_is_best() -> None:
    ready = [rt("a", 10, due_at=20.0), rt("b", 10, due_at=25.0, p90=25.0)]
    result = improve_order(ready, [], {"p": 1}, 0.0, "missed", budget_s=2.0)
    assert result.initial.missed == 1
    assert result.order == ("b", "a")
    assert result.evaluation.missed == 0


@pytest.mark.parametrize("objective", ["missed", "weighted_tardiness", "slowdown"])
def test_extreme_times_do_not_break_the_model(objective: str) -> None:
    now = 1.7e9  # epoch seconds, as the live planner passes them
    ready = [
        rt("ancient", 5, due_at=now - 1e12, release_at=now - 1e9),
        rt("far", 5, due_at=now + 1e15),
        rt("soon", 5, due_at=now + 6, units=2),
        rt("tiny", 0.001, due_at=now + 1),
    ]
    result = improve_order(ready, [], {"p": 2}, now, objective, budget_s=2.0)
    check(result, ready, [], {"p": 2}, now, objective)
    if objective == "missed":
        # Only tiny, then soon, can still make their deadlines.
        assert result.order[:2] == ("tiny", "soon")
    if objective != "slowdown":
        # ancient's huge tardiness must not hide the seconds saved on the others.
        assert result.evaluation.weighted_tardiness < result.initial.weighted_tardiness - 5


def test_nothing_to_improve_returns_the_given_order() -> None:
    ready = [rt("a", 10, due_at=10.0), rt("b", 10, due_at=20.0)]
    result = improve_order(ready, [], {"p": 1}, 0.0, "missed", budget_s=1.0)
    assert result.order == ("a", "b")
    assert result.evaluation == result.initial
    empty = improve_order([], [], {"p": 1}, 0.0, "slowdown", budget_s=1.0)
    assert empty.order == () and empty.evaluation.value == 0.0


def random_instance(
    rng: random.Random, count: int
) -> tuple[list[ReadyTask], list[RunningTask], dict[str, int]]:
    capacity = {"cpu": 4, "gpu": 1, "io": 3}
    ready = []
    for i in range(count):
        pool = rng.choice([*capacity, ""])
        p = rng.uniform(1, 60)
        ready.append(
            ReadyTask(
                id=f"t{i}",
                p=p,
                pool=pool,
                units=rng.randint(1, capacity[pool]) if pool else 1,
                due_at=rng.choice([None, rng.uniform(0, 4 * p + 60)]),
                weight=rng.choice([1.0, 2.0, 0.5]),
                p90=rng.choice([None, p * rng.uniform(1.0, 2.0)]),
                release_at=rng.choice([None, -rng.uniform(0, 100)]),
            )
        )
    running = [
        RunningTask(pool=pool, units=1, ends_at=rng.uniform(-10, 40))
        for pool in capacity
        for _ in range(rng.randint(0, 2))
    ]
    return ready, running, capacity


def check(result: Improvement, ready: list[ReadyTask], *args: object) -> None:
    assert sorted(result.order) == sorted(t.id for t in ready)
    again = evaluate_order(result.order, ready, *args)  # type: ignore[arg-type]
    assert again.key == pytest.approx(result.evaluation.key)
    given = evaluate_order([t.id for t in ready], ready, *args)  # type: ignore[arg-type]
    assert given.key == pytest.approx(result.initial.key)
    assert key_not_worse(result.evaluation.key, result.initial.key)


@pytest.mark.parametrize("objective", ["missed", "weighted_tardiness", "slowdown"])
def test_never_worse_than_the_given_order(objective: str) -> None:
    rng = random.Random(f"improve:{objective}")
    strictly_better = 0
    for count, cp_sat_max_tasks in [(6, 40), (12, 40), (25, 40), (25, 0), (60, 40)]:
        ready, running, capacity = random_instance(rng, count)
        result = improve_order(
            ready,
            running,
            capacity,
            0.0,
            objective,
            budget_s=0.3,
            cp_sat_max_tasks=cp_sat_max_tasks,
        )
        check(result, ready, running, capacity, 0.0, objective)
        strictly_better += result.evaluation.key < result.initial.key
    assert strictly_better >= 3  # random orders are rarely the best


def test_a_tiny_budget_still_returns_a_valid_order() -> None:
    ready, running, capacity = random_instance(random.Random(3), 30)
    result = improve_order(ready, running, capacity, 0.0, "missed", budget_s=0.0)
    check(result, ready, running, capacity, 0.0, "missed")
    assert result.method in ("given", "heuristic")


def test_the_budget_is_respected_loosely() -> None:
    ready, running, capacity = random_instance(random.Random(5), 400)
    began = time.perf_counter()
    result = improve_order(ready, running, capacity, 0.0, "weighted_tardiness", budget_s=0.3)
    assert time.perf_counter() - began < 5.0
    check(result, ready, running, capacity, 0.0, "weighted_tardiness")


def test_improve_order_rejects_a_bad_budget() -> None:
    with pytest.raises(InvalidInput, match="budget_s"):
        improve_order([rt("a", 1)], [], {"p": 1}, 0.0, "missed", budget_s=-1.0)
