"""Flow control: token buckets, circuit breaker transitions, AIMD concurrency limits."""

from __future__ import annotations

import pytest

from tactician.domain import TargetState
from tactician.plan.flow import (
    BACKOFF_FACTOR,
    Bucket,
    after_result,
    allowed_in_flight,
    breaker_may_probe,
    refill,
    take,
)

T0 = 1_000.0


# --- token buckets -------------------------------------------------------------------------


def test_refill_adds_tokens_at_the_rate() -> None:
    assert refill(Bucket(0.0, T0), 2.0, 10.0, T0 + 1.5) == Bucket(3.0, T0 + 1.5)


def test_refill_stops_at_burst() -> None:
    assert refill(Bucket(1.0, T0), 5.0, 3.0, T0 + 100.0) == Bucket(3.0, T0 + 100.0)


def test_refill_ignores_a_clock_that_went_backwards() -> None:
    assert refill(Bucket(2.0, T0), 5.0, 10.0, T0 - 3.0).tokens == 2.0


def test_take_uses_one_token() -> None:
    assert take(Bucket(2.5, T0), 1.0, 5.0, T0) == Bucket(1.5, T0)


def test_take_refuses_below_one_token_and_leaves_the_bucket() -> None:
    bucket = Bucket(0.4, T0)
    assert take(bucket, 1.0, 5.0, T0 + 0.5) is None  # 0.9 tokens
    assert take(bucket, 1.0, 5.0, T0 + 0.6) == Bucket(pytest.approx(0.0), T0 + 0.6)  # type: ignore[arg-type]


def test_a_rate_of_two_per_second_admits_two_a_second_after_the_burst() -> None:
    bucket: Bucket | None = Bucket(2.0, T0)
    admitted = 0
    now = T0
    for step in range(100):  # ten seconds in steps of 0.1 s
        now = T0 + step * 0.1
        assert bucket is not None
        taken = take(bucket, 2.0, 2.0, now)
        if taken is not None:
            bucket, admitted = taken, admitted + 1
    # burst of 2, then 2/s for 9.9 s
    assert 20 <= admitted <= 22


# --- circuit breaker -----------------------------------------------------------------------


def fail(state: TargetState, now: float = T0, threshold: int = 3) -> TargetState:
    return after_result(
        state,
        ok=False,
        overloaded=False,
        latency=0.01,
        now=now,
        threshold=threshold,
        max_concurrency=None,
    )


def succeed(state: TargetState, now: float = T0, threshold: int = 3) -> TargetState:
    return after_result(
        state,
        ok=True,
        overloaded=False,
        latency=0.01,
        now=now,
        threshold=threshold,
        max_concurrency=None,
    )


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    state = TargetState("http://x")
    state = fail(fail(state))
    assert state.breaker == "closed" and state.consecutive_failures == 2
    state = fail(state, now=T0 + 5)
    assert state.breaker == "open"
    assert state.opened_at == T0 + 5


def test_a_success_resets_the_failure_count() -> None:
    state = succeed(fail(fail(TargetState("http://x"))))
    assert state.consecutive_failures == 0
    assert fail(fail(state)).breaker == "closed"


def test_threshold_zero_never_opens() -> None:
    state = TargetState("http://x")
    for _ in range(50):
        state = fail(state, threshold=0)
    assert state.breaker == "closed"
    assert state.consecutive_failures == 50


def test_open_breaker_admits_nothing_until_cooldown_then_one_probe() -> None:
    state = fail(fail(fail(TargetState("http://x"))), now=T0)
    assert allowed_in_flight(state, T0 + 1, cooldown=10) == 0
    assert not breaker_may_probe(state, T0 + 9.9, cooldown=10)
    assert allowed_in_flight(state, T0 + 10, cooldown=10) == 1
    assert breaker_may_probe(state, T0 + 10, cooldown=10)


