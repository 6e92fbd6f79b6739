"""Drift detectors: has the world moved away from what the models were trained on?

Two kinds of evidence, both pure (no I/O; time is a parameter):

    FeatureDrift   population stability index (PSI) of each feature: a sliding window of live
                   values against bins of the model's training data (quantile bins for numbers,
                   one bin per category, a bin for missing values when the training data had
                   them). PSI above 0.25 is the usual "significant shift".
    DriftMonitor   ADWIN (river) on what happened: per kind, the duration predictor's error
                   log(actual / predicted p50); overall, the miss rate (1 when a task finished
                   after its deadline). Only a rise counts by default: tasks getting faster or
                   deadlines easier is not a reason to distrust the models.

Both return `DriftEvent`s, frozen values with a one-line `text()` for logs and the audit chain.
What to do about an event (a metric, an audit record, a notification, the conservative scorer)
is the caller's business.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from tactician.decide.features import FeatureSpec
from tactician.errors import InvalidInput
from tactician.store.protocol import OutcomeRow

__all__ = [
    "DRIFT_ACTIONS",
    "PSI_THRESHOLD",
    "AdwinOptions",
    "DriftEvent",
    "DriftMonitor",
    "FeatureDrift",
    "Reference",
    "psi",
]

DRIFT_ACTIONS = ("drift.detected", "drift.fallback", "drift.cleared")
"""The audit chain's drift records: a detection, the fallback engaged, the fallback cleared."""
PSI_THRESHOLD = 0.25
"""PSI above this is a significant shift (0.1-0.25 is usually read as "moderate")."""
FLOOR = 1e-4
"""Share given to an empty bin, on either side, so that PSI stays finite."""
MISSING = "<missing>"

Array = npt.NDArray[np.float64]

if TYPE_CHECKING:
    from river.drift import ADWIN


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftEvent:
    """One detected drift: what moved, by how much, seen by which detector, and when."""

    signal: str
    """`duration_error:<kind>`, `miss_rate` or `feature:<name>`."""
    detector: str
    """`ADWIN` or `PSI`."""
    before: float
    """ADWIN: the mean before the estimated change. PSI: 0, the training data itself."""
    after: float
    """ADWIN: the mean since the estimated change. PSI: the index over the live window."""
    at: float
    samples: int
    """ADWIN: outcomes of this signal since the estimated change. PSI: live values compared."""

    @property
    def rose(self) -> bool:
        return self.after > self.before

    def text(self) -> str:
        """One line for logs and the audit chain."""
        name, _, subject = self.signal.partition(":")
        if self.detector == "PSI":
            return (
                f"feature {subject} shifted from training: PSI {self.after:.2f} "
                f"(PSI, over the last {self.samples} tasks)"
            )
        way = "rose" if self.rose else "fell"
        tail = f"({self.detector}, after {self.samples} outcomes)"
        if name == "miss_rate":
            return f"miss rate {way}: {self.before:.1%} → {self.after:.1%} {tail}"
        if name == "duration_error":
            return (
                f"duration error of kind {subject} {way}: mean log-ratio "
                f"{self.before:.2f} → {self.after:.2f} {tail}"
            )
        return f"{self.signal} {way}: {self.before:.3g} → {self.after:.3g} {tail}"

    def to_json(self) -> dict[str, Any]:
        """The audit record's detail."""
        return {
            "signal": self.signal,
            "detector": self.detector,
            "before": round(self.before, 6),
            "after": round(self.after, 6),
            "at": self.at,
            "samples": self.samples,
            "text": self.text(),
        }


