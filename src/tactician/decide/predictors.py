"""Predictors fitted from recorded outcomes: duration quantiles, failure, missing the deadline.

`fit` takes the static feature rows of finished tasks (as a `Backlog` encoded them when the
tasks arrived) and what happened, holds out the latest `valid_fraction` by finish time, and fits:

    duration   LightGBM quantile regression of log(actual / baseline): p10, p50 and p90
    failure    LightGBM binary classifier, when the outcomes hold failures
    miss       P(duration > time left) from the p50/p90 spread (a log-normal through both)

Each predictor is scored on the held-out rows next to its naive baseline (duration: the task's
estimate, else its kind's median; failure and miss: the kind's rate) and is **refused** when it
does not beat it: `ModelSet` then leaves it out and scorers fall back to the baseline.

A `ModelSet` is a value: `to_bytes`/`from_bytes` round-trip it exactly and its `version` is the
SHA-256 of those bytes, so a decision names the models that made it. `Adapter` (river) corrects
the duration between refits: an exponentially weighted mean, per kind, of log(actual / p50).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
from river import stats as river_stats
from scipy.special import ndtr  # type: ignore[import-untyped]  # scipy ships no stubs

from tactician.decide.features import Array, Backlog, FeatureSpec
from tactician.errors import InvalidInput

Z90 = 1.2815515655446004
"""The standard normal's 90th percentile."""
MIN_SIGMA = 0.05
DEFAULT_SIGMA = 0.6
"""Spread of log(duration) assumed without a model (a factor of about 2.2 between p50 and p90)."""
MIN_ROWS = 50
"""Fewer finished tasks than this and no predictor is fitted."""
REFERENCE_ROWS = 1000
"""Training rows kept with a model set as the reference of feature drift (about 100 kB)."""

PARAMS: dict[str, Any] = {
    "num_leaves": 15,
    "learning_rate": 0.15,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.9,
    "num_threads": 1,
    "deterministic": True,
    "force_row_wise": True,
    "seed": 7,
    "verbose": -1,
}
ROUNDS = 40
PARALLEL_ROWS = 20_000
"""Predict with two threads from this many rows up; below it, OpenMP's start-up and spinning
cost more than they save (and a busy machine makes it far worse)."""


def _threads(rows: int) -> int:
    return 2 if rows >= PARALLEL_ROWS else 1


@dataclass(frozen=True)
class Validation:
    """A predictor's error on held-out rows next to its naive baseline's."""

    predictor: str
    metric: str
    model: float
    baseline: float
    baseline_name: str
    rows: int
    accepted: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "predictor": self.predictor,
            "metric": self.metric,
            "model": round(self.model, 6),
            "baseline": round(self.baseline, 6),
            "baseline_name": self.baseline_name,
            "rows": self.rows,
            "accepted": self.accepted,
        }


@dataclass(frozen=True)
class Outcomes:
    """What happened to finished tasks, row for row with `rows` of a backlog."""

    rows: npt.NDArray[np.int64]
    duration: Array
    failed: npt.NDArray[np.bool_]
    finished_at: Array
    time_left_at_start: Array
    """due_at - start (NaN without a deadline): whether the task could still be on time."""


