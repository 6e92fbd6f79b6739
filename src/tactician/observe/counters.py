"""Counters and histograms that only a process's memory sees, summed in the database.

The database records what happened to tasks; it does not record how long a ranking took, how
confident the first decision on a task was, how many LLM calls and tokens tier 2 spent, how many
tasks waited for a rate limit or were refused at a full queue, nor how long a ready task waited
for a worker (looked up at each flush for a uniform sample of the worker's claims). Each planner
and worker process counts these in a `Counters` accumulator (a lock around a dict update) and,
every `flush_every_s` and at exit, adds what it counted since its last flush to the
`metric_counters` table in one transaction (`flush`). A scrape reads the sums, so every process
on every machine is counted once, and nothing is written per task. A process killed with
SIGKILL loses at most its last few seconds of counts. Any other process that records (an
ingest process's backpressure) calls `flush_due(store)` in its loop and `flush(store)` at exit.

Every metric is declared in `METRICS` with its label names. A label value outside the metric's
declared values, or a series beyond `MAX_SERIES` of one metric in one process, is counted with
the value "other": label sets stay bounded whatever a caller passes. Histograms have fixed
buckets. Off (`TACTICIAN_METRICS=0`), each recording call returns after one boolean test.

Backpressure is one line wherever a bounded queue refuses or slows its producer:

    counters.backpressure("orders", "slowed")
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from tactician.decide.features import Backlog
from tactician.decide.service import confidence
from tactician.domain import Claim
from tactician.store.protocol import Store

log = logging.getLogger("tactician.metrics")

FLUSH_EVERY_S = 2.0
MAX_SERIES = 64
"""Distinct label sets per metric and process; later ones are counted as "other"."""
DISPATCH_SAMPLE = 256
"""Claims per flush whose dispatch latency a worker looks up (a uniform sample of the claims
since its last flush): the lookup reads each task's row, which costs the hot path measurably
at thousands of tasks a second, while a few hundred a flush give the distribution."""
MAX_RATE_LIMITED = 100_000
"""Task ids remembered as having waited for a rate limit (forgotten all at once past this)."""
OTHER = "other"
RATE_LIMIT_REASON = "rate limit of "
"""How the planner (`tactician.plan.capacity`) words a wait for a kind's rate limit."""

Row = tuple[str, str, str, float]
"""(name, labels as canonical JSON, bucket, value): one row of `metric_counters`. A counter's
bucket is ""; a histogram has one row per bucket (its upper bound, counts not cumulative) and
one with bucket "sum"."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    """Without `_total`: the client appends it to a counter."""
    help: str
    labels: tuple[str, ...] = ()
    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """The values a label may take; any other is counted as "other"."""
    buckets: tuple[float, ...] | None = None
    """A histogram's upper bounds, increasing (+Inf is implied); None: a counter."""


DISPATCH_LATENCY = "tactician_dispatch_latency_seconds"
DECISION_LATENCY = "tactician_decision_latency_seconds"
CONFIDENCE = "tactician_decision_confidence"
DECISIONS = "tactician_decisions"
OUT_OF_DISTRIBUTION = "tactician_decisions_out_of_distribution"
LLM_CALLS = "tactician_llm_calls"
LLM_FAILURES = "tactician_llm_failures"
LLM_TOKENS = "tactician_llm_tokens"
RATE_LIMIT_WAITS = "tactician_rate_limit_waits"
BACKPRESSURE = "tactician_backpressure"

_SPECS = (
    MetricSpec(
        DISPATCH_LATENCY,
        "Seconds from ready (released, dependencies done, approved, or due for retry) to "
        "claimed by a worker, for a uniform sample of up to 256 claims per worker flush.",
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
    ),
    MetricSpec(
        DECISION_LATENCY,
        "Seconds a decision took, by tier: 1 = a planning pass's ranking, 2 = an LLM advisor.",
        labels=("tier",),
        values={"tier": ("1", "2")},
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    ),
    MetricSpec(
        CONFIDENCE,
        "Confidence of the decision service in each task it ranked for the first time "
        "(0 out of distribution).",
        buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    ),
    MetricSpec(DECISIONS, "Tasks the decision service ranked for the first time."),
    MetricSpec(
        OUT_OF_DISTRIBUTION,
        "Tasks first ranked out of the models' distribution (rate: this over decisions).",
    ),
    MetricSpec(LLM_CALLS, "Requests sent to the LLM advisor (cache hits are not calls)."),
    MetricSpec(
        LLM_FAILURES,
        "Times tier 1's decision stood instead of the advisor's, by reason.",
        ("reason",),
    ),
    MetricSpec(
        LLM_TOKENS,
        "Tokens the LLM advisor reported using, by type.",
        ("type",),
        {"type": ("prompt", "completion")},
    ),
    MetricSpec(
        RATE_LIMIT_WAITS,
        "Ready tasks a planning pass could not start because of their kind's rate limit "
        "(each task counted once).",
        ("kind",),
    ),
    MetricSpec(
        BACKPRESSURE,
        "Submissions refused or slowed because a queue passed its bound, by source.",
        ("source", "action"),
        {"action": ("refused", "slowed")},
    ),
)
METRICS: Mapping[str, MetricSpec] = {spec.name: spec for spec in _SPECS}