# --- population stability index --------------------------------------------------------------


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class Reference:
    """A feature's training distribution as bins: what live values are compared with.

    Numeric: `edges` are the inner cut points, bins (-inf, e1], (e1, e2], ..., (e_last, inf).
    Categorical: one bin per training category, then one for categories never seen.
    With `allow_missing`, a last bin holds missing values (NaN or None); without it, a missing
    value is invalid input.
    """

    feature: str
    edges: tuple[float, ...]
    categories: tuple[object, ...]
    expected: tuple[float, ...]
    """Share of the training values in each bin."""
    categorical: bool
    allow_missing: bool
    rows: int

    @classmethod
    def numeric(
        cls, feature: str, values: Iterable[float], *, bins: int = 10, allow_missing: bool = False
    ) -> Reference:
        """Quantile bins of the training values (fewer when values repeat)."""
        if bins < 2:
            raise InvalidInput(f"bins must be at least 2, got {bins}")
        data = _floats(feature, values)
        if len(data) == 0:
            raise InvalidInput(f"reference for {feature!r} is empty")
        missing = np.isnan(data)
        if missing.any() and not allow_missing:
            raise InvalidInput(f"reference for {feature!r} holds NaN (missing values not allowed)")
        finite = data[~missing]
        edges: tuple[float, ...] = ()
        if len(finite):
            cuts = np.quantile(finite, np.arange(1, bins) / bins)
            edges = tuple(float(e) for e in np.unique(cuts))
        counts = np.bincount(np.searchsorted(edges, finite, side="left"), minlength=len(edges) + 1)
        expected = [float(c) / len(data) for c in counts]
        if allow_missing:
            expected.append(float(missing.sum()) / len(data))
        return cls(feature, edges, (), tuple(expected), False, allow_missing, len(data))

    @classmethod
    def categorical_of(
        cls, feature: str, values: Iterable[object], *, allow_missing: bool = False
    ) -> Reference:
        """One bin per category seen in training (most common first), one for new ones."""
        data = list(values)
        if not data:
            raise InvalidInput(f"reference for {feature!r} is empty")
        counts: dict[object, int] = {}
        missing = 0
        for value in data:
            if _is_missing(value):
                missing += 1
            else:
                counts[value] = counts.get(value, 0) + 1
        if missing and not allow_missing:
            raise InvalidInput(f"reference for {feature!r} holds NaN (missing values not allowed)")
        categories = tuple(sorted(counts, key=lambda c: -counts[c]))
        expected = [counts[c] / len(data) for c in categories] + [0.0]
        if allow_missing:
            expected.append(missing / len(data))
        return cls(feature, (), categories, tuple(expected), True, allow_missing, len(data))

    def shares(self, live: Iterable[object]) -> Array:
        """The share of `live` values in each bin."""
        counts = self._categorical_counts(live) if self.categorical else self._numeric_counts(live)
        total = float(counts.sum())
        if total == 0:
            raise InvalidInput(f"no live values of {self.feature!r} to compare")
        shares: Array = counts / total
        return shares

    def _numeric_counts(self, live: Iterable[object]) -> Array:
        data = _floats(self.feature, live)
        missing = np.isnan(data)
        if missing.any() and not self.allow_missing:
            raise InvalidInput(f"live values of {self.feature!r} hold NaN")
        index = np.searchsorted(self.edges, data[~missing], side="left")
        counts = np.bincount(index, minlength=len(self.edges) + 1).astype(np.float64)
        if self.allow_missing:
            counts = np.append(counts, float(missing.sum()))
        return counts

    def _categorical_counts(self, live: Iterable[object]) -> Array:
        position = {c: i for i, c in enumerate(self.categories)}
        unseen = len(self.categories)
        counts = np.zeros(len(self.expected), dtype=np.float64)
        for value in live:
            if _is_missing(value):
                if not self.allow_missing:
                    raise InvalidInput(f"live values of {self.feature!r} hold NaN")
                counts[-1] += 1
            else:
                counts[position.get(value, unseen)] += 1
        return counts


def _floats(feature: str, values: Iterable[object]) -> Array:
    try:
        data = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=float)
    except (TypeError, ValueError):
        raise InvalidInput(f"values of {feature!r} are not all numbers") from None
    if data.ndim != 1:
        raise InvalidInput(f"values of {feature!r} must be one column, got shape {data.shape}")
    return data