@dataclass
class ModelSet:
    """The fitted predictors, what they read, and how well they did."""

    spec: FeatureSpec
    p50: lgb.Booster | None
    p90: lgb.Booster | None
    p10: lgb.Booster | None
    failure: lgb.Booster | None
    validations: list[Validation]
    trained_from: float
    trained_to: float
    rows: int
    ranges: dict[str, tuple[float, float]]
    """Numeric feature → (low, high) seen in training: outside it a task is out of distribution."""
    centre: list[float]
    scale: list[float]
    limit: float
    """Mean squared standardised distance above which a row is out of distribution."""
    kind_median: dict[int, float] = field(default_factory=dict)
    spread: dict[int, float] = field(default_factory=dict)
    vocabulary: dict[str, dict[str, int]] = field(default_factory=dict)
    """The category codes the models were trained with: a backlog that serves them must start
    from these (`Vocabulary(models.vocabulary)`), or a code would mean another value."""
    miss_accepted: bool = False
    """Per kind: log(p90 / p50) of actual / baseline in training: the baseline's own spread,
    used when the duration model was refused."""
    reference: list[list[float | None]] = field(default_factory=list)
    """A sample of the training rows (None: missing), the reference a drift detector compares
    live tasks' features with (population stability index)."""
    version: str = ""

    def __post_init__(self) -> None:
        if not self.version:
            self.version = hashlib.sha256(self.to_bytes()).hexdigest()[:16]

    @property
    def short(self) -> str:
        return self.version[:12]

    # --- predicting ------------------------------------------------------------------------

    def predict(self, backlog: Backlog, rows: npt.NDArray[np.int64], default: float) -> None:
        """Fill p10, p50, p90, p_fail and ood of `rows` (the backlog must be encoded with
        `spec`); p10 stays NaN without its model."""
        if len(rows) == 0:
            return
        if backlog.spec != self.spec:
            raise InvalidInput(f"models {self.short} read other features than the backlog holds")
        x = backlog.static[rows]
        base = self.baseline(backlog, rows, default)
        backlog.p10[rows] = math.nan
        if self.p50 is not None and self.p90 is not None:
            threads = _threads(len(rows))
            low = base * np.exp(self.p50.predict(x, num_threads=threads))
            high = np.maximum(base * np.exp(self.p90.predict(x, num_threads=threads)), low * 1.01)
            if self.p10 is not None:
                short = base * np.exp(self.p10.predict(x, num_threads=threads))
                backlog.p10[rows] = np.minimum(short, low)
        else:
            size = max(self.spread, default=-1) + 1
            table = np.full(size + 1, Z90 * DEFAULT_SIGMA)
            for code, value in self.spread.items():
                table[code] = value
            low, high = base, base * np.exp(table[np.minimum(backlog.kind[rows], size)])
        backlog.p50[rows] = low
        backlog.p90[rows] = high
        if self.failure is not None:
            backlog.p_fail[rows] = self.failure.predict(x, num_threads=_threads(len(rows)))
        backlog.ood[rows] = self.out_of_distribution(x)

    def baseline(self, backlog: Backlog, rows: npt.NDArray[np.int64], default: float) -> Array:
        """The naive duration the models correct: the estimate, else the kind's median in
        training, else `default`."""
        estimate = backlog.estimate[rows]
        kinds = backlog.kind[rows]
        size = max(self.kind_median, default=-1) + 1
        table = np.full(size + 1, default)
        for code, value in self.kind_median.items():
            table[code] = value
        median = table[np.minimum(kinds, size)]
        return np.maximum(np.where(np.isnan(estimate), median, estimate), 1e-3)

    def out_of_distribution(self, x: Array) -> npt.NDArray[np.bool_]:
        """Rows outside the training ranges of any numeric feature, or far from the training
        rows' centre over all of them together (mean squared z-score above `limit`)."""
        if not self.ranges:
            return np.zeros(len(x), dtype=bool)
        names = self.spec.names
        values = x[:, [names.index(n) for n in self.ranges]]
        bounds = np.asarray(list(self.ranges.values()))
        # NaN (a missing feature) compares False on both sides: it is never outside.
        beyond = (values < bounds[:, 0]) | (values > bounds[:, 1])
        outside = np.asarray(beyond.any(axis=1), dtype=np.bool_)
        z = (values - np.asarray(self.centre)) / np.asarray(self.scale)
        z = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        np.square(z, out=z)
        outside |= z.mean(axis=1) > self.limit
        return outside

    def contributions(self, backlog: Backlog, row: int) -> list[tuple[str, float]]:
        """Each feature's share of the predicted log(p50), largest first (LightGBM
        `pred_contrib`); empty without a duration model."""
        if self.p50 is None:
            return []
        raw = self.p50.predict(backlog.static[row : row + 1], pred_contrib=True)[0]
        pairs = [(name, float(raw[i])) for i, name in enumerate(self.spec.names)]
        return sorted(pairs, key=lambda p: -abs(p[1]))

    # --- storing ---------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """What the registry shows: no model bytes."""
        return {
            "version": self.version,
            "features": list(self.spec.names),
            "categorical": list(self.spec.categorical_names),
            "trained_from": self.trained_from,
            "trained_to": self.trained_to,
            "rows": self.rows,
            "predictors": {
                "duration": self.p50 is not None,
                "failure": self.failure is not None,
                "miss": self.miss_accepted,
            },
            "validation": [v.to_json() for v in self.validations],
        }

    def to_bytes(self) -> bytes:
        body = {
            "spec": self.spec.to_json(),
            "p50": None if self.p50 is None else self.p50.model_to_string(),
            "p90": None if self.p90 is None else self.p90.model_to_string(),
            "p10": None if self.p10 is None else self.p10.model_to_string(),
            "failure": None if self.failure is None else self.failure.model_to_string(),
            "validations": [v.to_json() for v in self.validations],
            "trained_from": self.trained_from,
            "trained_to": self.trained_to,
            "rows": self.rows,
            "ranges": {k: list(v) for k, v in self.ranges.items()},
            "centre": self.centre,
            "scale": self.scale,
            "limit": self.limit,
            "kind_median": {str(k): v for k, v in self.kind_median.items()},
            "spread": {str(k): v for k, v in self.spread.items()},
            "vocabulary": self.vocabulary,
            "miss_accepted": self.miss_accepted,
            "reference": self.reference,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, version: str = "") -> ModelSet:
        try:
            body = json.loads(data)
            spec = FeatureSpec(tuple(body["spec"]["numeric"]), tuple(body["spec"]["categorical"]))

            def booster(text: str | None) -> lgb.Booster | None:
                return None if text is None else lgb.Booster(model_str=text)

            found = cls(
                spec=spec,
                p50=booster(body["p50"]),
                p90=booster(body["p90"]),
                p10=booster(body["p10"]),
                failure=booster(body["failure"]),
                validations=[Validation(**v) for v in body["validations"]],
                trained_from=body["trained_from"],
                trained_to=body["trained_to"],
                rows=body["rows"],
                ranges={k: (v[0], v[1]) for k, v in body["ranges"].items()},
                centre=body["centre"],
                scale=body["scale"],
                limit=body["limit"],
                kind_median={int(k): v for k, v in body["kind_median"].items()},
                spread={int(k): v for k, v in body["spread"].items()},
                vocabulary=body["vocabulary"],
                miss_accepted=body["miss_accepted"],
                reference=body.get("reference", []),  # model sets saved before it had none
            )
        except (KeyError, TypeError, ValueError, lgb.basic.LightGBMError) as exc:
            raise InvalidInput(f"not a model set: {exc}") from None
        if version and found.version != version:
            raise InvalidInput(f"model set hash {found.version} does not match {version}")
        return found


