"""Prometheus metrics read from the database at each scrape.

The database already holds what the system did (tasks by state, attempts with their outcomes
and run times, approvals, dead letters, the audit chain), so a scrape reads it there: every
worker and planner process is counted exactly once, with no multiprocess bookkeeping, and
nothing is added to the hot path. Names follow Prometheus conventions (`_total` for counters,
units in names) and labels stay bounded (states, pools, kinds, outcomes).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tactician.domain import FINAL_STATES
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
        for usage in self.store.pools():
            if usage.pool.capacity:
                yield _gauge(
                    "tactician_pool_utilization_ratio",
                    "Units in use over capacity.",
                    usage.used / usage.pool.capacity,
                    pool=usage.pool.name,
                )
        for target in self.store.targets():
            yield _gauge(
                "tactician_circuit_open",
                "1 while a target's circuit breaker is open (0.5 half-open).",
                {"closed": 0.0, "half_open": 0.5, "open": 1.0}[target.breaker],
                target=target.target,
            )
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


def _gauge(name: str, help_text: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def metrics_text(store: Store) -> bytes:
    """The exposition text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return generate_latest(registry)