def psi(reference: Reference, live: Iterable[object], *, floor: float = FLOOR) -> float:
    """Population stability index of `live` against `reference`:
    sum over bins of (live - expected) * ln(live / expected), empty bins counted as `floor`."""
    actual = np.maximum(reference.shares(live), floor)
    expected = np.maximum(np.asarray(reference.expected), floor)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


@dataclass(frozen=True)
class FeatureShift:
    """A feature whose live window drifted from its training reference."""

    feature: str
    psi: float
    window: int


class FeatureDrift:
    """PSI of each feature over a sliding window of the latest `window` live values.

    `drifted()` lists the features above `threshold`; `check(now)` turns a feature that has
    just crossed it into a `DriftEvent` (one event per crossing: a feature must fall back under
    the threshold before it can raise another).
    """

    def __init__(
        self,
        references: Iterable[Reference],
        *,
        window: int = 1000,
        threshold: float = PSI_THRESHOLD,
        min_live: int = 200,
    ) -> None:
        if not 1 <= min_live <= window:
            raise InvalidInput(f"min_live must be between 1 and window ({window}), got {min_live}")
        if not threshold > 0:
            raise InvalidInput(f"threshold must be positive, got {threshold}")
        self.references = {r.feature: r for r in references}
        if not self.references:
            raise InvalidInput("no features to watch")
        self.window = window
        self.threshold = threshold
        self.min_live = min_live
        self._live: dict[str, deque[object]] = {
            name: deque(maxlen=window) for name in self.references
        }
        self._alarmed: set[str] = set()

    @classmethod
    def from_training(
        cls,
        spec: FeatureSpec,
        static: Array,
        *,
        bins: int = 10,
        features: Sequence[str] | None = None,
        window: int = 1000,
        threshold: float = PSI_THRESHOLD,
        min_live: int = 200,
    ) -> FeatureDrift:
        """References from the static feature rows a model was trained on (`Backlog.static`
        rows encoded with `spec`), where NaN means a missing value."""
        names = spec.names
        if static.ndim != 2 or static.shape[1] != len(names):
            raise InvalidInput(f"training rows must have {len(names)} columns ({spec.to_json()})")
        chosen = list(features) if features is not None else list(names)
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise InvalidInput(f"no feature {unknown[0]!r} in the model's features")
        references = []
        for name in chosen:
            column = static[:, names.index(name)]
            if name in spec.categorical_names:
                references.append(
                    Reference.categorical_of(name, column.tolist(), allow_missing=True)
                )
            else:
                references.append(Reference.numeric(name, column, bins=bins, allow_missing=True))
        return cls(references, window=window, threshold=threshold, min_live=min_live)

    def observe(self, values: Mapping[str, object]) -> None:
        """One task's values; a watched feature it lacks counts as missing."""
        for name, live in self._live.items():
            live.append(values.get(name, math.nan))

    def observe_rows(self, rows: Array, names: Sequence[str]) -> None:
        """Many tasks at once: `rows` has one column per name (e.g. `Backlog.static` rows and
        `backlog.spec.names`)."""
        if rows.ndim != 2 or rows.shape[1] != len(names):
            raise InvalidInput(f"rows must have {len(names)} columns, got shape {rows.shape}")
        for name, live in self._live.items():
            if name in names:
                live.extend(rows[:, list(names).index(name)].tolist())
            else:
                live.extend([math.nan] * len(rows))

    def scores(self) -> dict[str, float]:
        """PSI of each feature with at least `min_live` live values."""
        return {
            name: psi(self.references[name], live)
            for name, live in self._live.items()
            if len(live) >= self.min_live
        }

    def drifted(self) -> list[FeatureShift]:
        """The features above the threshold, largest PSI first."""
        shifts = [
            FeatureShift(name, value, len(self._live[name]))
            for name, value in self.scores().items()
            if value > self.threshold
        ]
        return sorted(shifts, key=lambda s: -s.psi)

    def check(self, now: float) -> list[DriftEvent]:
        """Events for the features that crossed the threshold since the last check."""
        shifts = self.drifted()
        above = {s.feature for s in shifts}
        fresh = [s for s in shifts if s.feature not in self._alarmed]
        self._alarmed = above
        return [DriftEvent(f"feature:{s.feature}", "PSI", 0.0, s.psi, now, s.window) for s in fresh]