# --- fitting ---------------------------------------------------------------------------------


def _split(outcomes: Outcomes, valid_fraction: float) -> tuple[npt.NDArray[np.int64], ...]:
    order = np.argsort(outcomes.finished_at, kind="stable")
    cut = int(len(order) * (1.0 - valid_fraction))
    return order[:cut], order[cut:]


def _log_loss(p: Array, y: npt.NDArray[np.bool_]) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))


def _kind_rate(kinds: npt.NDArray[np.int64], flags: npt.NDArray[np.bool_]) -> dict[int, float]:
    rates: dict[int, float] = {}
    for code in np.unique(kinds):
        chosen = flags[kinds == code]
        rates[int(code)] = float((chosen.sum() + 0.5) / (len(chosen) + 1.0))
    return rates


def miss_probability(p50: Array, p90: Array, time_left: Array) -> Array:
    """P(duration > time_left) for a log-normal through p50 and p90; 1 when no time is left,
    NaN without a deadline."""
    sigma = np.maximum((np.log(p90) - np.log(p50)) / Z90, MIN_SIGMA)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (np.log(np.maximum(time_left, 1e-9)) - np.log(p50)) / sigma
    result: Array = 1.0 - ndtr(z)
    result = np.where(time_left <= 0, 1.0, result)
    return np.where(np.isnan(time_left), np.nan, result)


