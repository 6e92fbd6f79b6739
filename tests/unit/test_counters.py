"""The in-memory counters behind /metrics: bounded label sets, fixed histogram buckets, and
flushes that add each count to the database exactly once, across flushes and processes (on a
real SQLite file: a flush is a transaction)."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tactician.decide.features import Backlog, ScoredTask
from tactician.domain import Claim
from tactician.observe import counters
from tactician.observe.counters import (
    BACKPRESSURE,
    CONFIDENCE,
    DECISION_LATENCY,
    DECISIONS,
    DISPATCH_SAMPLE,
    LLM_CALLS,
    LLM_FAILURES,
    MAX_SERIES,
    OUT_OF_DISTRIBUTION,
    RATE_LIMIT_WAITS,
    Counters,
)
from tactician.settings import Settings
from tactician.store.base import SqlStore
from tactician.store.open import open_store


def values(c: Counters) -> dict[tuple[str, str, str], float]:
    return {(name, labels, bucket): value for name, labels, bucket, value in c.take()}


def labels(**pairs: str) -> str:
    return json.dumps(pairs, sort_keys=True, separators=(",", ":"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    url = f"sqlite:///{tmp_path}/t.db"
    store = open_store(url, Settings(db=url))
    yield store
    store.close()


def summed(store: SqlStore) -> dict[tuple[str, str, str], float]:
    return {(n, lab, b): v for n, lab, b, v in store.counter_values()}


# --- labels -----------------------------------------------------------------------------------


def test_a_label_value_outside_its_declared_set_is_counted_as_other() -> None:
    c = Counters()
    c.observe(DECISION_LATENCY, 0.01, tier="1")
    c.observe(DECISION_LATENCY, 0.01, tier="7")
    c.inc(BACKPRESSURE, source="orders", action="dropped-on-the-floor")
    seen = values(c)
    assert seen[(DECISION_LATENCY, labels(tier="1"), "sum")] == pytest.approx(0.01)
    assert seen[(DECISION_LATENCY, labels(tier="other"), "sum")] == pytest.approx(0.01)
    assert seen[(BACKPRESSURE, labels(action="other", source="orders"), "")] == 1


def test_series_past_the_bound_fold_into_other() -> None:
    c = Counters()
    for n in range(MAX_SERIES + 10):
        c.inc(RATE_LIMIT_WAITS, kind=f"kind-{n}")
    seen = values(c)
    assert len(seen) == MAX_SERIES + 1
    assert seen[(RATE_LIMIT_WAITS, labels(kind="other"), "")] == 10
    c.inc(RATE_LIMIT_WAITS, kind="kind-0")  # a series already seen keeps its own value
    assert values(c) == {(RATE_LIMIT_WAITS, labels(kind="kind-0"), ""): 1}


def test_wrong_label_names_and_wrong_metric_types_are_refused() -> None:
    c = Counters()
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(LLM_FAILURES, why="timeout")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(LLM_CALLS, reason="x")
    with pytest.raises(ValueError, match="is a histogram"):
        c.inc(DECISION_LATENCY, tier="1")
    with pytest.raises(KeyError):
        c.inc("tactician_not_declared")
    assert values(c) == {}


# --- histograms -------------------------------------------------------------------------------


def test_a_value_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() -> None:
    c = Counters()
    for value in (0.05, 0.1, 0.1000001, 11.0, 1e9):
        c.observe(CONFIDENCE, value)  # bounds 0.1 ... 1.0
    seen = values(c)
    assert seen[(CONFIDENCE, "{}", "0.1")] == 2  # 0.05 and 0.1 (le: less or equal)
    assert seen[(CONFIDENCE, "{}", "0.2")] == 1
    assert seen[(CONFIDENCE, "{}", "+Inf")] == 2
    assert seen[(CONFIDENCE, "{}", "sum")] == pytest.approx(0.05 + 0.1 + 0.1000001 + 11 + 1e9)
    assert sum(v for (_, _, b), v in seen.items() if b != "sum") == 5


def test_observing_many_at_once_counts_as_observing_each() -> None:
    sample = np.random.default_rng(7).uniform(0, 1.2, 500)
    one, many = Counters(), Counters()
    for value in sample:
        one.observe(CONFIDENCE, float(value))
    many.observe_many(CONFIDENCE, sample)
    a, b = values(one), values(many)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key])


# --- what the services record ------------------------------------------------------------------


def test_each_task_is_counted_once_for_its_rate_limit_wait() -> None:
    c = Counters()
    c.rate_limited({"t1": "rate limit of mail", "t2": "rate limit of mail", "t3": "pool p is full"})
    c.rate_limited({"t2": "rate limit of mail", "t4": "rate limit of sms"})
    assert values(c) == {
        (RATE_LIMIT_WAITS, labels(kind="mail"), ""): 2,
        (RATE_LIMIT_WAITS, labels(kind="sms"), ""): 1,
    }


def _backlog(n: int) -> Backlog:
    backlog = Backlog()
    for k in range(n):
        backlog.add(ScoredTask(f"t{k}", "job", k, 0.0, 0.0, None, 1.0, None, 1, "p", "default"))
    return backlog


def test_first_decisions_count_each_row_once_with_its_confidence_and_ood() -> None:
    backlog = _backlog(6)
    backlog.p50[:6] = 10.0
    backlog.p90[:6] = [10.0, 10.0, 40.0, 40.0, 10.0, 10.0]  # confidence 1, 1, 0, 0, ood, 1
    backlog.ood[4] = True
    saved = counters.DEFAULT
    counters.DEFAULT = Counters()
    try:
        counters.first_decisions(backlog, np.array([0, 1, 2, 3], dtype=np.int64))
        counters.first_decisions(backlog, np.array([2, 3, 4, 5, 5], dtype=np.int64))
        seen = values(counters.DEFAULT)
    finally:
        counters.DEFAULT = saved
    assert seen[(DECISIONS, "{}", "")] == 6
    assert seen[(OUT_OF_DISTRIBUTION, "{}", "")] == 1
    assert seen[(CONFIDENCE, "{}", "0.1")] == 3  # two wide spreads and the ood one: 0
    assert seen[(CONFIDENCE, "{}", "1.0")] == 3
    assert seen[(CONFIDENCE, "{}", "sum")] == pytest.approx(3.0)


def test_a_worker_looks_up_a_uniform_sample_of_its_claims() -> None:
    c = Counters()
    claims = [Claim(f"t{n:05d}", "job", "{}", 1, 1) for n in range(20 * DISPATCH_SAMPLE)]
    c.claimed(claims[: DISPATCH_SAMPLE // 2])
    assert len(c._dispatched) == DISPATCH_SAMPLE // 2  # fewer than the sample: all of them
    c.claimed(claims[DISPATCH_SAMPLE // 2 :])
    sample = c._dispatched
    assert len(sample) == DISPATCH_SAMPLE and len(set(sample)) == DISPATCH_SAMPLE
    late = sum(1 for task_id, _ in sample if task_id >= claims[len(claims) // 2].task_id)
    assert DISPATCH_SAMPLE * 0.3 < late < DISPATCH_SAMPLE * 0.7  # not only the first ones


def test_switched_off_recording_does_nothing() -> None:
    c = Counters(enabled=False)
    c.inc(LLM_CALLS)
    c.observe(CONFIDENCE, 0.5)
    c.rate_limited({"t1": "rate limit of mail"})
    assert values(c) == {}


# --- flushing ---------------------------------------------------------------------------------


def test_two_flushes_add_only_what_was_counted_in_between(store: SqlStore) -> None:
    c = Counters()
    c.inc(LLM_CALLS, 3)
    c.observe(DECISION_LATENCY, 0.2, tier="2")
    assert c.flush(store)
    assert c.flush(store)  # nothing new: nothing added
    c.inc(LLM_CALLS, 2)
    c.observe(DECISION_LATENCY, 0.3, tier="2")
    assert c.flush(store)
    sums = summed(store)
    assert sums[(LLM_CALLS, "{}", "")] == 5
    assert sums[(DECISION_LATENCY, labels(tier="2"), "0.25")] == 1
    assert sums[(DECISION_LATENCY, labels(tier="2"), "0.5")] == 1
    assert sums[(DECISION_LATENCY, labels(tier="2"), "sum")] == pytest.approx(0.5)


def test_a_failed_flush_keeps_its_counts_for_the_next(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    broken = open_store(url, Settings(db=url))
    broken.close()  # a write on it fails
    c = Counters()
    c.inc(LLM_CALLS, 4)
    assert not c.flush(broken)
    c.inc(LLM_CALLS, 1)
    working = open_store(url, Settings(db=url))
    try:
        assert c.flush(working)
        assert summed(working)[(LLM_CALLS, "{}", "")] == 5
    finally:
        working.close()


def _child(url: str) -> None:
    store = open_store(url, Settings(db=url))
    counters.inc(LLM_CALLS, 10)  # the parent's unflushed count is not in this process
    counters.flush(store)
    store.close()


def test_processes_each_add_their_own_counts_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    open_store(url, Settings(db=url)).close()
    saved = counters.DEFAULT.enabled
    counters.configure(True)
    counters.DEFAULT.take()  # whatever earlier tests left in this process
    try:
        counters.inc(LLM_CALLS, 1)  # counted before the fork, flushed by the parent only
        children = [multiprocessing.get_context("fork").Process(target=_child, args=(url,))]
        children.append(multiprocessing.get_context("fork").Process(target=_child, args=(url,)))
        for child in children:
            child.start()
        for child in children:
            child.join(30)
            assert child.exitcode == 0
        counters.inc(LLM_CALLS, 100)
        store = open_store(url, Settings(db=url))
        try:
            assert counters.flush(store)
            assert summed(store)[(LLM_CALLS, "{}", "")] == 121
        finally:
            store.close()
    finally:
        counters.configure(saved)


def test_the_sums_are_rows_of_the_database(store: SqlStore) -> None:
    Counters().flush(store)  # nothing counted: nothing written
    with sqlite3.connect(store.url.removeprefix("sqlite:///")) as conn:
        assert conn.execute("SELECT count(*) FROM metric_counters").fetchone() == (0,)
