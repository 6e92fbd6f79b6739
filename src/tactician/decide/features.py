"""Features of waiting tasks, as columns: what the scorers and predictors read.

A `Backlog` holds every task a scorer may rank as numpy columns, one row per task, added once
when the task arrives. What is known at submission is encoded then (`static` columns: estimate,
weight, units, kind, window, lead time, the kind's history so far, the task's own `features`);
what moves with time (slack, age, pool pressure) is computed for many rows at once by
`dynamic`. Categorical values get integer codes from a vocabulary that only grows, so a code
means the same value to every model version.

Nothing here reads a task's true run time: the `ScoredTask` a backlog is fed has none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
FeatureValue = float | int | str | bool

BASE_FEATURES = (
    "estimate",
    "weight",
    "units",
    "kind",
    "window_s",
    "lead_s",
    "attempt",
    "kind_median_s",
    "kind_fail_rate",
)
"""Static columns every task has, before its own `features`."""
CATEGORICAL_BASE = ("kind",)
MIN_DURATION_S = 1e-3
"""The shortest run a scorer assumes: a kind whose runs all measured 0 s (a clock's
resolution) must not make duration ratios 0/0."""


@dataclass(frozen=True, slots=True)
class ScoredTask:
    """What a scheduler may know of a waiting task: never its true run time."""

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
    pool: str = ""
    tenant: str | None = None
    attempt: int = 0
    features: Mapping[str, FeatureValue] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureSpec:
    """Which of the tasks' own features a model reads, and which of them are categorical."""

    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return BASE_FEATURES + self.numeric + self.categorical

    @property
    def categorical_names(self) -> tuple[str, ...]:
        return CATEGORICAL_BASE + self.categorical

    @classmethod
    def infer(cls, rows: Iterable[Mapping[str, FeatureValue]]) -> FeatureSpec:
        """Numeric features: those whose values are all numbers; the rest are categorical."""
        kinds: dict[str, bool] = {}
        for row in rows:
            for name, value in row.items():
                is_number = isinstance(value, int | float) and not isinstance(value, bool)
                kinds[name] = kinds.get(name, True) and is_number
        return cls(
            numeric=tuple(sorted(n for n, numeric in kinds.items() if numeric)),
            categorical=tuple(sorted(n for n, numeric in kinds.items() if not numeric)),
        )

    def to_json(self) -> dict[str, list[str]]:
        return {"numeric": list(self.numeric), "categorical": list(self.categorical)}


class Vocabulary:
    """Integer codes for categorical values, per feature; codes never change once given."""

    def __init__(self, codes: Mapping[str, Mapping[str, int]] | None = None) -> None:
        self._codes: dict[str, dict[str, int]] = {k: dict(v) for k, v in (codes or {}).items()}

    def code(self, feature: str, value: FeatureValue) -> int:
        codes = self._codes.setdefault(feature, {})
        text = str(value)
        found = codes.get(text)
        if found is None:
            found = codes[text] = len(codes)
        return found

    def to_json(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self._codes.items()}


class KindHistory:
    """Per kind: durations, failures and lateness of finished tasks, as running figures.

    The median is of the last `window` durations, so it follows a kind that slows down.
    """

    def __init__(self, window: int = 200) -> None:
        self.window = window
        self._recent: dict[str, list[float]] = {}
        self._count: dict[str, int] = {}
        self._failed: dict[str, int] = {}
        self._late: dict[str, int] = {}
        self._medians: dict[str, float] = {}

    def record(
        self, kind: str, duration: float, *, failed: bool = False, late: bool = False
    ) -> None:
        recent = self._recent.setdefault(kind, [])
        recent.append(duration)
        if len(recent) > self.window:
            del recent[0]
        self._medians.pop(kind, None)
        self._count[kind] = self._count.get(kind, 0) + 1
        self._failed[kind] = self._failed.get(kind, 0) + failed
        self._late[kind] = self._late.get(kind, 0) + late

    def median(self, kind: str) -> float:
        """The median of the kind's recent durations; NaN before any."""
        cached = self._medians.get(kind)
        if cached is None:
            recent = self._recent.get(kind)
            cached = float(np.median(recent)) if recent else math.nan
            self._medians[kind] = cached
        return cached

    def count(self, kind: str) -> int:
        return self._count.get(kind, 0)

    def fail_rate(self, kind: str) -> float:
        count = self._count.get(kind, 0)
        return self._failed.get(kind, 0) / count if count else math.nan

    def late_rate(self, kind: str) -> float:
        count = self._count.get(kind, 0)
        return self._late.get(kind, 0) / count if count else math.nan

    def all_durations(self) -> list[float]:
        return [d for recent in self._recent.values() for d in recent]