# --- ADWIN on outcomes -----------------------------------------------------------------------


@dataclass(frozen=True)
class AdwinOptions:
    """How eagerly `DriftMonitor` raises an event. The defaults detect a doubling of one kind's
    durations within 32-256 of its outcomes (more for kinds predicted worse) and raised no
    false alarm on 10 x 50,000 stationary outcomes (`benchmarks/drift.py`)."""

    delta: float = 1e-4
    """ADWIN's confidence: the chance of a false cut at each check. On outcomes in arrival
    order (runs of similar tasks, which ADWIN's bound does not expect) river's default 0.002
    raised 4 false alarms in 10 x 50,000 outcomes and 1e-4 raised 1; 1e-4 costs about one
    `clock` of delay (`benchmarks/drift.md`)."""
    clock: int = 16
    """ADWIN looks for a cut every `clock` values: a detection is at most this late."""
    min_samples: int = 100
    """A signal raises nothing before this many outcomes: the window is too short to trust."""
    cooldown: int = 500
    """After an event, the signal raises nothing for this many of its outcomes: ADWIN restarts
    on the new level, and one drift gives one audit record, not a burst."""
    rises_only: bool = True
    """Only a rise in the error or the miss rate counts; a fall (faster tasks) is not a risk."""
    min_error_rise: float = 0.1
    """The smallest change of the mean log(actual / p50) that counts: 0.1 is about 10%."""
    min_miss_rise: float = 0.02
    """The smallest change of the miss rate that counts (absolute: two points)."""
    clip: float = 3.0
    """log(actual / p50) is clipped to ±clip: one task twenty times longer is one outlier."""
    recent: int = 1000
    """Values kept per signal to place the change and measure before and after it."""

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise InvalidInput(f"delta must be between 0 and 1, got {self.delta}")
        if self.clock < 1 or self.min_samples < 0 or self.cooldown < 0 or self.recent < 2:
            raise InvalidInput("clock and recent must be positive, min_samples and cooldown not")


class _Signal:
    """One watched series: its ADWIN, its recent values and its alarm bookkeeping."""

    def __init__(self, options: AdwinOptions) -> None:
        self.options = options
        self.adwin = self._new_adwin()
        self.recent: deque[float] = deque(maxlen=options.recent)
        self.seen = 0
        self.quiet_until = options.min_samples

    def update(self, value: float, min_rise: float) -> tuple[float, float, int] | None:
        """Feed one value; (before, after, samples since the change) when it drifted."""
        self.recent.append(value)
        self.seen += 1
        self.adwin.update(value)  # type: ignore[no-untyped-call]
        if not self.adwin.drift_detected:
            return None
        kept = int(self.adwin.width)
        # ADWIN's cut keeps old values (it cuts at bucket edges), which would dilute the new
        # level: place the change within the kept part instead, where a mean shift fits best.
        before, after, samples = _change(np.asarray(self.recent), kept)
        rise = after - before
        counts = abs(rise) >= min_rise and (rise > 0 or not self.options.rises_only)
        if self.seen >= self.quiet_until and counts:
            self.quiet_until = self.seen + self.options.cooldown
            return before, after, samples
        # Not an event: river would restart the detector empty on its next value and forget
        # the part it kept, so a real change caught early, or in a cool-down, would be lost.
        # Restart it with the kept values instead.
        self.adwin = self._new_adwin()
        for old in list(self.recent)[-kept:]:
            self.adwin.update(old)  # type: ignore[no-untyped-call]
        return None

    def _new_adwin(self) -> ADWIN:
        # Imported where used: river.drift pulls in scipy.stats, 1.6 s of every command's
        # start-up otherwise (a monitor has loaded it already).
        from river.drift import ADWIN

        # river's ADWIN has no annotations (river ships py.typed, so no stubs are looked for).
        return ADWIN(delta=self.options.delta, clock=self.options.clock)  # type: ignore[no-untyped-call]


