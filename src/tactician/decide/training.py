"""Recorded history as a learner sees it, and fitting model sets on it.

A `Recorded` is one finished attempt: what a scheduler knew of the task when it was submitted (a
`ScoredTask`, never its true run time) and what happened (when it started, how long it ran,
whether it failed). `feed` teaches a learner these outcomes in submission order, as a live
system would have recorded them; `fit_recorded` fits a model set on them the way the learned
scorer refits, with a held-out window to validate against. The simulator's pretraining,
`tactician train` and the live planner's refits all go through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tactician.decide.features import Backlog, FeatureSpec, ScoredTask
from tactician.decide.learned import Learned
from tactician.decide.predictors import ModelSet, fit
from tactician.decide.scorers import DEFAULT_ESTIMATE


@dataclass(frozen=True, slots=True)
class Recorded:
    """One finished attempt."""

    task: ScoredTask
    started_at: float
    duration: float
    failed: bool = False

    @property
    def finished_at(self) -> float:
        return self.started_at + self.duration


def feed(learner: Learned, records: Sequence[Recorded]) -> Backlog:
    """Teach `learner` these outcomes, in the given (submission) order, without refitting.

    Each task's row is encoded with the kind history as it stood when the task arrived.
    Returns the backlog holding their rows (whose `features` the caller may respec)."""
    backlog = Backlog()
    learning, learner.learn = learner.learn, True
    learner.next_fit = len(records) + 1
    for record in records:
        row = backlog.add(record.task, learner.history)
        learner.observe(
            backlog,
            row,
            record.duration,
            failed=record.failed,
            started_at=record.started_at,
            finished_at=record.finished_at,
        )
    learner.next_fit, learner.learn = 2 * len(records) + 1, learning
    return backlog


def fit_recorded(records: Sequence[Recorded], *, valid_fraction: float = 0.2) -> ModelSet:
    """A model set fitted on `records` as the learned scorer refits (the same features, the
    same baselines), holding out the latest `valid_fraction` by finish time. Refused
    predictors are left out of the set, which is returned either way."""
    learner = Learned()
    backlog = feed(learner, records)
    backlog.respec(FeatureSpec.infer(record.task.features for record in records))
    outcomes = learner.outcomes()
    return fit(backlog, outcomes, valid_fraction=valid_fraction, default_duration=DEFAULT_ESTIMATE)
