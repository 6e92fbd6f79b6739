"""Merge-into, carried out: a planner hook that folds tasks sharing a merge key.

Every `every_s` seconds it decides the waiting tasks with the policy's merge rules
(`decide.service.merges`: same key inside the window of the first) and asks the store to fold
each group into its first task (`Store.merge`), which then runs once with every payload. A
group the store refuses (a task started meanwhile, or one that others depend on) is logged and
left as it is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tactician.decide.service import MergeRule, Snapshot, merges
from tactician.errors import TacticianError
from tactician.run.ranking import LiveRanker
from tactician.store.protocol import Store

log = logging.getLogger("tactician.decide")


@dataclass
class Merger:
    store: Store
    ranker: LiveRanker
    rules: Sequence[MergeRule]
    every_s: float = 2.0
    limit: int = 5000
    merged: int = 0
    _last: float = field(default=-math.inf)

    def __call__(self, now: float) -> int:
        if now - self._last < self.every_s:
            return 0
        self._last = now
        waiting = [w for w in self.store.waiting(self.limit) if w.state in ("pending", "ready")]
        if len(waiting) < 2:
            return 0
        rows = self.ranker.rows_of(waiting)
        snapshot = Snapshot(self.ranker.backlog, rows, now)
        groups: dict[str, list[str]] = {}
        tasks = self.ranker.backlog.tasks
        for row, into in merges(snapshot, self.rules).items():
            groups.setdefault(tasks[into].id, []).append(tasks[row].id)
        done = 0
        for primary, others in groups.items():
            try:
                self.store.merge(primary, others)
            except TacticianError as exc:
                log.info("not merged into %s: %s", primary, exc)
                continue
            log.info("merged %d tasks into %s", len(others), primary)
            done += len(others)
        self.merged += done
        return done
