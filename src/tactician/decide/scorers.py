"""The classic baselines as one-method scorers: fifo, edf, wspt, atc.

A scorer ranks one ready task at a time; a lower rank starts first. Scorers are pure: they see
only what a scheduler may know (a `ScoredTask`), never a task's true run time. Some remember the
estimates they have seen, to stand in for tasks that come without one.

    fifo  submission order
    edf   earliest deadline first; tasks without a deadline last
    wspt  weighted shortest processing time: estimate / weight, smallest first
    atc   apparent tardiness cost (Vepsalainen & Morton): highest index first
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tactician.errors import InvalidInput

DEFAULT_ESTIMATE = 60.0
"""Seconds assumed for a task without an estimate when nothing of its kind has been seen."""


@dataclass(frozen=True, slots=True)
class ScoredTask:
    """What a scheduler may know of a ready task: never its true run time."""

    id: str
    kind: str
    seq: int
    """Submission order: 0 for the first task submitted."""
    submit_at: float
    release_at: float
    due_at: float | None = None
    weight: float = 1.0
    estimate: float | None = None
    units: int = 1


class Scorer(Protocol):
    """Ranks a ready task at time `now`; lower ranks start first."""

    name: str
    time_dependent: bool
    """True when a task's rank changes with `now`: the caller must rank again at each instant."""

    def rank(self, task: ScoredTask, now: float) -> float: ...


@runtime_checkable
class Bounded(Scorer, Protocol):
    """A time-dependent scorer that can say how low a task's rank may ever go.

    `floor(task) <= rank(task, now)` for every `now`: a caller may then rank lazily, best
    floors first, and stop once no floor left can beat the best rank found.
    """

    def floor(self, task: ScoredTask) -> float: ...


class _Estimates:
    """Estimates seen so far: each kind's median and the mean of all, for tasks without one."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._by_kind: dict[str, list[float]] = {}
        self._total = 0.0
        self._count = 0

    def note(self, task: ScoredTask) -> None:
        if task.estimate is None or task.id in self._seen:
            return
        self._seen.add(task.id)
        bisect.insort(self._by_kind.setdefault(task.kind, []), task.estimate)
        self._total += task.estimate
        self._count += 1

    def of(self, task: ScoredTask) -> float:
        """The task's estimate, else its kind's median so far, else DEFAULT_ESTIMATE."""
        self.note(task)
        if task.estimate is not None:
            return task.estimate
        values = self._by_kind.get(task.kind)
        if not values:
            return DEFAULT_ESTIMATE
        middle = len(values) // 2
        if len(values) % 2:
            return values[middle]
        return (values[middle - 1] + values[middle]) / 2

    def mean(self) -> float:
        return self._total / self._count if self._count else DEFAULT_ESTIMATE


class Fifo:
    """First submitted, first started."""

    name = "fifo"
    time_dependent = False

    def rank(self, task: ScoredTask, now: float) -> float:
        return float(task.seq)


class Edf:
    """Earliest deadline first; tasks without a deadline after all that have one."""

    name = "edf"
    time_dependent = False

    def rank(self, task: ScoredTask, now: float) -> float:
        return math.inf if task.due_at is None else task.due_at


class Wspt:
    """Smallest estimate / weight first (Smith's rule: optimal for weighted completion)."""

    name = "wspt"
    time_dependent = False

    def __init__(self) -> None:
        self._estimates = _Estimates()

    def rank(self, task: ScoredTask, now: float) -> float:
        estimate = self._estimates.of(task)
        if task.weight <= 0:
            return math.inf
        return estimate / task.weight


class Atc:
    """Apparent tardiness cost: w/p · exp(-max(0, d - p - now) / (k · p̄)), highest first.

    p is the task's estimate (or its kind's median when it was first ranked), p̄ the mean
    estimate seen so far and k the look-ahead. A task without a deadline has an infinite slack,
    so an index of 0. The index never exceeds w/p, so -w/p is the rank's floor.
    """

    name = "atc"
    time_dependent = True

    def __init__(self, k: float = 2.0, p_bar: float | None = None) -> None:
        self.k = k
        self.p_bar = p_bar
        """A fixed p̄; None: the mean of the estimates seen so far."""
        self._estimates = _Estimates()
        self._p: dict[str, float] = {}

    def _p_of(self, task: ScoredTask) -> float:
        p = self._p.get(task.id)
        if p is None:
            p = self._p[task.id] = max(self._estimates.of(task), 1e-9)
        return p

    def floor(self, task: ScoredTask) -> float:
        return -task.weight / self._p_of(task)

    def rank(self, task: ScoredTask, now: float) -> float:
        p = self._p_of(task)
        if task.due_at is None:
            return 0.0
        slack = max(0.0, task.due_at - p - now)
        p_bar = self._estimates.mean() if self.p_bar is None else self.p_bar
        scale = self.k * max(p_bar, 1e-9)
        return -(task.weight / p) * math.exp(-slack / scale)


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
