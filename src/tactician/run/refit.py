"""Automatic refits in the live planner: every N recorded outcomes, fit, save, maybe promote.

A planner hook. It counts the outcomes recorded since the last fit (one cheap count query at
most every `check_every_s`); past `every`, it fits a model set on the latest `window` outcomes
(`decide.training.fit_recorded`, as `tactician train` does), saves it in the registry whether
accepted or not, and promotes it only when its duration predictor beat the baseline. The
ranker then serves the new models from its next pass. A failed fit is logged; the models in
service stay.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Protocol

from tactician.decide.predictors import ModelSet
from tactician.decide.training import fit_recorded
from tactician.errors import TacticianError
from tactician.govern.audit import Entry
from tactician.run.ranking import LiveRanker
from tactician.run.training import from_store
from tactician.store.protocol import Store

log = logging.getLogger("tactician.decide")


class Registry(Protocol):
    """Where model sets are kept (`tactician.store.registry.ModelRegistry`)."""

    def save(self, models: ModelSet) -> str: ...

    def promote(self, version: str, *, force: bool = False) -> object: ...


@dataclass
class Refitter:
    store: Store
    ranker: LiveRanker
    registry: Registry
    every: int
    """Refit after this many new outcomes."""
    window: int = 100_000
    check_every_s: float = 60.0
    _since: float | None = None
    _last_check: float = -math.inf
    fits: list[str] = field(default_factory=list)

    def __call__(self, now: float) -> int:
        if now - self._last_check < self.check_every_s:
            return 0
        self._last_check = now
        fresh = self.store.outcomes(since=self._since, limit=self.every)
        if len(fresh) < self.every:
            return 0
        rows = self.store.outcomes(limit=self.window)
        try:
            models = fit_recorded(from_store(rows))
            version = self.registry.save(models)
            self.fits.append(version)
            if models.p50 is None:
                log.info("refit %s on %d outcomes refused: the baseline stays", version, len(rows))
            else:
                previous = self.ranker.model_version
                self.registry.promote(version)
                self.ranker.use(models)
                detail = {"previous": previous, "outcomes": len(rows), "automatic": True}
                self.store.audit(Entry("tactician", "model.promoted", version, detail))
                log.info("refit %s on %d outcomes promoted", version, len(rows))
        except TacticianError as exc:
            log.error("refit failed, the models in service stay: %s", exc)
        self._since = math.nextafter(rows[-1].finished_at, math.inf) if rows else self._since
        return 0  # bookkeeping, not work the planner did
