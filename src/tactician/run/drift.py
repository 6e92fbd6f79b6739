"""The drift watch inside the live planner: detectors fed as work finishes, and what a drift does.

A planner hook (every `every_s`): it reads the outcomes recorded since its last call and feeds
each to ADWIN (`observe.drift.DriftMonitor`) with the p50 the decision service predicted for that
task (the models' own, before online correction; without models, the task's estimate or its
kind's recorded median, which is then the predictor), and feeds the features of the tasks the
ranker met for the first time to the population stability index against the active models'
training sample (`observe.drift.FeatureDrift`).

A detection is counted and audited (`drift.detected`), sent to the bundle's `drift.notify`
channel, and, when the bundle's `drift.fallback` says so, engages the fallback: one row in the
store (audited `drift.fallback`) that every planner follows, ranking with the bundle's heuristic
and sending the ready tasks `drift.confirm` matches to a person. The fallback stays until an
operator clears it (`Gate.clear_drift`, audited `drift.cleared`); the detectors then start
afresh, on the assumption that whatever moved has been dealt with.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from tactician.decide.features import BASE_FEATURES
from tactician.decide.scorers import get_scorer
from tactician.errors import TacticianError
from tactician.govern.audit import Entry
from tactician.govern.policy import DriftSpec
from tactician.govern.records import Fallback
from tactician.govern.roles import SYSTEM
from tactician.observe.drift import (
    AdwinOptions,
    DriftEvent,
    DriftMonitor,
    FeatureDrift,
)
from tactician.run.gate import Gate, LivePolicy, rule_spec
from tactician.run.notify import NOTIFY_KIND, Channel, notification, notify_kind
from tactician.run.ranking import LiveRanker
from tactician.store.protocol import OutcomeRow

log = logging.getLogger("tactician.drift")

WATCH_EVERY_S = 2.0
"""How often the watch reads new outcomes and the features of newly ranked tasks."""
OUTCOMES_BATCH = 10_000
HISTORY_FEATURES = ("kind_median_s", "kind_fail_rate")
"""Not watched by PSI: a running summary of the outcomes (in training it grew with the history;
live it is today's value for every task), whose drift ADWIN on the outcomes already watches."""
KIND_MEDIAN = BASE_FEATURES.index("kind_median_s")
"""The static column holding the kind's recorded median when the task was first seen."""


@dataclass
class DriftWatch:
    gate: Gate
    ranker: LiveRanker
    every_s: float = WATCH_EVERY_S
    monitor: DriftMonitor = field(default_factory=DriftMonitor)
    features: FeatureDrift | None = None
    events: list[DriftEvent] = field(default_factory=list)
    """Every detection so far, oldest first (each is also in the audit chain)."""
    _at: float = -math.inf
    _since: float | None = None
    _options: AdwinOptions = field(default_factory=AdwinOptions)
    _models: str | None = None
    _seen_rows: int = 0

    def __call__(self, now: float) -> int:
        policy = self.gate.policy()
        spec = policy.bundle.drift
        # Every call (one small read): a deploy resets the ranker, and another process may
        # have engaged or cleared the fallback; either way the next pass must rank as it says.
        self._follow(self.gate.store.fallback(), spec)
        if now - self._at < self.every_s:
            return 0
        self._at = now
        if not spec.watch:
            self._since = None
            return 0
        self._configure(spec)
        found = self._outcomes(now) + self._feature_shifts(now)
        for event in found:
            self._act(event, policy)
        return len(found)

    # --- the fallback ------------------------------------------------------------------------

    def _follow(self, engaged: Fallback | None, spec: DriftSpec) -> None:
        """Make the ranker match the store's fallback state (engaged or cleared anywhere)."""
        signal = None if engaged is None else engaged.signal
        if signal == self.ranker.fallback:
            return
        if signal is None:
            self.ranker.use_fallback(None)
            self.monitor = DriftMonitor(self._options)  # the operator says the world is fine
            self.features = None
            self._models = None
            log.warning("drift fallback cleared: the decision service's models decide again")
            return
        confirm = None if spec.confirm is None else rule_spec(spec.confirm)
        self.ranker.use_fallback(signal, get_scorer(spec.scorer), confirm)
        log.warning(
            "drift fallback engaged (%s): ranking with %s%s",
            signal,
            spec.scorer,
            "" if confirm is None else f", rule {confirm.name} asks a person first",
        )

    def _act(self, event: DriftEvent, policy: LivePolicy) -> None:
        spec = policy.bundle.drift
        self.events.append(event)
        detail = event.to_json()
        log.warning("drift detected: %s", event.text())
        self.gate.store.audit(Entry(SYSTEM.name, "drift.detected", event.signal, detail))
        if spec.notify is not None:
            self._notify(spec.notify, event, policy)
        if spec.fallback:
            engaged = self.gate.store.engage_fallback(
                event.signal, event.text(), policy.version, detail
            )
            if engaged is not None:
                self._follow(engaged, spec)

    def _notify(self, name: str, event: DriftEvent, policy: LivePolicy) -> None:
        try:
            channel = Channel.from_mapping(name, policy.bundle.channels.get(name))
        except TacticianError as exc:  # a channel the notifier refuses: logged, the drift stands
            log.error("drift notice not sent to %s: %s", name, exc)
            return
        then = (
            f" The decision service now ranks with {policy.bundle.drift.scorer} until an "
            "operator clears it (tactician drift clear)."
            if policy.bundle.drift.fallback
            else ""
        )
        task = notification(
            channel,
            f"drift detected: {event.signal}",
            event.text() + "." + then,
            event=event.to_json(),
            idempotency_key=f"drift:{event.signal}:{event.at:.3f}",
        )
        self.gate.store.submit([task], {NOTIFY_KIND: notify_kind()}, actor=SYSTEM)

    # --- the detectors -----------------------------------------------------------------------

    def _configure(self, spec: DriftSpec) -> None:
        """New detectors when the bundle's settings or the active models change."""
        if spec.delta != self._options.delta:
            self._options = AdwinOptions(delta=spec.delta)
            self.monitor = DriftMonitor(self._options)
        models = self.ranker.models
        version = None if models is None else models.version
        threshold = spec.psi_threshold
        if version != self._models or (
            self.features is not None and self.features.threshold != threshold
        ):
            self._models = version
            self._seen_rows = 0
            self.features = None
            if models is not None and models.reference:
                rows = np.array(models.reference, dtype=np.float64)  # None becomes NaN
                watched = [n for n in models.spec.names if n not in HISTORY_FEATURES]
                self.features = FeatureDrift.from_training(
                    models.spec, rows, features=watched, threshold=threshold
                )

    def _outcomes(self, now: float) -> list[DriftEvent]:
        if self._since is None:  # outcomes from before the watch started were not predicted
            self._since = now
            return []
        rows = self.gate.store.outcomes(since=self._since, limit=OUTCOMES_BATCH)
        if rows:
            self._since = math.nextafter(rows[-1].finished_at, math.inf)
        found = []
        for row in rows:
            predicted = self._predicted(row)
            if predicted is None:
                continue
            duration = max(0.0, row.finished_at - row.started_at)
            missed = None if row.due_at is None else row.finished_at > row.due_at
            found += self.monitor.observe(row.kind, predicted, duration, missed, row.finished_at)
        return found

    def _predicted(self, row: OutcomeRow) -> float | None:
        """The p50 the decision service had for this task, if it ever ranked it."""
        backlog = self.ranker.backlog
        at = self.ranker.rows.get(row.task_id)
        candidates = [row.estimate]
        if at is not None:
            candidates = [
                float(backlog.raw50[at]),
                float(backlog.p50[at]),
                float(backlog.estimate[at]),
                float(backlog.static[at, KIND_MEDIAN]),
            ]
        for value in candidates:
            if value is not None and math.isfinite(value) and value > 0:
                return value
        return None

    def _feature_shifts(self, now: float) -> list[DriftEvent]:
        watch = self.features
        backlog = self.ranker.backlog
        size = len(backlog)
        if size < self._seen_rows:  # the ranker rebuilt its backlog
            self._seen_rows = 0
        if watch is None or size == self._seen_rows:
            self._seen_rows = size
            return []
        watch.observe_rows(backlog.static[self._seen_rows : size], backlog.spec.names)
        self._seen_rows = size
        return watch.check(now)
