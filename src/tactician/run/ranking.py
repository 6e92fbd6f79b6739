"""The decision service inside the live planner: the policy's scorer ranks each planning pass.

`LiveRanker` is the store's `Ranker`: it keeps the tasks it has seen as backlog rows (added once,
so their predictions are made once per model version), ranks the pass's ready tasks with the
scorer and hands the ranks back; workers then claim in that order. A task whose weight or
deadline changed (`tactician tasks reprioritize`) gets a fresh row, so it is scored anew on the
next pass. `snapshot` builds the same view for `tactician tasks why`.

Tasks are encoded exactly as in training: the models' category codes, the payload's top-level
scalars as features, and each kind's history of recorded outcomes (read from the store every
`HISTORY_EVERY_S` by `refresh`, a planner hook) as it stood when the task was first seen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tactician.decide.decision import Action, Decision
from tactician.decide.features import (
    Backlog,
    FeatureValue,
    KindHistory,
    ScoredTask,
    Vocabulary,
    payload_features,
)
from tactician.decide.learned import Learned, Objective
from tactician.decide.predictors import ModelSet
from tactician.decide.scorers import (
    LAST,
    PoolView,
    RankRequest,
    Scorer,
    expected_runs,
    get_scorer,
)
from tactician.decide.service import Snapshot, confidence, spread_confidence
from tactician.decide.shares import FairBook, aged
from tactician.govern.approvals import RuleSpec
from tactician.govern.compare import in_experiment
from tactician.govern.policy import FairShareSpec
from tactician.observe import counters
from tactician.plan.capacity import CapacityView
from tactician.store.protocol import OutcomeRow, ReadyRow, Store

log = logging.getLogger("tactician.decide")

COMPACT_AT = 200_000
"""Rows kept before the backlog is rebuilt from the tasks still waiting."""
HISTORY_EVERY_S = 30.0
HISTORY_BATCH = 10_000


def _features(payload: str) -> dict[str, FeatureValue]:
    try:
        value = json.loads(payload)
    except ValueError:
        return {}
    return payload_features(value) if isinstance(value, dict) else {}


CONFIDENT = 0.3
"""Below this spread confidence the decision service escalates (the gate's "escalate"),
until a bundle sets `thresholds.confidence`."""


_RULE_ACTION = {Action.DEFER: "defer", Action.MERGE: "merge"}
"""Decision actions under the names approval rules give them (govern.policy.Action)."""


def _tags(task: ReadyRow) -> tuple[str, ...]:
    try:
        value = json.loads(task.tags)
    except ValueError:
        return ()
    return tuple(str(t) for t in value) if isinstance(value, list) else ()


def _sensitive(features: Mapping[str, FeatureValue]) -> bool:
    return features.get("sensitive") is True


def _positions(ranks: np.ndarray) -> np.ndarray:
    """0 for the first, 1 for the last (ties in input order)."""
    order = np.argsort(ranks, kind="stable")
    positions = np.empty(len(ranks), dtype=np.float64)
    positions[order] = np.arange(len(ranks)) / max(1, len(ranks) - 1)
    return positions


def make_scorer(name: str, models: ModelSet | None, objective: Objective | None = None) -> Scorer:
    """The scorer a policy names, with the registry's active models for `learned`."""
    if name == "learned":
        return Learned(objective, models=models, learn=False)
    return get_scorer(name)


@dataclass
class Experiment:
    """An A/B split: the experiment bundle's scorer orders its share of the tasks."""

    version: str
    share: float
    split_by: str
    make: Callable[[], Scorer]
    """A fresh scorer (one per backlog: a learned scorer keeps per-row state)."""
    scorer: Scorer | None = None


class LiveRanker:
    def __init__(
        self, scorer: Scorer, models: ModelSet | None = None, store: Store | None = None
    ) -> None:
        self.scorer = scorer
        self.models = models
        """The models served: those given to `use`, with the policy's `ood` limit if any."""
        self._given = models
        self.ood_limit: float | None = None
        self.store = store
        self.history = KindHistory()
        self.advice: dict[str, tuple[Decision, float]] = {}
        """Task id → tier 2's decision and how far it moved the score (set by `Escalator`)."""
        self.policy_version = "builtin"
        self.fair: FairBook | None = None
        """Tenants' recent usage under the policy's `objective.fair_share` (None: off); fed
        from the outcomes `refresh` reads."""
        self._fair_spec: FairShareSpec | None = None
        self.confidence_threshold = CONFIDENT
        """The policy's `thresholds.confidence`: a decision less sure is an "escalate" for the
        approval rules."""
        self.reserve = False
        """The policy's `objective.reserve`: the planner then passes `expected_runs` to each
        planning pass, which makes EASY reservations (store.protocol.ExpectedRuns)."""
        self.max_wait: float | None = None
        """The policy's aging bound (`objective.max_wait`): a task released longer ago goes
        first, and holds its pool if it does not fit (`plan.capacity.HOLD_BELOW`)."""
        self.overrides: dict[str, tuple[str, float | None, str]] = {}
        """Task id → an operator's override (pin or run_now, its value, who set it)."""
        self.gate_rules: tuple[RuleSpec, ...] = ()
        """The policy's approval rules that depend on the decision (action, confidence,
        impact): a ready task they match is kept out of every pass and listed in `gated`."""
        self.gated: dict[str, tuple[RuleSpec, str]] = {}
        self.experiment: Experiment | None = None
        self.fallback: str | None = None
        """The drifted signal while the drift fallback is engaged (`use_fallback`)."""
        self._normal: tuple[Scorer, tuple[RuleSpec, ...]] = (scorer, ())
        """The policy's scorer and rules, put back when the fallback is cleared."""
        self._arms: set[str] = set()
        """Task id → the rule that sends it to approval and why (taken by the gate hook)."""
        self._ranked: tuple[Sequence[ReadyRow], np.ndarray] = ((), np.zeros(0, dtype=np.int64))
        """The last pass's tasks and their backlog rows (for `expected_runs`)."""
        self._history_at: float | None = None
        self._refreshed = -math.inf
        self._reset()

    def use(self, models: ModelSet) -> None:
        """Serve these models from the next pass on (every task is encoded and predicted
        anew)."""
        self._given = models
        self.models = self._served(models)
        self._reset()

    def _served(self, models: ModelSet | None) -> ModelSet | None:
        if models is None or self.ood_limit is None:
            return models
        return dataclasses.replace(models, limit=self.ood_limit)

    def use_policy(
        self,
        version: str,
        scorer: Scorer,
        gate_rules: Sequence[RuleSpec] = (),
        max_wait: float | None = None,
        fair_share: FairShareSpec | None = None,
        reserve: bool = False,
        ood: float | None = None,
        confidence: float = CONFIDENT,
    ) -> None:
        """Rank with a newly deployed (or rolled back) bundle's scorer, rules, aging bound, fair
        shares, reservations and out-of-distribution limit (a drift fallback ends with it: the
        drift watch engages it again under the new bundle). Usage is counted from the outcomes
        read after the shares are set, and kept while they stay the same."""
        self.fallback = None
        self.policy_version = version
        self.max_wait = max_wait
        self.reserve = reserve
        self.ood_limit = ood
        self.confidence_threshold = confidence
        self.models = self._served(self._given)
        if fair_share != self._fair_spec:
            self._fair_spec = fair_share
            self.fair = (
                None
                if fair_share is None
                else FairBook(
                    fair_share.shares,
                    weight=fair_share.weight,
                    half_life_s=fair_share.half_life,
                )
            )
            self._seed_fair_book()
        self.scorer = scorer
        self.gate_rules = tuple(r for r in gate_rules if r.match.needs_decision)
        self._reset()

    def use_fallback(
        self, signal: str | None, scorer: Scorer | None = None, confirm: RuleSpec | None = None
    ) -> None:
        """With a signal: rank with the conservative `scorer` (no A/B split) and send the ready
        tasks `confirm` matches to approval, until called with None (the policy's scorer and
        rules again)."""
        if self.fallback is None:
            self._normal = (self.scorer, self.gate_rules)
        if signal is None:
            self.scorer, self.gate_rules = self._normal
        else:
            if scorer is None:
                raise ValueError("a fallback needs its conservative scorer")
            self.scorer = scorer
            self.gate_rules = self._normal[1] + (() if confirm is None else (confirm,))
        self.fallback = signal
        self._reset()

    def use_experiment(self, experiment: Experiment | None) -> None:
        self.experiment = experiment
        if experiment is not None:
            experiment.scorer = experiment.make()

    def provenance(self, started: Sequence[str]) -> dict[str, Any]:
        """What made this pass's ranks: recorded with every start in the audit chain."""
        made: dict[str, Any] = {
            "policy": self.policy_version,
            "model": self.model_version,
            "scorer": self.scorer.name,
        }
        made["advised"] = [t for t in started if t in self.advice]  # tier 2's say, if any
        if self.fallback is not None:
            made["fallback"] = self.fallback
        elif self.experiment is not None:
            made["experiment"] = self.experiment.version
            made["experiment_tasks"] = [t for t in started if t in self._arms]
        return made

    def _reset(self) -> None:
        """A new backlog (and a new learned scorer: its per-row state refers to old rows)."""
        models = self.models
        if self.experiment is not None:
            self.experiment.scorer = self.experiment.make()
        if isinstance(self.scorer, Learned):
            self.scorer = Learned(self.scorer.objective, models, learn=False)
        self.backlog = Backlog(
            spec=None if models is None else models.spec,
            vocabulary=None if models is None else Vocabulary(models.vocabulary),
        )
        self.rows: dict[str, int] = {}
        self._seq = 0

    def _seed_fair_book(self) -> None:
        """A new fair-share book starts from the latest HISTORY_BATCH outcomes, as `tasks why`
        does, not only from those `refresh` reads from now on: the usage before a deploy counts
        too. Those `refresh` has yet to read are left to it."""
        if self.fair is None or self.store is None or self._history_at is None:
            return  # the first refresh reads the latest outcomes anyway
        for row in self.store.outcomes(limit=HISTORY_BATCH):
            if row.finished_at < self._history_at:
                self._count_use(self.fair, row)

    @staticmethod
    def _count_use(fair: FairBook, row: OutcomeRow) -> None:
        """A finished attempt's unit-seconds, charged to its tenant."""
        fair.used(
            row.tenant, row.units * max(0.0, row.finished_at - row.started_at), row.finished_at
        )

    def refresh(self, now: float) -> int:
        """Read the outcomes recorded since the last call into each kind's history (at most
        every HISTORY_EVERY_S); returns how many were read. A planner hook."""
        if self.store is None or now - self._refreshed < HISTORY_EVERY_S:
            return 0
        self._refreshed = now
        rows = self.store.outcomes(since=self._history_at, limit=HISTORY_BATCH)
        for row in rows:
            late = row.due_at is not None and row.finished_at > row.due_at
            duration = max(0.0, row.finished_at - row.started_at)
            self.history.record(row.kind, duration, failed=row.failed, late=late)
            if self.fair is not None:
                self._count_use(self.fair, row)
        if rows:
            self._history_at = math.nextafter(rows[-1].finished_at, math.inf)
        return 0  # history is bookkeeping, not work the planner did

    @property
    def model_version(self) -> str | None:
        return None if self.models is None else self.models.version

    def rows_of(self, ready: Sequence[ReadyRow]) -> np.ndarray:
        """Backlog rows for `ready`, adding the tasks not seen before (or changed since)."""
        if len(self.rows) > COMPACT_AT:
            log.info("rebuilding the decision backlog (%d rows)", len(self.rows))
            self._reset()
        backlog = self.backlog
        result = np.empty(len(ready), dtype=np.int64)
        fresh = []
        for k, task in enumerate(ready):
            row = self.rows.get(task.id)
            if row is not None:
                seen = backlog.tasks[row]
                if seen.weight == task.weight and seen.due_at == task.due_at:
                    result[k] = row
                    continue
            fresh.append(k)
        for k in sorted(fresh, key=lambda k: (ready[k].created_at, ready[k].id)):
            task = ready[k]
            row = backlog.add(
                ScoredTask(
                    id=task.id,
                    kind=task.kind,
                    seq=self._seq,
                    submit_at=task.created_at,
                    release_at=task.release_at,
                    due_at=task.due_at,
                    weight=task.weight,
                    estimate=task.estimate,
                    units=task.units,
                    pool=task.pool,
                    tenant=task.tenant,
                    attempt=task.attempt,
                    features=_features(task.payload),
                ),
                self.history,
            )
            self._seq += 1
            self.rows[task.id] = row
            result[k] = row
        backlog.dependents[result] = [task.dependents for task in ready]
        return result

    def pools(self, view: CapacityView) -> dict[int, PoolView]:
        code = self.backlog.vocabulary.code
        return {
            code("pool", pool): PoolView(capacity=cap, busy_units=view.pool_used.get(pool, 0))
            for pool, cap in view.pool_capacity.items()
        }

    def __call__(self, ready: Sequence[ReadyRow], view: CapacityView, now: float) -> list[float]:
        began = time.perf_counter()
        rows = self.rows_of(ready)
        self._ranked = (ready, rows)
        request = RankRequest(self.backlog, rows, now, self.pools(view))
        ranks = self.scorer.rank(request)
        unranked = np.isnan(ranks)
        if unranked.any():  # a scorer's bug must not stop the planner: those tasks go last
            log.warning(
                "scorer %s gave %d tasks no rank (NaN): they go last",
                self.scorer.name,
                int(unranked.sum()),
            )
            ranks = np.where(unranked, LAST, ranks)
        counters.first_decisions(self.backlog, rows)  # once a task, with its predictions
        if self.experiment is not None and self.fallback is None:
            ranks = self._split(ready, request, ranks)
        if self.fair is not None:
            ranks = self.fair.adjust(ranks, [t.tenant for t in ready], now)
        if self.max_wait is not None:
            ranks = aged(ranks, self.backlog.release[rows], now, self.max_wait)
        if self.advice:
            ranks = self._advised(ready, ranks, now)
        if self.overrides:
            ranks = self._overridden(ready, ranks)
        if self.gate_rules:
            ranks = self._gate(ready, rows, ranks, now)
        counters.decision_latency(1, time.perf_counter() - began)
        return [float(r) for r in ranks]

    def expected_runs(self, ready: Sequence[ReadyRow]) -> list[float]:
        """Each task's expected run (the predicted median, else its estimate or its kind's
        recorded median), for tasks this ranker has just ranked."""
        rows = self._ranked[1] if ready is self._ranked[0] else self.rows_of(ready)
        return [float(x) for x in expected_runs(self.backlog, rows)]

    def _split(
        self, ready: Sequence[ReadyRow], request: RankRequest, ranks: np.ndarray
    ) -> np.ndarray:
        """Each bundle orders its own tasks; they interleave by their place in that order (the
        two scorers' ranks are on different scales, their positions are not)."""
        experiment = self.experiment
        assert experiment is not None and experiment.scorer is not None
        arm = np.array(
            [
                in_experiment(
                    t.id, t.tenant, experiment.share, experiment.split_by, experiment.version
                )
                for t in ready
            ],
            dtype=bool,
        )
        self._arms = {t.id for t, b in zip(ready, arm, strict=True) if b}
        if not arm.any():
            return ranks
        other = experiment.scorer.rank(request)
        return np.where(arm, _positions(other), _positions(ranks))

    def _overridden(self, ready: Sequence[ReadyRow], ranks: np.ndarray) -> np.ndarray:
        """An operator's word over the scorer's: run_now goes first; a pinned score s takes
        the place a fraction 1 - s down the pass's order. Capacity and approvals still apply:
        the planner only starts what fits, and a task awaiting approval is never ready."""
        ranks = np.array(ranks, dtype=np.float64)
        ordered = np.sort(ranks)
        for k, task in enumerate(ready):
            found = self.overrides.get(task.id)
            if found is None:
                continue
            what, value, _ = found
            if what == "run_now":
                ranks[k] = -math.inf
            elif value is not None:
                target = round((1.0 - value) * (len(ordered) - 1))
                ranks[k] = math.nextafter(float(ordered[target]), -math.inf)
        return ranks

    def _gate(
        self, ready: Sequence[ReadyRow], rows: np.ndarray, ranks: np.ndarray, now: float
    ) -> np.ndarray:
        """Keep out of the pass every ready task a decision-dependent rule sends to approval,
        whatever its rank (advice and overrides included): the model advises, policy decides.
        A rule on actions matches tier 1's action or tier 2's answer, so an answer of hold or
        escalate can open an approval, and no answer can take a task out of a rule's hands."""
        backlog = self.backlog
        sure = confidence(backlog, rows)
        p50 = np.nan_to_num(backlog.p50[rows], nan=0.0)
        late = np.maximum(0.0, now + p50 - np.nan_to_num(backlog.due[rows], nan=math.inf))
        impact = backlog.weight[rows] * late
        unsure = spread_confidence(backlog, rows) < self.confidence_threshold
        escalate = backlog.ood[rows] | unsure
        ranks = np.array(ranks, dtype=np.float64)
        for k, task in enumerate(ready):
            if task.state != "ready":
                continue
            features = _features(task.payload)
            actions = ["escalate" if escalate[k] else "run"]
            advised = self.advice.get(task.id)
            if advised is not None:  # tier 2's answer, as the bundle names actions
                answer = _RULE_ACTION.get(advised[0].action, advised[0].action.value)
                if answer not in actions:
                    actions.append(answer)
            for rule in self.gate_rules:
                if not rule.match.static(task.kind, _tags(task), task.tenant, _sensitive(features)):
                    continue
                matched = [a for a in actions if rule.match.decided(a, float(sure[k]), impact[k])]
                if matched:
                    ranks[k] = math.inf
                    why = f"{matched[0]}, confidence {sure[k]:.2f}, impact {impact[k]:.3g}"
                    if matched[0] != actions[0]:
                        why = f"tier 2 advised {matched[0]}, confidence {sure[k]:.2f}"
                    self.gated[task.id] = (rule, why)
                    break
        return ranks

    def _advised(self, ready: Sequence[ReadyRow], ranks: np.ndarray, now: float) -> np.ndarray:
        """Tier 2's answers on top of tier 1's ranks: a deferral keeps the task out of this
        pass (an infinite rank); a score change of d moves it by d x the tasks ranked."""
        ranks = np.array(ranks, dtype=np.float64)
        ordered = np.sort(ranks)
        count = len(ranks)
        for k, task in enumerate(ready):
            found = self.advice.get(task.id)
            if found is None:
                continue
            decision, delta = found
            if decision.action is Action.DEFER and (decision.defer_until or 0.0) > now:
                ranks[k] = math.inf
            elif delta:
                position = int(np.searchsorted(ordered, ranks[k]))
                target = min(count - 1, max(0, position - round(delta * count)))
                ranks[k] = math.nextafter(float(ordered[target]), -math.inf)
        return ranks

    def snapshot(
        self,
        waiting: Sequence[ReadyRow],
        view: CapacityView,
        now: float,
        blocked: Mapping[str, str] | None = None,
    ) -> tuple[Snapshot, dict[str, int]]:
        """The decision service's view of `waiting` (for `why`), and task id → row."""
        rows = self.rows_of(waiting)
        ids = {task.id: int(row) for task, row in zip(waiting, rows, strict=True)}
        by_row = {ids[i]: reason for i, reason in (blocked or {}).items() if i in ids}
        waiting_on = {
            ids[t.id]: "a dependency or its release time" for t in waiting if t.state == "pending"
        }
        return (
            Snapshot(
                self.backlog, rows, now, self.pools(view), blocked=by_row, waiting_on=waiting_on
            ),
            ids,
        )