def _change(values: Array, kept: int) -> tuple[float, float, int]:
    """Where the mean of `values` changed: the split that maximises the between-part sum of
    squares, looked for in the last `kept` values (the part ADWIN kept after its cut)."""
    n = len(values)
    if n < 2:
        return float(values.mean()), float(values.mean()), n
    sums = np.cumsum(values)
    total = sums[-1]
    first = max(1, n - max(kept, 2))
    # At least a few values after the split (ADWIN's own shortest sub-window is 5).
    k = np.arange(first, max(first + 1, n - 4))  # the first k values before the split
    left = sums[k - 1] / k
    right = (total - sums[k - 1]) / (n - k)
    best = int(k[np.argmax(k * (n - k) / n * (left - right) ** 2)])
    return float(values[:best].mean()), float(values[best:].mean()), n - best


class DriftMonitor:
    """ADWIN on outcomes, one at a time: per kind the duration predictor's error, overall the
    miss rate. `observe` returns the events the outcome raised (usually none)."""

    def __init__(self, options: AdwinOptions | None = None) -> None:
        # river (and the scipy it pulls in) loads here, with the monitor, and not at the first
        # outcome: in the live planner that would be a pause of a second or more mid-run.
        import river.drift  # noqa: F401

        self.options = options or AdwinOptions()
        self._errors: dict[str, _Signal] = {}
        self._misses: _Signal | None = None
        self.events: list[DriftEvent] = []
        """Every event raised so far, oldest first."""

    def observe(
        self, kind: str, predicted_p50: float, actual: float, missed: bool | None, now: float
    ) -> list[DriftEvent]:
        """One finished task: its kind, the p50 predicted for it, its true run time, whether it
        finished after its deadline (None without one) and the time it was recorded."""
        if not (math.isfinite(predicted_p50) and predicted_p50 > 0):
            raise InvalidInput(f"predicted p50 must be a positive number, got {predicted_p50}")
        if not (math.isfinite(actual) and actual >= 0):
            raise InvalidInput(f"actual duration must be a number >= 0, got {actual}")
        clip = self.options.clip
        error = max(-clip, min(clip, math.log(max(actual, 1e-3) / predicted_p50)))
        raised: list[DriftEvent] = []
        signal = self._errors.get(kind)
        if signal is None:
            signal = self._errors[kind] = _Signal(self.options)
        found = signal.update(error, self.options.min_error_rise)
        if found is not None:
            raised.append(DriftEvent(f"duration_error:{kind}", "ADWIN", *found[:2], now, found[2]))
        if missed is not None:
            if self._misses is None:
                self._misses = _Signal(self.options)
            found = self._misses.update(float(missed), self.options.min_miss_rise)
            if found is not None:
                raised.append(DriftEvent("miss_rate", "ADWIN", *found[:2], now, found[2]))
        self.events.extend(raised)
        return raised

    def observe_row(self, row: OutcomeRow, predicted_p50: float, now: float) -> list[DriftEvent]:
        """A recorded outcome. Only succeeded attempts count: a crash's run time says nothing
        about how long the work takes (failures are another signal)."""
        if row.failed:
            return []
        missed = None if row.due_at is None else row.finished_at > row.due_at
        actual = max(0.0, row.finished_at - row.started_at)
        return self.observe(row.kind, predicted_p50, actual, missed, now)
