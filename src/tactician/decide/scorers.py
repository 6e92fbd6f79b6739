"""Scorers: one interface from the classic rules to the learned index.

A scorer ranks many waiting tasks at once: `rank(request)` returns one number per row, lower
starts first. Scorers see a `Backlog` (what a scheduler may know), never a true run time.

    fifo     submission order
    edf      earliest deadline first; tasks without a deadline last
    wspt     weighted shortest processing time: duration / weight (Smith's rule)
    atc      apparent tardiness cost (Vepsalainen & Morton), highest index first
    learned  predicted durations and lateness risk (see `Learned`)

Without a model a task's duration is its estimate, else its kind's recent median, else
`DEFAULT_ESTIMATE`. `explain` breaks a row's rank into factors, the way Slurm's `sprio` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from tactician.decide.decision import Reason
from tactician.decide.features import Array, Backlog
from tactician.errors import InvalidInput

DEFAULT_ESTIMATE = 60.0
"""Seconds assumed for a task without an estimate when nothing of its kind has finished."""
Rows = npt.NDArray[np.int64]


@dataclass(frozen=True)
class PoolView:
    """A pool at the instant of ranking."""

    capacity: int | None
    busy_units: int = 0
    busy_work: float = 0.0
    """Units x expected seconds left of the tasks running in it."""


@dataclass(frozen=True)
class RankRequest:
    """One ranking: some rows of a backlog at one instant."""

    backlog: Backlog
    rows: Rows
    now: float
    pools: Mapping[int, PoolView] = field(default_factory=dict)
    """Pool code (the backlog's vocabulary) → its view; missing: unbounded."""


LAST = 1e300
"""A scorer's rank for "after every other task". Not +inf: an infinite rank keeps a task out
of the planning pass altogether (a deferral by the gate or the advisor), so a scorer that gave
it to tasks without a deadline would never start them."""


class Scorer(Protocol):
    """Ranks waiting tasks; lower ranks start first; finite ranks only (see LAST)."""

    name: str
    time_dependent: bool
    """True when a task's rank changes with `now`: the caller must rank again at each instant."""

    def rank(self, request: RankRequest) -> Array: ...

    def explain(self, request: RankRequest) -> list[Reason]:
        """Why the first row of `request` ranks as it does, factor by factor."""
        ...


@runtime_checkable
class Learner(Protocol):
    """A scorer that learns from outcomes as they arrive."""

    def observe(
        self,
        backlog: Backlog,
        row: int,
        duration: float,
        *,
        failed: bool,
        started_at: float,
        finished_at: float,
    ) -> None: ...


@runtime_checkable
class Incremental(Protocol):
    """A time-dependent scorer that can rank one new task against its last full ranking."""

    def rank_arrival(self, request: RankRequest, row: int) -> float: ...


def durations(backlog: Backlog, rows: Rows) -> Array:
    """The duration the classic rules assume: estimate, else kind median, else the default."""
    return backlog.fallback_duration(rows, DEFAULT_ESTIMATE)


def expected_runs(backlog: Backlog, rows: Rows) -> Array:
    """The run times reservations plan with: the predicted median once the models have
    predicted it, else what the classic rules assume (`durations`)."""
    p50 = backlog.p50[rows]
    return np.where(np.isnan(p50), durations(backlog, rows), p50)


class Fifo:
    """First submitted, first started."""

    name = "fifo"
    time_dependent = False

    def rank(self, request: RankRequest) -> Array:
        return request.backlog.seq[request.rows].copy()

    def explain(self, request: RankRequest) -> list[Reason]:
        seq = int(request.backlog.seq[request.rows[0]])
        return [Reason("order", 1.0, f"number {seq + 1} in submission order")]


class Edf:
    """Earliest deadline first; tasks without a deadline after all that have one."""

    name = "edf"
    time_dependent = False

    def rank(self, request: RankRequest) -> Array:
        due = request.backlog.due[request.rows]
        return np.where(np.isnan(due), LAST, due)

    def explain(self, request: RankRequest) -> list[Reason]:
        due = float(request.backlog.due[request.rows[0]])
        if np.isnan(due):
            return [Reason("deadline", 0.0, "no deadline: after every task that has one")]
        return [Reason("deadline", 1.0, f"due in {_span(due - request.now)}")]


class Wspt:
    """Smallest duration / weight first (Smith's rule: optimal for weighted completion)."""

    name = "wspt"
    time_dependent = False

    def rank(self, request: RankRequest) -> Array:
        weight = request.backlog.weight[request.rows]
        index = durations(request.backlog, request.rows) / np.maximum(weight, 1e-9)
        return np.where(weight <= 0, LAST, index)

    def explain(self, request: RankRequest) -> list[Reason]:
        row = request.rows[:1]
        p = float(durations(request.backlog, row)[0])
        w = float(request.backlog.weight[row][0])
        return [Reason("wspt", 1.0, f"expected run {_span(p)}, weight {w:g}")]


class Atc:
    """Apparent tardiness cost: w/p · exp(-max(0, d - p - now) / (k · p̄)), highest first.

    p̄ is the mean duration of the rows ranked together and k the look-ahead. A task without a
    deadline has an infinite slack, so an index of 0.
    """

    name = "atc"
    time_dependent = True

    def __init__(self, k: float = 2.0) -> None:
        self.k = k

    def _parts(self, request: RankRequest) -> tuple[Array, Array, Array]:
        backlog, rows = request.backlog, request.rows
        p = np.maximum(durations(backlog, rows), 1e-9)
        slack = np.maximum(0.0, backlog.due[rows] - p - request.now)
        scale = self.k * max(float(p.mean()) if len(p) else 1.0, 1e-9)
        urgency = np.where(np.isnan(slack), 0.0, np.exp(-np.nan_to_num(slack) / scale))
        return backlog.weight[rows] / p, urgency, slack

    def rank(self, request: RankRequest) -> Array:
        value, urgency, _ = self._parts(request)
        return -(value * urgency)

    def explain(self, request: RankRequest) -> list[Reason]:
        value, urgency, slack = self._parts(request)
        texts = [Reason("value_rate", float(value[0]), f"weight per second {value[0]:.3g}")]
        if np.isnan(slack[0]):
            texts.append(Reason("urgency", 0.0, "no deadline"))
        else:
            texts.append(Reason("urgency", float(urgency[0]), f"slack {_span(float(slack[0]))}"))
        return texts


def _span(seconds: float) -> str:
    """12 s, 4 min, 2.5 h: a duration for a reason's text."""
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 120:
        return f"{sign}{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{sign}{seconds / 60:.0f} min"
    return f"{sign}{seconds / 3600:.1f} h"


span_text = _span

SCORERS: dict[str, Callable[[], Scorer]] = {
    "fifo": Fifo,
    "edf": Edf,
    "wspt": Wspt,
    "atc": Atc,
}


def get_scorer(name: str) -> Scorer:
    """A fresh scorer by name; raises InvalidInput naming the known ones."""
    factory = SCORERS.get(name)
    if factory is None:
        raise InvalidInput(f"no policy {name!r}; choose from {', '.join(SCORERS)}")
    return factory()
