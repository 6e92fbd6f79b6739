"""RetryPolicy.next_delay: exponential backoff with full jitter, None when the task is dead."""

from __future__ import annotations

import random

import pytest

from tactician.domain import RetryPolicy
from tactician.errors import InvalidInput


def test_each_delay_lies_in_its_full_jitter_range() -> None:
    policy = RetryPolicy(max_attempts=8, initial_delay=0.5, multiplier=3.0, max_delay=40.0)
    rng = random.Random(1234)
    for attempt in range(1, 8):
        cap = min(40.0, 0.5 * 3.0 ** (attempt - 1))
        delays = [policy.next_delay(attempt, retryable=True, rng=rng) for _ in range(500)]
        assert all(d is not None and 0.0 <= d <= cap for d in delays), attempt
        observed = [d for d in delays if d is not None]
        # Full jitter spreads over the whole range, not a band near the cap.
        assert min(observed) < 0.1 * cap
        assert max(observed) > 0.9 * cap


def test_the_cap_grows_exponentially_until_max_delay() -> None:
    policy = RetryPolicy(max_attempts=20, initial_delay=1.0, multiplier=2.0, max_delay=10.0)
    rng = random.Random(7)
    highest = {
        attempt: max(policy.next_delay(attempt, retryable=True, rng=rng) or 0.0 for _ in range(400))
        for attempt in (1, 2, 3, 4, 5, 10)
    }
    assert highest[1] <= 1.0 < highest[3]
    assert 2.0 < highest[3] <= 4.0
    assert 4.0 < highest[4] <= 8.0
    assert 8.0 < highest[5] <= 10.0  # capped: 16 > max_delay
    assert 8.0 < highest[10] <= 10.0


def test_seeded_random_makes_delays_reproducible() -> None:
    policy = RetryPolicy(max_attempts=5)
    first = [policy.next_delay(n, retryable=True, rng=random.Random(99)) for n in range(1, 5)]
    again = [policy.next_delay(n, retryable=True, rng=random.Random(99)) for n in range(1, 5)]
    assert first == again


def test_no_delay_after_the_last_attempt() -> None:
    policy = RetryPolicy(max_attempts=3)
    rng = random.Random(0)
    assert policy.next_delay(1, retryable=True, rng=rng) is not None
    assert policy.next_delay(2, retryable=True, rng=rng) is not None
    assert policy.next_delay(3, retryable=True, rng=rng) is None
    assert policy.next_delay(4, retryable=True, rng=rng) is None


def test_one_attempt_never_retries() -> None:
    assert RetryPolicy(max_attempts=1).next_delay(1, retryable=True, rng=random.Random(0)) is None


def test_non_retryable_errors_are_dead_at_once() -> None:
    policy = RetryPolicy(max_attempts=10)
    assert policy.next_delay(1, retryable=False, rng=random.Random(0)) is None


def test_zero_initial_delay_retries_at_once() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay=0.0)
    assert policy.next_delay(1, retryable=True, rng=random.Random(0)) == 0.0


@pytest.mark.parametrize(
    "fields",
    [
        {"max_attempts": 0},
        {"initial_delay": -1.0},
        {"max_delay": -1.0},
        {"multiplier": 0.5},
    ],
)
def test_invalid_policies_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(InvalidInput):
        RetryPolicy(**fields)  # type: ignore[arg-type]
