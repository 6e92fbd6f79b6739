"""Shadow and A/B: which bundle decides a task, and how two bundles compare.

An experiment splits by a hash of the task id (or its tenant, so one customer sees one bundle),
salted with the experiment's version so that two experiments split differently. The split is a
pure function: the ranker, the audit trail and `policy compare` agree on every task's arm
without storing it. KPIs come with 95% bootstrap intervals (seeded: the same data gives the same
report).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tactician.govern.records import DecisionRow, OutcomeOfTask

BOOTSTRAP = 2000
"""Resamples for each interval."""


def in_experiment(task_id: str, tenant: str, share: float, split_by: str, salt: str) -> bool:
    """True when the experiment's bundle decides this task."""
    key = tenant if split_by == "tenant" else task_id
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.value):
            return "-"
        return f"{self.value:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}]"


@dataclass(frozen=True)
class ArmKpis:
    version: str
    tasks: int
    missed_rate: Interval
    """Share of tasks with a deadline that finished after it (or never succeeded)."""
    weighted_tardiness: Interval
    """Mean of weight x seconds late, over all tasks."""
    escalation_rate: Interval
    """Share of tasks sent to a human (approval)."""


def _mean_interval(values: np.ndarray, rng: np.random.Generator) -> Interval:
    if len(values) == 0:
        return Interval(math.nan, math.nan, math.nan)
    means = values[rng.integers(0, len(values), size=(BOOTSTRAP, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return Interval(float(values.mean()), float(low), float(high))


def arm_kpis(version: str, outcomes: Sequence[OutcomeOfTask], seed: int = 0) -> ArmKpis:
    rng = np.random.default_rng(seed)
    due = [o for o in outcomes if o.due_at is not None]
    missed = np.array(
        [
            o.state != "succeeded" or o.finished_at is None or o.finished_at > (o.due_at or 0)
            for o in due
        ],
        dtype=float,
    )
    tardiness = np.array(
        [
            o.weight * max(0.0, (o.finished_at or 0.0) - o.due_at)
            if o.due_at is not None and o.finished_at is not None
            else 0.0
            for o in outcomes
        ]
    )
    asked = np.array([o.asked_approval for o in outcomes], dtype=float)
    return ArmKpis(
        version,
        len(outcomes),
        _mean_interval(missed, rng),
        _mean_interval(tardiness, rng),
        _mean_interval(asked, rng),
    )


@dataclass(frozen=True)
class ShadowReport:
    live_version: str
    shadow_version: str
    tasks: int
    """Tasks both bundles decided."""
    same_action: float
    """Share of those where both advised the same action."""
    rank_correlation: float
    """Spearman correlation of their positions (1: same order)."""
    live_escalations: int
    shadow_escalations: int


def shadow_report(
    live: Mapping[str, DecisionRow],
    shadow: Mapping[str, DecisionRow],
    live_version: str,
    shadow_version: str,
) -> ShadowReport:
    common = sorted(set(live) & set(shadow))
    same = sum(live[t].action == shadow[t].action for t in common)
    correlation = math.nan
    if len(common) >= 3:
        a = np.argsort(np.argsort([live[t].position for t in common]))
        b = np.argsort(np.argsort([shadow[t].position for t in common]))
        if a.std() > 0 and b.std() > 0:
            correlation = float(np.corrcoef(a, b)[0, 1])
    return ShadowReport(
        live_version,
        shadow_version,
        len(common),
        same / len(common) if common else math.nan,
        correlation,
        sum(live[t].action == "escalate" for t in common),
        sum(shadow[t].action == "escalate" for t in common),
    )
