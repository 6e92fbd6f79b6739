"""Tier 2 in the live planner: escalated decisions go to the LLM advisor in the background.

A planner hook, every `every_s` seconds: decide every waiting task (`decide`), and hand each
newly escalated one (low confidence, out of distribution) to the `BackgroundAdvisor`, which
never blocks the planner. When the advice arrives it is kept in the ranker (`LiveRanker.advice`)
and applied on the next planning passes, within what `apply_advice` allowed: a score change
moves the task within its pool's order by at most that share of the pool; a deferral keeps it
waiting until then; hold or escalate leave tier 1's order in place, and send the task to a
person when an approval rule of the live policy matches that answer (`LiveRanker._gate`). If
the advisor fails, times out, is over budget or its circuit is open, tier 1's decision stands
and its note says why.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tactician.decide.advice import AdviceRequest
from tactician.decide.decision import Action, Decision
from tactician.decide.service import DecidePolicy, decide
from tactician.plan.capacity import CapacityView
from tactician.run.advisor import BackgroundAdvisor
from tactician.run.ranking import LiveRanker
from tactician.store.protocol import Store

log = logging.getLogger("tactician.decide")


@dataclass
class Escalator:
    store: Store
    ranker: LiveRanker
    advisor: BackgroundAdvisor
    policy: Callable[[], DecidePolicy] = DecidePolicy
    """Where to read the thresholds each round (the live bundle's: `Tactician.decide_policy`)."""
    every_s: float = 5.0
    limit: int = 5000
    asked: set[str] = field(default_factory=set)
    _last: float = -math.inf

    def __call__(self, now: float) -> int:
        """Escalate what needs it; returns how many were handed to the advisor."""
        if now - self._last < self.every_s:
            return 0
        self._last = now
        waiting = [w for w in self.store.waiting(self.limit) if w.state == "ready"]
        current = {w.id for w in waiting}
        self.asked &= current  # forget tasks that started or left
        for task_id in [t for t in self.ranker.advice if t not in current]:
            self.ranker.advice.pop(task_id, None)
        if not waiting:
            return 0
        usage = self.store.pools()
        view = CapacityView(
            pool_capacity={u.pool.name: u.pool.capacity for u in usage},
            pool_used={u.pool.name: u.used for u in usage},
        )
        snapshot, _ = self.ranker.snapshot(waiting, view, now)
        sent = 0
        by_id = {w.id: w for w in waiting}
        rules = self.policy()
        for decision in decide(
            snapshot, self.ranker.scorer, rules, model_version=self.ranker.model_version
        ):
            if decision.action is not Action.ESCALATE or decision.task_id in self.asked:
                continue
            task = by_id[decision.task_id]
            request = AdviceRequest(
                task_id=task.id,
                kind=task.kind,
                allowed_actions=frozenset({Action.RUN, Action.DEFER, Action.ESCALATE, Action.HOLD}),
                payload=_payload(task.payload),
                due_at=task.due_at,
                weight=task.weight,
            )
            if self.advisor.submit(decision, request, functools.partial(self._advised, decision)):
                self.asked.add(task.id)
                sent += 1
        return sent

    def _advised(self, tier1: Decision, decision: Decision) -> None:
        """From the advisor's thread: keep the answer for the ranker (a dict assignment)."""
        self.ranker.advice[decision.task_id] = (decision, decision.score - tier1.score)
        log.info(
            "tier %d for %s: %s (%s)",
            int(decision.tier),
            decision.task_id,
            decision.action,
            decision.note or "advised",
        )


def _payload(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
