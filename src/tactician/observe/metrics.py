"""Prometheus metrics read from the database at each scrape.

The database already holds what the system did (tasks by state, attempts with their outcomes
and run times, deadlines met or missed, approvals, dead letters, the audit chain), so a scrape
reads it there: every worker and planner process is counted exactly once, with no
multiprocess bookkeeping, and nothing is added to the hot path. What only a process's memory
sees (decision latency by tier, confidence, out-of-distribution decisions, LLM calls and
tokens, rate-limit waits, backpressure, dispatch latency) is counted by `observe.counters`,
flushed to the database every few seconds, and read here the same way. Names follow Prometheus
conventions (`_total` for counters, units in names) and labels stay bounded (states, pools,
kinds, outcomes, tiers).

Timeouts are `tactician_attempts_total{outcome="timeout"}`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tactician.domain import FINAL_STATES
from tactician.observe.counters import INF, METRICS, SUM, MetricSpec, bucket_name
from tactician.store.protocol import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StoreCollector(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        snap = self.store.metrics_snapshot()
        waiting = GaugeMetricFamily(
            "tactician_tasks", "Tasks not finished, by state and pool.", labels=["state", "pool"]
        )
        finished = CounterMetricFamily(
            "tactician_tasks_finished",
            "Tasks that ended, by final state.",
            labels=["state", "pool"],
        )
        for (state, pool), count in sorted(snap.tasks.items()):
            family = finished if state in FINAL_STATES else waiting
            family.add_metric([state, pool], count)
        yield waiting
        yield finished
        oldest = GaugeMetricFamily(
            "tactician_oldest_ready_task_age_seconds",
            "How long the oldest startable task has waited, by pool.",
            labels=["pool"],
        )
        for pool, age in sorted(snap.oldest_ready_age_s.items()):
            oldest.add_metric([pool], age)
        yield oldest
        attempts = CounterMetricFamily(
            "tactician_attempts",
            "Finished attempts by kind and outcome.",
            labels=["kind", "outcome"],
        )
        for (kind, outcome), count in sorted(snap.attempts.items()):
            attempts.add_metric([kind, outcome], count)
        yield attempts
        yield CounterMetricFamily(
            "tactician_retries", "Attempts after a task's first.", value=snap.retries
        )
        run = CounterMetricFamily(
            "tactician_run_seconds", "Run time of succeeded attempts, by kind.", labels=["kind"]
        )
        for kind, (_, seconds) in sorted(snap.run_seconds.items()):
            run.add_metric([kind], seconds)
        yield run
        # One family per name, however many pools and targets (the format allows no repeat).
        utilization = GaugeMetricFamily(
            "tactician_pool_utilization_ratio", "Units in use over capacity.", labels=["pool"]
        )
        for pool, capacity in sorted(snap.capacity.items()):
            if capacity:
                utilization.add_metric([pool], snap.units_used.get(pool, 0) / capacity)
        yield utilization
        breakers = GaugeMetricFamily(
            "tactician_circuit_open",
            "1 while a target's circuit breaker is open (0.5 half-open).",
            labels=["target"],
        )
        for target in sorted(self.store.targets(), key=lambda t: t.target):
            breaker = {"closed": 0.0, "half_open": 0.5, "open": 1.0}[target.breaker]
            breakers.add_metric([target.target], breaker)
        yield breakers
        yield GaugeMetricFamily(
            "tactician_approvals_pending",
            "Tasks waiting for approval.",
            value=snap.approvals_pending,
        )
        yield GaugeMetricFamily(
            "tactician_oldest_approval_age_seconds",
            "How long the oldest pending approval has waited.",
            value=snap.oldest_approval_age_s,
        )
        yield CounterMetricFamily(
            "tactician_dead_letters",
            "Events refused at ingestion and kept.",
            value=snap.dead_letters,
        )
        manual = CounterMetricFamily(
            "tactician_manual_interventions",
            "Changes a person made (overrides, holds, votes, cancels...), by action.",
            labels=["action"],
        )
        for action, count in sorted(snap.interventions.items()):
            manual.add_metric([action], count)
        yield manual
        yield CounterMetricFamily(
            "tactician_access_refused", "Mutations refused by role.", value=snap.refused
        )
        drifts = CounterMetricFamily(
            "tactician_drift_detections",
            "Drifts detected, by signal (duration_error:<kind>, miss_rate, feature:<name>).",
            labels=["signal"],
        )
        for signal, count in sorted(snap.drifts.items()):
            drifts.add_metric([signal], count)
        yield drifts
        yield GaugeMetricFamily(
            "tactician_drift_fallback_engaged",
            "1 while a drift keeps the decision service on its conservative heuristic.",
            value=float(snap.fallback),
        )
        deadlines = CounterMetricFamily(
            "tactician_deadlines",
            "Tasks with a deadline that ended: met (succeeded by it) or missed (succeeded late, "
            "dead or expired), by pool.",
            labels=["pool", "outcome"],
        )
        for (pool, outcome), count in sorted(snap.deadlines.items()):
            deadlines.add_metric([pool, outcome], count)
        yield deadlines
        yield from counted(self.store.counter_values())


def counted(rows: Sequence[tuple[str, str, str, float]]) -> Iterator[Metric]:
    """The families of `observe.counters` from their summed rows; every declared metric is
    shown, with zeros for the series its declared label values allow and nobody counted yet."""
    by_series: dict[str, dict[tuple[str, ...], dict[str, float]]] = {}
    for name, labels, bucket, value in rows:
        spec = METRICS.get(name)
        if spec is None:
            continue  # written by a newer version
        try:
            decoded = json.loads(labels)
            key = tuple(str(decoded[label]) for label in spec.labels)
        except (ValueError, KeyError, TypeError):
            continue
        if len(decoded) != len(spec.labels):
            continue
        series = by_series.setdefault(name, {}).setdefault(key, {})
        series[bucket] = series.get(bucket, 0.0) + value
    for name, spec in METRICS.items():
        series_of = by_series.get(name, {})
        for key in _declared(spec):
            series_of.setdefault(key, {})
        if spec.buckets is None:
            family = CounterMetricFamily(name, spec.help, labels=list(spec.labels))
            for key, values in sorted(series_of.items()):
                family.add_metric(list(key), values.get("", 0.0))
            yield family
            continue
        histogram = HistogramMetricFamily(name, spec.help, labels=list(spec.labels))
        bounds = [bucket_name(b) for b in spec.buckets]
        for key, values in sorted(series_of.items()):
            cumulative = list(itertools.accumulate(values.get(b, 0.0) for b in [*bounds, INF]))
            shown = [_le(b) for b in spec.buckets] + [INF]
            histogram.add_metric(
                list(key), list(zip(shown, cumulative, strict=True)), values.get(SUM, 0.0)
            )
        yield histogram


def _declared(spec: MetricSpec) -> list[tuple[str, ...]]:
    """Every series a metric's declared label values allow (none when a label is open)."""
    if any(label not in spec.values for label in spec.labels):
        return []
    return list(itertools.product(*(spec.values[label] for label in spec.labels)))


def _le(bound: float) -> str:
    """A bucket's `le` as the client writes it (1.0 and 0.005, +Inf)."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]  # untyped in the client
    return text


def metrics_text(store: Store) -> bytes:
    """The exposition text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return generate_latest(registry)