def fit(
    backlog: Backlog,
    outcomes: Outcomes,
    *,
    valid_fraction: float = 0.2,
    default_duration: float = 60.0,
) -> ModelSet:
    """Fit the predictors from `outcomes` (rows of `backlog`); refuse those that do not beat
    their baselines on the held-out latest `valid_fraction`."""
    count = len(outcomes.rows)
    if count < MIN_ROWS:
        raise InvalidInput(f"{count} finished tasks is too few to train on (need {MIN_ROWS})")
    if not 0.05 <= valid_fraction <= 0.5:
        raise InvalidInput(f"valid_fraction must be between 0.05 and 0.5, got {valid_fraction}")
    spec = backlog.spec
    names = list(spec.names)
    categorical = [names.index(n) for n in spec.categorical_names]
    x = backlog.static[outcomes.rows]
    train, valid = _split(outcomes, valid_fraction)
    kinds = backlog.kind[outcomes.rows]

    kind_median = {
        int(code): float(np.median(outcomes.duration[train][kinds[train] == code]))
        for code in np.unique(kinds[train])
    }

    def baseline_duration(index: npt.NDArray[np.int64]) -> Array:
        estimate = backlog.estimate[outcomes.rows[index]]
        median = np.array([kind_median.get(int(k), default_duration) for k in kinds[index]])
        return np.maximum(np.where(np.isnan(estimate), median, estimate), 1e-3)

    # The models learn the log of actual / baseline: they start from the naive answer and
    # only correct it (quantile boosting moves slowly from a poor start).
    everything = np.arange(count)
    y = np.log(np.maximum(outcomes.duration, 1e-3)) - np.log(baseline_duration(everything))

    def booster(objective: dict[str, Any], target: Array) -> lgb.Booster:
        data = lgb.Dataset(
            x[train],
            target[train],
            feature_name=names,
            categorical_feature=categorical,
            free_raw_data=False,
            params={"verbose": -1},
        )
        return lgb.train({**PARAMS, **objective}, data, num_boost_round=ROUNDS)

    spread = {}
    for code in np.unique(kinds[train]):
        residual = y[train][kinds[train] == code]
        spread[int(code)] = max(
            float(np.quantile(residual, 0.9) - np.quantile(residual, 0.5)), Z90 * MIN_SIGMA
        )
    validations: list[Validation] = []
    actual = outcomes.duration[valid]
    p50 = booster({"objective": "quantile", "alpha": 0.5}, y)
    p90 = booster({"objective": "quantile", "alpha": 0.9}, y)
    p10 = booster({"objective": "quantile", "alpha": 0.1}, y)
    base = baseline_duration(valid)
    predicted = base * np.exp(p50.predict(x[valid]))
    upper = np.maximum(base * np.exp(p90.predict(x[valid])), predicted * 1.01)
    mae, base_mae = (
        float(np.mean(np.abs(predicted - actual))),
        float(np.mean(np.abs(base - actual))),
    )
    duration_ok = mae < base_mae
    has_estimate = bool(np.any(~np.isnan(backlog.estimate[outcomes.rows])))
    validations.append(
        Validation(
            "duration_p50",
            "mae_s",
            mae,
            base_mae,
            "estimate, else kind median" if has_estimate else "kind median",
            len(valid),
            duration_ok,
        )
    )
    validations.append(
        Validation(
            "duration_p90",
            "coverage",
            float(np.mean(actual <= upper)),
            0.9,
            "target coverage",
            len(valid),
            duration_ok,
        )
    )
    lower = np.minimum(base * np.exp(p10.predict(x[valid])), predicted)
    validations.append(
        Validation(
            "duration_p10",
            "coverage",
            float(np.mean(actual <= lower)),
            0.1,
            "target coverage",
            len(valid),
            duration_ok,
        )
    )

    failure: lgb.Booster | None = None
    failed = outcomes.failed
    if failed[train].any() and not failed[train].all():
        model = booster({"objective": "binary"}, failed.astype(np.float64))
        rates = _kind_rate(kinds[train], failed[train])
        prior = float(failed[train].mean())
        base_p = np.array([rates.get(int(k), prior) for k in kinds[valid]])
        loss, base_loss = (
            _log_loss(np.asarray(model.predict(x[valid]), dtype=np.float64), failed[valid]),
            _log_loss(base_p, failed[valid]),
        )
        accepted = loss < base_loss
        validations.append(
            Validation("failure", "log_loss", loss, base_loss, "kind rate", len(valid), accepted)
        )
        failure = model if accepted else None

    miss_accepted = False
    has_due = ~np.isnan(outcomes.time_left_at_start[valid])
    if has_due.any():
        left = outcomes.time_left_at_start[valid][has_due]
        missed = actual[has_due] > left
        prob = miss_probability(predicted[has_due], upper[has_due], left)
        base_prob = miss_probability(
            base[has_due], base[has_due] * math.exp(Z90 * DEFAULT_SIGMA), left
        )
        loss, base_loss = _log_loss(prob, missed), _log_loss(base_prob, missed)
        validations.append(
            Validation(
                "miss",
                "log_loss",
                loss,
                base_loss,
                "baseline duration, log-normal spread",
                int(has_due.sum()),
                loss < base_loss,
            )
        )
        miss_accepted = loss < base_loss

    numeric = [n for n in names if n not in spec.categorical_names]
    columns = [names.index(n) for n in numeric]
    seen = x[train][:, columns]
    ranges: dict[str, tuple[float, float]] = {}
    centre: list[float] = []
    scale: list[float] = []
    for j, name in enumerate(numeric):
        values = seen[:, j][~np.isnan(seen[:, j])]
        if len(values) == 0:
            continue
        low, high = float(values.min()), float(values.max())
        margin = 0.1 * (high - low) if high > low else abs(high) * 0.1 + 1e-9
        ranges[name] = (low - margin, high + margin)
        centre.append(float(values.mean()))
        scale.append(float(values.std()) or 1.0)
    kept = [names.index(n) for n in ranges]
    z = (x[train][:, kept] - np.asarray(centre)) / np.asarray(scale)
    distance = np.nanmean(np.where(np.isnan(z), 0.0, z) ** 2, axis=1) if kept else np.zeros(1)
    limit = float(np.quantile(distance, 0.999)) * 1.5 if len(distance) else math.inf

    sample = x[train]
    if len(sample) > REFERENCE_ROWS:
        picked = np.random.default_rng(0).choice(len(sample), REFERENCE_ROWS, replace=False)
        sample = sample[np.sort(picked)]
    reference = [[None if math.isnan(v) else float(v) for v in row] for row in sample.tolist()]

    return ModelSet(
        spec=spec,
        reference=reference,
        p50=p50 if duration_ok else None,
        p90=p90 if duration_ok else None,
        p10=p10 if duration_ok else None,
        failure=failure,
        validations=validations,
        trained_from=float(outcomes.finished_at.min()),
        trained_to=float(outcomes.finished_at.max()),
        rows=count,
        ranges=ranges,
        centre=centre,
        scale=scale,
        limit=limit,
        kind_median=kind_median,
        spread=spread,
        vocabulary=backlog.vocabulary.to_json(),
        miss_accepted=miss_accepted,
    )