def bucket_name(bound: float) -> str:
    """A histogram bucket as stored: its upper bound."""
    return repr(float(bound))


INF = "+Inf"
SUM = "sum"


class Counters:
    """One process's counts since its last flush. Thread-safe; fork-safe for the default
    instance (a forked child starts empty, so its parent's counts are flushed once)."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        flush_every_s: float = FLUSH_EVERY_S,
        metrics: Mapping[str, MetricSpec] = METRICS,
    ) -> None:
        self.enabled = enabled
        self.flush_every_s = flush_every_s
        self.metrics = metrics
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str, str], float] = {}
        self._series: dict[str, set[str]] = {}
        self._keys: dict[tuple[object, ...], str] = {}
        """(name, histogram, *label items) → the series' key: the common case costs a lookup."""
        self._dispatched: list[tuple[str, int]] = []
        self._claims_seen = 0
        self._random = random.Random()
        self._rate_limited: set[str] = set()
        self._next_flush = 0.0

    # --- recording --------------------------------------------------------------------------

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` to a counter."""
        if not self.enabled or not amount:
            return
        with self._lock:
            key = (name, self._labels(name, labels, histogram=False), "")
            self._values[key] = self._values.get(key, 0.0) + amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Count one value into a histogram."""
        if not self.enabled:
            return
        spec = self.metrics[name]
        assert spec.buckets is not None, f"{name} is not a histogram"
        index = bisect.bisect_left(spec.buckets, value)
        bucket = INF if index == len(spec.buckets) else bucket_name(spec.buckets[index])
        with self._lock:
            series = self._labels(name, labels, histogram=True)
            key = (name, series, bucket)
            self._values[key] = self._values.get(key, 0.0) + 1.0
            total = (name, series, SUM)
            self._values[total] = self._values.get(total, 0.0) + float(value)

    def observe_many(
        self, name: str, values: Sequence[float] | npt.NDArray[np.float64], **labels: str
    ) -> None:
        """Count many values into a histogram at once."""
        if not self.enabled or len(values) == 0:
            return
        spec = self.metrics[name]
        assert spec.buckets is not None, f"{name} is not a histogram"
        array = np.asarray(values, dtype=np.float64)
        counts = np.bincount(
            np.searchsorted(spec.buckets, array, side="left"), minlength=len(spec.buckets) + 1
        )
        names = [*(bucket_name(b) for b in spec.buckets), INF]
        with self._lock:
            series = self._labels(name, labels, histogram=True)
            for bucket, count in zip(names, counts.tolist(), strict=True):
                if count:
                    key = (name, series, bucket)
                    self._values[key] = self._values.get(key, 0.0) + count
            total = (name, series, SUM)
            self._values[total] = self._values.get(total, 0.0) + float(array.sum())

    def _labels(self, name: str, labels: Mapping[str, str], *, histogram: bool) -> str:
        """The series' labels as canonical JSON, bounded (called with the lock held)."""
        memo = (name, histogram, *labels.items())
        known = self._keys.get(memo)
        if known is not None:
            return known
        spec = self.metrics[name]
        if (spec.buckets is not None) != histogram:
            raise ValueError(f"{name} is a {'histogram' if spec.buckets else 'counter'}")
        if set(labels) != set(spec.labels):
            raise ValueError(f"{name} takes labels {list(spec.labels)}, not {sorted(labels)}")
        bounded = {}
        for label in spec.labels:
            value = str(labels[label])
            allowed = spec.values.get(label)
            bounded[label] = value if allowed is None or value in allowed else OTHER
        text = json.dumps(bounded, sort_keys=True, separators=(",", ":"))
        seen = self._series.setdefault(name, set())
        if text not in seen:
            if len(seen) >= MAX_SERIES:
                return json.dumps(dict.fromkeys(sorted(spec.labels), OTHER), separators=(",", ":"))
            seen.add(text)
        if len(self._keys) >= 4 * MAX_SERIES * len(self.metrics):
            self._keys.clear()
        self._keys[memo] = text
        return text

    def claimed(self, claims: Iterable[Claim]) -> None:
        """A worker took these tasks: a uniform sample of them (reservoir sampling, at most
        `DISPATCH_SAMPLE` a flush) has its dispatch latency looked up at the next flush."""
        if not self.enabled:
            return
        with self._lock:
            sample = self._dispatched
            for claim in claims:
                self._claims_seen += 1
                if len(sample) < DISPATCH_SAMPLE:
                    sample.append((claim.task_id, claim.attempt))
                else:
                    slot = self._random.randrange(self._claims_seen)
                    if slot < DISPATCH_SAMPLE:
                        sample[slot] = (claim.task_id, claim.attempt)

    def rate_limited(self, blocked: Mapping[str, str]) -> None:
        """A planning pass's waits (task id → why it did not start): each task that waited for
        its kind's rate limit is counted once, at its first wait."""
        if not self.enabled or not blocked:
            return
        for task_id, reason in blocked.items():
            if not reason.startswith(RATE_LIMIT_REASON):
                continue
            with self._lock:
                if task_id in self._rate_limited:
                    continue
                if len(self._rate_limited) >= MAX_RATE_LIMITED:
                    self._rate_limited.clear()
                self._rate_limited.add(task_id)
            self.inc(RATE_LIMIT_WAITS, kind=reason.removeprefix(RATE_LIMIT_REASON))

    # --- flushing ---------------------------------------------------------------------------

    def take(self) -> list[Row]:
        """What was counted since the last take, in key order (a stable lock order for the
        upserts of concurrent flushes); the accumulator starts again from zero."""
        with self._lock:
            values, self._values = self._values, {}
        return [(n, labels, bucket, v) for (n, labels, bucket), v in sorted(values.items()) if v]

    def give_back(self, rows: Iterable[Row]) -> None:
        """Rows a failed flush could not write: counted again at the next one."""
        with self._lock:
            for name, labels, bucket, value in rows:
                key = (name, labels, bucket)
                self._values[key] = self._values.get(key, 0.0) + value

    def flush(self, store: Store) -> bool:
        """Add this process's counts since the last flush to the database, in one transaction.
        False (logged, counts kept for the next flush) when the database refused."""
        if not self.enabled:
            return True
        self._next_flush = time.monotonic() + self.flush_every_s
        with self._lock:
            dispatched, self._dispatched = self._dispatched, []
            self._claims_seen = 0
        if dispatched:
            try:
                self.observe_many(DISPATCH_LATENCY, store.dispatch_delays(dispatched))
            except Exception as exc:  # metrics never stop a worker; these claims go unmeasured
                log.warning("metrics: dispatch latencies not read: %s", exc)
        rows = self.take()
        if not rows:
            return True
        try:
            store.add_counters(rows)
        except Exception as exc:  # kept for the next flush
            self.give_back(rows)
            log.warning("metrics: counters not flushed (kept for the next flush): %s", exc)
            return False
        return True

    def flush_due(self, store: Store) -> None:
        """Flush when `flush_every_s` has passed since the last flush (a loop calls this)."""
        if self.enabled and time.monotonic() >= self._next_flush:
            self.flush(store)

    def _forked(self) -> None:
        """In a forked child: nothing counted yet (the parent flushes its own counts)."""
        self._lock = threading.Lock()
        self._values = {}
        self._series = {}
        self._keys = {}
        self._dispatched = []
        self._claims_seen = 0
        self._random = random.Random()
        self._rate_limited = set()


DEFAULT = Counters()
"""This process's counters."""
os.register_at_fork(after_in_child=DEFAULT._forked)

_first_seen: weakref.WeakKeyDictionary[Backlog, npt.NDArray[np.bool_]] = weakref.WeakKeyDictionary()
_first_seen_lock = threading.Lock()


def configure(enabled: bool) -> None:
    """Switch recording on or off in this process (`Settings.metrics`)."""
    DEFAULT.enabled = enabled


def inc(name: str, amount: float = 1.0, **labels: str) -> None:
    DEFAULT.inc(name, amount, **labels)


def observe(name: str, value: float, **labels: str) -> None:
    DEFAULT.observe(name, value, **labels)


def backpressure(source: str, action: Literal["refused", "slowed"], count: int = 1) -> None:
    """`count` submissions from `source` were refused, or slowed (e.g. its consumer paused),
    because a queue passed its bound."""
    DEFAULT.inc(BACKPRESSURE, count, source=source, action=action)


def decision_latency(tier: int, seconds: float) -> None:
    DEFAULT.observe(DECISION_LATENCY, seconds, tier=str(tier))


def first_decisions(backlog: Backlog, rows: npt.NDArray[np.int64]) -> None:
    """After a ranking of `rows`: the confidence and out-of-distribution flag of the rows
    ranked for the first time (a backlog is the decision service's per model version, so a new
    model version counts its tasks again)."""
    if not DEFAULT.enabled or len(rows) == 0:
        return
    with _first_seen_lock:
        seen = _first_seen.get(backlog)
        if seen is None or len(seen) < len(backlog):
            grown = np.zeros(max(1024, 2 * len(backlog)), dtype=np.bool_)
            if seen is not None:
                grown[: len(seen)] = seen
            seen = _first_seen[backlog] = grown
        new = np.unique(rows[~seen[rows]])
        seen[new] = True
    if len(new) == 0:
        return
    DEFAULT.observe_many(CONFIDENCE, confidence(backlog, new))
    DEFAULT.inc(DECISIONS, float(len(new)))
    DEFAULT.inc(OUT_OF_DISTRIBUTION, float(np.count_nonzero(backlog.ood[new])))


def flush(store: Store) -> bool:
    return DEFAULT.flush(store)


def flush_due(store: Store) -> None:
    DEFAULT.flush_due(store)
