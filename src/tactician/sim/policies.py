"""The policies `tactician simulate` compares: the classic rules, EASY backfilling and `ai`.

A policy is a scorer plus how the planner uses it. `easy` is FIFO with a reservation for the
first task that does not fit (EASY backfilling on the given estimates). `ai` is the learned
scorer, learning from the outcomes it sees; one general policy with no per-workload settings.
With a training prefix, `ai` first learns from the prefix's outcomes as recorded history.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tactician.decide.features import Backlog
from tactician.decide.learned import Learned
from tactician.decide.scorers import SCORERS, Scorer
from tactician.errors import InvalidInput
from tactician.sim.history import feed, from_workload
from tactician.sim.simulator import SimOptions
from tactician.sim.workload import WorkloadTask


@dataclass(frozen=True)
class Policy:
    name: str
    make: Callable[[], Scorer]
    reserve: bool = False

    def options(self, base: SimOptions | None = None) -> SimOptions:
        base = base or SimOptions()
        return SimOptions(
            max_candidates=base.max_candidates,
            reserve=self.reserve,
            failure_rate=base.failure_rate,
            retry_delay=base.retry_delay,
            seed=base.seed,
        )


POLICIES: dict[str, Policy] = {
    **{name: Policy(name, factory) for name, factory in SCORERS.items()},
    "easy": Policy("easy", SCORERS["fifo"], reserve=True),
    "ai": Policy("ai", Learned),
}
BASELINES = ("fifo", "edf", "wspt", "atc", "easy")


def get_policy(name: str) -> Policy:
    policy = POLICIES.get(name)
    if policy is None:
        raise InvalidInput(f"no policy {name!r}; choose from {', '.join(POLICIES)}")
    return policy


def pretrain(learner: Learned, history: Sequence[WorkloadTask]) -> Backlog:
    """Teach `learner` the outcomes of `history` as if recorded by a live system: each task
    started at its release and ran for its duration. Returns the backlog holding their rows,
    for the simulation to continue from."""
    records = from_workload(history)
    backlog = feed(learner, records)
    if records:
        learner.refit(backlog)
    # Rows of the history are never ranked: mark them so predictions skip them.
    backlog.model[: len(backlog)] = np.iinfo(np.int64).min
    return backlog


def split(
    tasks: Sequence[WorkloadTask], fraction: float
) -> tuple[list[WorkloadTask], list[WorkloadTask]]:
    """The first `fraction` of the trace by submission, and the rest (whose dependencies on the
    first part are dropped: those tasks are history)."""
    if not 0.0 <= fraction < 1.0:
        raise InvalidInput(f"--train-fraction must be in [0, 1), got {fraction}")
    ordered = sorted(tasks, key=lambda t: (t.submit_at, t.id))
    cut = int(len(ordered) * fraction)
    head, tail = ordered[:cut], ordered[cut:]
    past = {t.id for t in head}
    if past:
        import dataclasses

        tail = [
            dataclasses.replace(t, depends_on=tuple(d for d in t.depends_on if d not in past))
            if any(d in past for d in t.depends_on)
            else t
            for t in tail
        ]
    return head, tail