class Adapter:
    """Between refits: per kind, an exponentially weighted mean of log(actual / predicted p50),
    applied as a factor to new predictions (river's EWMean)."""

    def __init__(self, fading: float = 0.01, min_seen: int = 50) -> None:
        self.fading = fading
        self.min_seen = min_seen
        self._means: dict[int, river_stats.EWMean] = {}
        self._seen: dict[int, int] = {}

    def reset(self) -> None:
        self._means.clear()
        self._seen.clear()

    def learn(self, kind: int, predicted: float, actual: float) -> None:
        if not (0 < predicted < math.inf and 0 < actual < math.inf):
            return
        mean = self._means.get(kind)
        if mean is None:
            mean = self._means[kind] = river_stats.EWMean(fading_factor=self.fading)
        mean.update(max(-3.0, min(3.0, math.log(actual / predicted))))
        self._seen[kind] = self._seen.get(kind, 0) + 1

    def factors(self, kinds: npt.NDArray[np.int64]) -> Array:
        """exp(mean log ratio) per row's kind; 1 for a kind seen fewer than min_seen times."""
        table = {
            k: math.exp(m.get()) for k, m in self._means.items() if self._seen[k] >= self.min_seen
        }
        if not table:
            return np.ones(len(kinds))
        return np.array([table.get(int(k), 1.0) for k in kinds])
