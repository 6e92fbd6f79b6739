"""The models the live planner serves: automatic refits, and following promotions and pins.

`Refitter` is a planner hook. It counts the outcomes recorded since the last fit (one cheap
count query at most every `check_every_s`); past `every`, it fits a model set on the latest
`window` outcomes (`decide.training.fit_recorded`, as `tactician train` does), saves it in the
registry whether accepted or not, and promotes it only when its duration predictor beat the
baseline. The ranker then serves the new models from its next pass. A failed fit is logged;
the models in service stay. While the live policy pins the models, a fit is saved but not
promoted.

`ModelWatch`, another hook, serves the set the live policy pins, or else the registry's active
one, from the pass after a deploy, a rollback, `tactician models promote` or `models rollback`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
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
    pinned: Callable[[], bool] = lambda: False
    """Whether the live policy pins the models (then a fit is saved, not promoted)."""
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
            elif self.pinned():
                log.info("refit %s saved, not promoted: the live policy pins the models", version)
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


@dataclass
class ModelWatch:
    """A planner hook: serve the model set `wanted` names (the live policy's pin, or else the
    registry's active set), looked up at most every `every_s`. A set that cannot be found or
    loaded is logged once; the models in service stay."""

    ranker: LiveRanker
    wanted: Callable[[], str | None]
    """The full version to serve; None: whatever is in service."""
    load: Callable[[str], ModelSet]
    every_s: float = 2.0
    _checked: float = -math.inf
    _problem: str | None = None
    """The last reason the models asked for could not be served (logged once)."""

    def __call__(self, now: float) -> int:
        if now - self._checked < self.every_s:
            return 0
        self._checked = now
        try:
            version = self.wanted()
            if version is None or version == self.ranker.model_version:
                self._problem = None
                return 0
            models = self.load(version)
        except TacticianError as exc:
            if exc.message != self._problem:
                log.error("cannot serve the models asked for, those in service stay: %s", exc)
            self._problem = exc.message
            return 0
        log.info("serving model set %s (was %s)", version, self.ranker.model_version)
        self.ranker.use(models)
        self._problem = None
        return 0  # bookkeeping, not work the planner did
