"""The decision service's functional core: a snapshot and a time in, one `Decision` per task out.

The pipeline has fixed steps, each pure:

    score     the policy's scorer ranks every waiting task (`Scorer.rank`); the live ranker
              then shifts tenants by their recent usage (`objective.fair_share`) and ages
              it (`objective.max_wait`), both in `tactician.decide.shares`
    act       run, unless: the task's window has not opened or it has slack while its pool is
              full (defer-until); it shares a merge key with an earlier task inside the window
              (merge-into); an operator holds it (hold); confidence is below the policy's
              threshold or its features are out of distribution (escalate: tier 2 is asked,
              and tier 1's order stands meanwhile)
    explain   the scorer's factors, the pending reason, confidence and model/policy versions

Nothing here does I/O: the same snapshot, time, models and policy give the same decisions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tactician.decide.decision import Action, Decision, Reason, Tier
from tactician.decide.features import Array, Backlog, FeatureValue
from tactician.decide.scorers import PoolView, RankRequest, Rows, Scorer, span_text
from tactician.errors import InvalidInput

SPREAD_FOR_ZERO_CONFIDENCE = math.log(4.0)
"""A p90 four times the p50 leaves no confidence in the duration."""


@dataclass(frozen=True)
class MergeRule:
    """Tasks of `kind` whose `key` template gives the same text inside `window_s` of the first
    become one task (debounce: e.g. one alert fingerprint; batching: one customer's sends)."""

    kind: str
    key: str
    """A template over the task: `{kind}`, `{tenant}`, `{features.NAME}`, e.g.
    "{kind}/{features.fingerprint}"."""
    window_s: float

    def key_of(self, kind: str, tenant: str | None, features: Mapping[str, FeatureValue]) -> str:
        def field_value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name == "kind":
                return kind
            if name == "tenant":
                return tenant or ""
            if name.startswith("features."):
                value = features.get(name.removeprefix("features."))
                if value is None:
                    raise KeyError(name)
                return str(value)
            raise InvalidInput(f"merge key {self.key!r}: unknown field {name!r}")

        return re.sub(r"\{([^{}]+)\}", field_value, self.key)


@dataclass(frozen=True)
class DecidePolicy:
    """The decision part of a policy bundle."""

    version: str = "builtin"
    confidence_threshold: float = 0.3
    """Below this confidence a decision is escalated to the next tier."""
    escalate_out_of_distribution: bool = True
    defer_slack_factor: float = 3.0
    """Defer a task whose slack exceeds this many times its pool's backlog clearing time while
    the pool is full."""
    merge: tuple[MergeRule, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """What the decision service sees at one instant."""

    backlog: Backlog
    rows: Rows
    """The waiting tasks (rows of `backlog`)."""
    now: float
    pools: Mapping[int, PoolView] = field(default_factory=dict)
    blocked: Mapping[int, str] = field(default_factory=dict)
    """Row → why the planner did not start it on its last pass (pool full, rate limit, circuit
    open, ...)."""
    waiting_on: Mapping[int, str] = field(default_factory=dict)
    """Row → what it waits for beyond capacity: "a dependency", "approval"."""
    held: Mapping[int, str] = field(default_factory=dict)
    """Row → who holds it, and why."""


def spread_confidence(backlog: Backlog, rows: Rows) -> Array:
    """From the predicted spread: 1 when p90 = p50, 0 from p90 = 4 x p50 up. Rows not yet
    predicted count as p90 = p50 (no model: no claim)."""
    p50, p90 = backlog.p50[rows], backlog.p90[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.log(p90 / p50)
    result: Array = np.clip(1.0 - np.nan_to_num(spread, nan=0.0) / SPREAD_FOR_ZERO_CONFIDENCE, 0, 1)
    return result


def confidence(backlog: Backlog, rows: Rows) -> Array:
    """The spread's confidence, and 0 out of distribution."""
    return np.where(backlog.ood[rows], 0.0, spread_confidence(backlog, rows))


def merges(snapshot: Snapshot, rules: Sequence[MergeRule]) -> dict[int, int]:
    """Row → the row it merges into: the first submitted task with the same key, when this one
    was submitted inside the window after it."""
    result: dict[int, int] = {}
    if not rules:
        return result
    backlog = snapshot.backlog
    order = snapshot.rows[np.argsort(backlog.seq[snapshot.rows], kind="stable")]
    first: dict[tuple[int, str], int] = {}
    for row in order.tolist():
        task = backlog.tasks[row]
        for number, rule in enumerate(rules):
            if rule.kind != task.kind:
                continue
            try:
                key = rule.key_of(task.kind, task.tenant, task.features)
            except KeyError:
                continue  # the task lacks a field the key names: it merges with nothing
            primary = first.get((number, key))
            if primary is None or task.submit_at - backlog.submit[primary] > rule.window_s:
                first[(number, key)] = row
            else:
                result[row] = primary
            break
    return result


def pending_reason(snapshot: Snapshot, row: int, decision: Decision) -> str:
    """Why a waiting task is not running, in a few words."""
    if row in snapshot.held:
        return f"held by {snapshot.held[row]}"
    if row in snapshot.waiting_on:
        return f"awaiting {snapshot.waiting_on[row]}"
    if decision.action is Action.MERGE:
        return f"merged into {decision.merge_into}"
    release = float(snapshot.backlog.release[row])
    if release > snapshot.now:
        return f"deferred until its window opens in {span_text(release - snapshot.now)}"
    if decision.action is Action.DEFER and decision.defer_until is not None:
        return f"deferred for {span_text(decision.defer_until - snapshot.now)}: has slack"
    if row in snapshot.blocked:
        return snapshot.blocked[row]
    view = snapshot.pools.get(int(snapshot.backlog.pool[row]))
    if view is not None and view.capacity is not None and view.busy_units >= view.capacity:
        return "pool full"
    return "next in line"


def decide(
    snapshot: Snapshot,
    scorer: Scorer,
    policy: DecidePolicy,
    *,
    model_version: str | None = None,
    explain: Sequence[int] = (),
) -> list[Decision]:
    """One decision per row of the snapshot, in the snapshot's order. Rows in `explain` get
    their scorer's factors as reasons (explaining costs more than ranking)."""
    backlog, rows, now = snapshot.backlog, snapshot.rows, snapshot.now
    if len(rows) == 0:
        return []
    request = RankRequest(backlog, rows, now, snapshot.pools)
    ranks = scorer.rank(request)
    position = np.empty(len(rows), dtype=np.int64)
    position[np.lexsort((backlog.seq[rows], ranks))] = np.arange(len(rows))
    sure = confidence(backlog, rows)
    spread = spread_confidence(backlog, rows)
    merged = merges(snapshot, policy.merge)
    wanted = set(explain)
    decisions = []
    clear = _clear_times(snapshot)
    for k, row in enumerate(rows.tolist()):
        reasons: list[Reason] = []
        if row in wanted:
            first = np.concatenate([[row], rows[rows != row]])
            reasons = scorer.explain(RankRequest(backlog, first, now, snapshot.pools))
        score = float(len(rows) - position[k]) / len(rows)
        action, until, into, note = Action.RUN, None, None, None
        if row in snapshot.held:
            action, note = Action.HOLD, f"held by {snapshot.held[row]}"
        elif row in merged:
            action, into = Action.MERGE, backlog.tasks[merged[row]].id
        elif float(backlog.release[row]) > now:
            action, until = Action.DEFER, float(backlog.release[row])
        elif bool(backlog.ood[row]) and policy.escalate_out_of_distribution:
            action, note = Action.ESCALATE, "features outside the training range: asks tier 2"
        elif spread[k] < policy.confidence_threshold:
            action = Action.ESCALATE
            note = f"confidence {spread[k]:.2f} below {policy.confidence_threshold}: asks tier 2"
        else:
            wait = _deferrable(snapshot, row, clear, policy)
            if wait is not None:
                action, until = Action.DEFER, now + wait
        decisions.append(
            Decision(
                task_id=backlog.tasks[row].id,
                action=action,
                score=score,
                confidence=float(sure[k]),
                reasons=tuple(reasons),
                tier=Tier.RULES,
                model_version=model_version,
                policy_version=policy.version,
                decided_at=now,
                defer_until=until,
                merge_into=into,
                note=note,
            )
        )
    return decisions


def _clear_times(snapshot: Snapshot) -> dict[int, float]:
    """Per bounded pool: seconds its waiting work takes to clear at full capacity."""
    backlog, rows = snapshot.backlog, snapshot.rows
    p50 = backlog.p50[rows]
    work = np.where(np.isnan(p50), backlog.fallback_duration(rows, 60.0), p50) * backlog.units[rows]
    pools = backlog.pool[rows]
    clear: dict[int, float] = {}
    for code, view in snapshot.pools.items():
        if view.capacity:
            clear[code] = (view.busy_work + float(work[pools == code].sum())) / view.capacity
    return clear


def _deferrable(
    snapshot: Snapshot, row: int, clear: Mapping[int, float], policy: DecidePolicy
) -> float | None:
    """Seconds a task with plenty of slack may wait while its pool is full; None: run."""
    backlog = snapshot.backlog
    code = int(backlog.pool[row])
    view = snapshot.pools.get(code)
    due = float(backlog.due[row])
    if view is None or view.capacity is None or math.isnan(due):
        return None
    if view.busy_units < view.capacity:
        return None
    p90 = float(backlog.p90[row])
    if math.isnan(p90):
        p90 = float(backlog.fallback_duration(np.array([row]), 60.0)[0])
    slack = due - snapshot.now - p90
    horizon = clear.get(code, 0.0)
    if slack <= policy.defer_slack_factor * max(horizon, 1.0):
        return None
    return slack - policy.defer_slack_factor * max(horizon, 1.0)