class Backlog:
    """Tasks as columns. Rows are appended, never removed: a row's number is its handle."""

    def __init__(self, spec: FeatureSpec | None = None, vocabulary: Vocabulary | None = None):
        self.spec = spec or FeatureSpec()
        self.vocabulary = vocabulary or Vocabulary()
        self.tasks: list[ScoredTask] = []
        self._size = 0
        self.ood: npt.NDArray[np.bool_] = np.zeros(0, dtype=np.bool_)
        self.static: Array = np.zeros((0, len(self.spec.names)))
        self._grow(1024)

    def _grow(self, rows: int) -> None:
        old = self._size
        width = len(self.spec.names)

        def floats(name: str, fill: float) -> Array:
            new = np.full(rows, fill, dtype=np.float64)
            if old:
                new[:old] = getattr(self, name)[:old]
            return new

        def ints(name: str, fill: int) -> npt.NDArray[np.int64]:
            new = np.full(rows, fill, dtype=np.int64)
            if old:
                new[:old] = getattr(self, name)[:old]
            return new

        self.seq = floats("seq", 0.0)
        self.submit = floats("submit", 0.0)
        self.release = floats("release", 0.0)
        self.due = floats("due", math.nan)
        self.weight = floats("weight", 1.0)
        self.estimate = floats("estimate", math.nan)
        self.units = floats("units", 1.0)
        self.kind = ints("kind", 0)
        self.pool = ints("pool", 0)
        self.tenant = ints("tenant", -1)
        # Predictions: NaN until a predictor fills them in.
        self.p50 = floats("p50", math.nan)
        self.p90 = floats("p90", math.nan)
        self.p10 = floats("p10", math.nan)
        self.raw50 = floats("raw50", math.nan)
        """p50 as the models gave it, before any online correction."""
        self.p_fail = floats("p_fail", math.nan)
        ood: npt.NDArray[np.bool_] = np.zeros(rows, dtype=np.bool_)
        if old:
            ood[:old] = self.ood[:old]
        self.ood = ood
        self.model = ints("model", -1)
        self.dependents = floats("dependents", 0.0)
        """The weight of the submitted tasks that wait for this one (grows as they arrive)."""
        matrix = np.full((rows, width), math.nan)
        if old:
            matrix[:old, : self.static.shape[1]] = self.static[:old]
        self.static = matrix

    def __len__(self) -> int:
        return self._size

    def add(self, task: ScoredTask, history: KindHistory | None = None) -> int:
        """Append a task; returns its row."""
        row = self._size
        if row == len(self.seq):
            self._grow(2 * row)
        self._size += 1
        self.tasks.append(task)
        self.seq[row] = task.seq
        self.submit[row] = task.submit_at
        self.release[row] = task.release_at
        self.due[row] = math.nan if task.due_at is None else task.due_at
        self.weight[row] = task.weight
        self.estimate[row] = math.nan if task.estimate is None else task.estimate
        self.units[row] = task.units
        self.kind[row] = self.vocabulary.code("kind", task.kind)
        self.pool[row] = self.vocabulary.code("pool", task.pool)
        if task.tenant is not None:
            self.tenant[row] = self.vocabulary.code("tenant", task.tenant)
        self.static[row] = self._encode(task, history)
        return row

    def _encode(self, task: ScoredTask, history: KindHistory | None) -> list[float]:
        window = math.nan if task.due_at is None else task.due_at - task.release_at
        values = [
            math.nan if task.estimate is None else task.estimate,
            task.weight,
            float(task.units),
            float(self.vocabulary.code("kind", task.kind)),
            window,
            task.release_at - task.submit_at,
            float(task.attempt),
            history.median(task.kind) if history else math.nan,
            history.fail_rate(task.kind) if history else math.nan,
        ]
        return values + self._encode_own(task)

    def _encode_own(self, task: ScoredTask) -> list[float]:
        values: list[float] = []
        own = task.features
        for name in self.spec.numeric:
            value = own.get(name)
            values.append(float(value) if isinstance(value, int | float) else math.nan)
        for name in self.spec.categorical:
            value = own.get(name)
            values.append(math.nan if value is None else float(self.vocabulary.code(name, value)))
        return values

    def respec(self, spec: FeatureSpec) -> None:
        """Read a new set of the tasks' own features (a model with new features). The base
        columns, the kind's history among them, keep what they were when each task arrived."""
        if spec == self.spec:
            return
        base = len(BASE_FEATURES)
        old = self.static
        self.spec = spec
        self.static = np.full((len(self.seq), len(spec.names)), math.nan)
        self.static[:, :base] = old[:, :base]
        for row, task in enumerate(self.tasks):
            self.static[row, base:] = self._encode_own(task)

    def fallback_duration(self, rows: npt.NDArray[np.int64], default: float) -> Array:
        """The duration a scorer assumes without a model: the estimate, else the kind's
        median at submission, else `default`; never under `MIN_DURATION_S`."""
        estimate = self.estimate[rows]
        median = self.static[rows, BASE_FEATURES.index("kind_median_s")]
        found = np.where(np.isnan(estimate), np.where(np.isnan(median), default, median), estimate)
        return np.maximum(found, MIN_DURATION_S)


def payload_features(payload: Mapping[str, object]) -> dict[str, FeatureValue]:
    """The features a live task carries: the numbers, strings and booleans at the top of its
    payload (nested values and nulls are not features). Training and serving both use this."""
    return {
        name: value
        for name, value in payload.items()
        if isinstance(value, str | bool | int | float) and value == value  # no NaN
    }


def as_rows(values: Sequence[int]) -> npt.NDArray[np.int64]:
    return np.asarray(values, dtype=np.int64)