def test_half_open_probe_success_closes() -> None:
    probing = TargetState("http://x", breaker="half_open", consecutive_failures=3, opened_at=T0)
    assert allowed_in_flight(probing, T0 + 100, cooldown=10) == 1
    closed = succeed(probing, now=T0 + 11)
    assert closed.breaker == "closed"
    assert closed.opened_at is None and closed.consecutive_failures == 0
    assert allowed_in_flight(closed, T0 + 11, cooldown=10) is None


def test_half_open_probe_failure_reopens_with_a_fresh_cooldown() -> None:
    probing = TargetState("http://x", breaker="half_open", consecutive_failures=3, opened_at=T0)
    reopened = fail(probing, now=T0 + 11)
    assert reopened.breaker == "open"
    assert reopened.opened_at == T0 + 11
    assert allowed_in_flight(reopened, T0 + 12, cooldown=10) == 0
    assert allowed_in_flight(reopened, T0 + 21, cooldown=10) == 1


def test_no_state_means_no_limit() -> None:
    assert allowed_in_flight(None, T0, cooldown=10) is None
    assert allowed_in_flight(TargetState("http://x"), T0, cooldown=10) is None


# --- adaptive concurrency (AIMD) -----------------------------------------------------------


def adapt(
    state: TargetState,
    *,
    ok: bool = True,
    overloaded: bool = False,
    latency: float = 0.01,
    max_concurrency: int | None = 10,
) -> TargetState:
    return after_result(
        state,
        ok=ok,
        overloaded=overloaded,
        latency=latency,
        now=T0,
        threshold=0,
        max_concurrency=max_concurrency,
    )


def test_limit_starts_at_the_ceiling() -> None:
    state = adapt(TargetState("t"))
    assert state.limit == 10.0
    assert allowed_in_flight(state, T0, cooldown=1) == 10


def test_overload_cuts_the_limit_multiplicatively() -> None:
    state = adapt(TargetState("t"), ok=False, overloaded=True)
    assert state.limit == pytest.approx(10 * BACKOFF_FACTOR)
    state = adapt(state, ok=False, overloaded=True)
    assert state.limit == pytest.approx(10 * BACKOFF_FACTOR**2)
    assert allowed_in_flight(state, T0, cooldown=1) == 4


def test_successes_raise_the_limit_additively_up_to_the_ceiling() -> None:
    state = TargetState("t", limit=4.0)
    state = adapt(state)
    assert state.limit == pytest.approx(4.25)
    for _ in range(500):
        state = adapt(state)
    assert state.limit == 10.0


def test_limit_never_falls_below_one() -> None:
    state = TargetState("t", limit=1.2)
    for _ in range(10):
        state = adapt(state, ok=False, overloaded=True)
    assert state.limit == 1.0
    assert allowed_in_flight(state, T0, cooldown=1) == 1


def test_a_slow_success_counts_as_overload() -> None:
    state = TargetState("t", limit=8.0, latency_floor=0.1)
    slowed = adapt(state, latency=0.5)
    assert slowed.limit == pytest.approx(8.0 * BACKOFF_FACTOR)
    normal = adapt(state, latency=0.15)
    assert normal.limit == pytest.approx(8.0 + 1 / 8.0)


def test_latency_floor_tracks_the_fastest_and_creeps_up() -> None:
    state = adapt(TargetState("t"), latency=0.2)
    assert state.latency_floor == 0.2
    state = adapt(state, latency=0.1)
    assert state.latency_floor == 0.1
    state = adapt(state, latency=0.15)
    assert state.latency_floor == pytest.approx(0.101)


def test_overloaded_answers_do_not_set_the_floor() -> None:
    state = adapt(TargetState("t"), ok=False, overloaded=True, latency=0.0001)
    assert state.latency_floor is None


def test_a_lower_ceiling_applies_at_once() -> None:
    assert adapt(TargetState("t", limit=30.0), max_concurrency=5).limit == 5.0


def test_not_adaptive_keeps_no_limit() -> None:
    state = adapt(TargetState("t"), ok=False, overloaded=True, max_concurrency=None)
    assert state.limit is None
    assert allowed_in_flight(state, T0, cooldown=1) is None
