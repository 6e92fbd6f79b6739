"""The learned scorer: predicted durations, lateness risk and weight, learning as it goes.

For each pool, at each instant:

1. **Predict.** Each waiting task's duration as p50 and p90 (LightGBM quantiles on what was
   known at submission, corrected between refits by `Adapter`); without a model, the estimate
   or the kind's median with the spread seen in training (or a default one).
2. **Triage deadlines** (Moore-Hodgson, generalised to a pool of m units): list the tasks with
   a deadline earliest first and project each one's start in a fluid model of the pool:
   `now + R / m^2 + W / m` for R the work left of the running tasks and W the work ahead of
   it (exact for one unit; for many, the first start comes after about R / m^2 and then the
   work ahead drains m units at a time). A task counts as late only if a somewhat short run of
   its own (about its p35) would still miss: a task with a fair chance is tried, not given up.
   While some task would be late, the costliest task (duration x units / weight^a) at or
   before the first late one is set aside as **lost**: it cannot be on time without making
   others late. A lost task stays lost.
3. **Order.** Deadline tasks that would be late if they waited for the pool's backlog to
   clear are **urgent** and go first, by due - p50 / 2 (between earliest deadline and least
   slack). Everything else goes by expected cost per unit of capacity: Smith's rule with the
   weights of bounded slowdown, in expectation over the predicted p10/p50/p90
   (`slowdown_index`), a task's weight including that of the submitted tasks waiting for it.
   Lost tasks go last, in the same order, so they still finish as soon as capacity allows.

This is the general policy of `tactician simulate --policy ai`: no per-workload settings. It
learns from every finished task (`observe`) and refits its predictors every `refit_every`
outcomes (doubling from `first_fit` so that it learns early), on all outcomes seen so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tactician.decide.decision import Reason
from tactician.decide.features import Array, Backlog, FeatureSpec, KindHistory
from tactician.decide.predictors import (
    DEFAULT_SIGMA,
    Z90,
    Adapter,
    ModelSet,
    Outcomes,
    fit,
    miss_probability,
)
from tactician.decide.scorers import DEFAULT_ESTIMATE, RankRequest, Rows, span_text
from tactician.errors import InvalidInput

URGENT, NORMAL, LOST = 0.0, 1.0, 2.0
SLOWDOWN_TAU = 10.0
"""Seconds below which a run counts as this long when ranking for slowdown."""
BAND = 1e12
"""Rank offset per band: a band's ranks never meet the next one's."""


SWANSON = (0.3, 0.4, 0.3)
"""Swanson's rule: a distribution known by its p10, p50 and p90 weighs them 0.3, 0.4, 0.3."""


def slowdown_index(p10: Array, p50: Array, p90: Array, units: Array, weight: Array) -> Array:
    """Smith's rule for expected bounded slowdown (WSEPT): the expected run, per unit of
    capacity, over the expected slowdown weight E[weight / max(p, tau)], both from the
    predicted quantiles by Swanson's rule (p10 unknown: p50^2 / p90, the log-normal's).
    Lower goes first. A task that may well be short (a crash-prone user's job) counts its
    chance of being short without being taken for short: an index on p10 alone put every such
    job first, an index on p50 alone put them with the long ones."""
    low = np.where(np.isnan(p10), p50 * p50 / p90, p10)
    a, b, c = SWANSON
    mean = a * low + b * p50 + c * p90
    inverse = (
        a / np.maximum(low, SLOWDOWN_TAU)
        + b / np.maximum(p50, SLOWDOWN_TAU)
        + c / np.maximum(p90, SLOWDOWN_TAU)
    )
    result: Array = mean * units / (weight * inverse)
    return result


@dataclass(frozen=True)
class _Triage:
    """A pool's last full ranking, for deciding arrivals against it."""

    now: float
    first_start: float
    m: float
    clear: float
    due: Array
    """Deadlines of the kept tasks, earliest first."""
    work_upto: Array
    """Work of the kept tasks up to and including each of them (same order)."""


@dataclass(frozen=True)
class Objective:
    """What the learned scorer trades off; part of the policy bundle."""

    weight_exponent: float = 0.0
    """a: how much a task's weight protects it from being set aside (0: every deadline counts
    the same, as the missed-deadline count does; 1: in proportion to weight)."""
    optimism: float = 0.0
    """Triage plans with p50 x (p50 / p90)^optimism: 0 plans with p50; 1 with about p10, so a
    task is set aside only when even a short run would be late (noisy predictions)."""
    lst: float = 0.5
    """Urgent tasks go by due - lst x p50: 1 is least slack first, 0 earliest deadline first
    (in between does best on the scenarios: least slack alone lets long tasks crowd out
    short ones)."""
    hope: float = 0.25
    """A task is late in the triage if its start plus p50 x (p50 / p90)^hope of its own run
    passes its deadline (0.25: about p35 for a log-normal), while the work ahead of it is
    planned with the optimism above: a task that may well be on time if started soon is kept
    and tried rather than set aside (most of what is set aside at light load is tasks whose p50
    alone overruns their slot, and a good part of those would have made it)."""
    max_iterations: int = 64
    """Tasks set aside per pool per ranking, at most (the rest wait for the next instant)."""


class Learned:
    """See the module docstring."""

    name = "learned"
    time_dependent = True

    def __init__(
        self,
        objective: Objective | None = None,
        models: ModelSet | None = None,
        *,
        learn: bool = True,
        first_fit: int = 200,
        refit_every: int = 5000,
    ) -> None:
        self.objective = objective or Objective()
        self.models = models
        self.learn = learn
        self.history = KindHistory()
        self.adapter = Adapter()
        self._model_id = 0 if models is None else 1
        self._triage: dict[int, _Triage] = {}
        self._lost = np.zeros(0, dtype=bool)
        """Per backlog row: set aside as unable to be on time (stays so)."""
        self._rows: list[int] = []
        self._duration: list[float] = []
        self._failed: list[bool] = []
        self._finished: list[float] = []
        self._left: list[float] = []
        self.next_fit = first_fit
        self._refit_every = refit_every
        self.fits: list[ModelSet] = []

    @property
    def model_version(self) -> str | None:
        return None if self.models is None else self.models.version

    # --- learning --------------------------------------------------------------------------

    def observe(
        self,
        backlog: Backlog,
        row: int,
        duration: float,
        *,
        failed: bool,
        started_at: float,
        finished_at: float,
    ) -> None:
        due = float(backlog.due[row])
        kind = backlog.tasks[row].kind
        self.history.record(kind, duration, failed=failed, late=finished_at > due)
        if backlog.model[row] == self._model_id:
            self.adapter.learn(int(backlog.kind[row]), float(backlog.raw50[row]), duration)
        if not self.learn:
            return
        self._rows.append(row)
        self._duration.append(duration)
        self._failed.append(failed)
        self._finished.append(finished_at)
        self._left.append(due - started_at)
        seen = len(self._rows)
        if seen >= self.next_fit:
            self.next_fit = min(2 * seen, seen + self._refit_every)
            self.refit(backlog)

    def outcomes(self) -> Outcomes:
        return Outcomes(
            rows=np.asarray(self._rows, dtype=np.int64),
            duration=np.asarray(self._duration),
            failed=np.asarray(self._failed, dtype=bool),
            finished_at=np.asarray(self._finished),
            time_left_at_start=np.asarray(self._left),
        )

    def refit(self, backlog: Backlog) -> ModelSet | None:
        """Fit on every outcome seen so far; keep the new models only if they were accepted."""
        spec = FeatureSpec.infer(backlog.tasks[row].features for row in self._rows)
        backlog.respec(spec)
        try:
            models = fit(backlog, self.outcomes(), default_duration=DEFAULT_ESTIMATE)
        except InvalidInput:
            return None
        self.fits.append(models)
        if models.p50 is None:
            return None
        self.use(models)
        return models

    def use(self, models: ModelSet) -> None:
        """Rank with these models from now on (every waiting task is predicted again)."""
        self.models = models
        self._model_id += 1
        self.adapter.reset()

    # --- ranking ---------------------------------------------------------------------------

    def predicted(self, backlog: Backlog, rows: Rows) -> tuple[Array, Array]:
        """p50 and p90 of `rows`, predicting those not yet predicted by the current models."""
        stale = rows[backlog.model[rows] != self._model_id]
        if len(stale):
            if self.models is None or backlog.spec != self.models.spec:
                low = backlog.fallback_duration(stale, DEFAULT_ESTIMATE)
                backlog.p50[stale] = low
                backlog.p90[stale] = low * math.exp(Z90 * DEFAULT_SIGMA)
                backlog.p10[stale] = math.nan
                backlog.ood[stale] = False
            else:
                self.models.predict(backlog, stale, DEFAULT_ESTIMATE)
            backlog.raw50[stale] = backlog.p50[stale]
            factor = self.adapter.factors(backlog.kind[stale])
            backlog.p10[stale] *= factor
            backlog.p50[stale] *= factor
            backlog.p90[stale] *= factor
            backlog.model[stale] = self._model_id
        return backlog.p50[rows], backlog.p90[rows]

    def rank(self, request: RankRequest) -> Array:
        backlog, rows = request.backlog, request.rows
        result = np.empty(len(rows))
        if len(rows) == 0:
            return result
        pools = backlog.pool[rows]
        if pools.min() == pools.max():
            return self._rank_pool(request, rows, int(pools[0]))[0]
        for code in np.unique(pools):
            mine = np.flatnonzero(pools == code)
            result[mine] = self._rank_pool(request, rows[mine], int(code))[0]
        return result

    @staticmethod
    def _weight(backlog: Backlog, rows: Rows) -> Array:
        """A task's worth, including the tasks waiting for it (Smith's rule on the value it
        unblocks)."""
        return np.maximum(backlog.weight[rows] + backlog.dependents[rows], 1e-9)

    def index(self, backlog: Backlog, rows: Rows, p50: Array, p90: Array, weight: Array) -> Array:
        """The order of tasks without deadline pressure, lower first: expected cost per unit
        of capacity (`slowdown_index` on the predicted quantiles)."""
        return slowdown_index(backlog.p10[rows], p50, p90, backlog.units[rows], weight)

    def _lost_mask(self, rows: Rows) -> npt.NDArray[np.bool_]:
        needed = int(rows.max()) + 1 if len(rows) else 0
        if needed > len(self._lost):
            grown = np.zeros(max(needed, 2 * len(self._lost)), dtype=bool)
            grown[: len(self._lost)] = self._lost
            self._lost = grown
        return self._lost[rows]

    def _rank_pool(self, request: RankRequest, rows: Rows, pool: int) -> tuple[Array, Array]:
        """Ranks and bands (URGENT, NORMAL, LOST) of the rows of one pool."""
        backlog, now, objective = request.backlog, request.now, self.objective
        p50, p90 = self.predicted(backlog, rows)
        units = backlog.units[rows]
        weight = self._weight(backlog, rows)
        due = backlog.due[rows]
        index = self.index(backlog, rows, p50, p90, weight)
        view = request.pools.get(pool)
        lost = self._lost_mask(rows)
        if view is None or view.capacity is None:
            return index, np.full(len(rows), NORMAL)
        m = float(view.capacity)
        q = p50 * (p50 / p90) ** objective.optimism
        own = p50 * (p50 / p90) ** objective.hope
        order = np.flatnonzero(~np.isnan(due) & ~lost)
        order = order[np.argsort(due[order], kind="stable")]
        work = q[order] * units[order]
        cost = work / weight[order] ** objective.weight_exponent
        keep = np.ones(len(order), dtype=bool)
        first_start = now + view.busy_work / (m * m)
        for _ in range(objective.max_iterations):
            kept = np.where(keep, work, 0.0)
            late = keep & (first_start + (np.cumsum(kept) - kept) / m + own[order] > due[order])
            if not late.any():
                break
            first = int(np.argmax(late))
            drop = int(np.argmax(np.where(keep[: first + 1], cost[: first + 1], -np.inf)))
            keep[drop] = False
            lost[order[drop]] = True
            self._lost[rows[order[drop]]] = True
        # Urgent: kept, and late if it waited for the whole backlog to clear.
        clear = (view.busy_work + float((q * units)[~lost].sum())) / m
        band = np.full(len(rows), NORMAL)
        kept_rows = order[keep]
        band[kept_rows[due[kept_rows] - now - p90[kept_rows] < clear]] = URGENT
        band[lost] = LOST
        within = np.where(band == URGENT, due - objective.lst * p50, index)
        self._triage[pool] = _Triage(
            now, first_start, m, clear, due[kept_rows], np.cumsum(work[keep])
        )
        return band * BAND + within, band

    def rank_arrival(self, request: RankRequest, row: int) -> float:
        """The rank of one new task against its pool's last full ranking, in O(log n): its
        projected start is read from that ranking's deadline order. The next full ranking may
        revise it (it can set another task aside instead). Falls back to ranking the pool
        when there is no such ranking."""
        backlog, now = request.backlog, request.now
        rows = np.array([row], dtype=np.int64)
        pool = int(backlog.pool[row])
        p50a, p90a = self.predicted(backlog, rows)
        p50, p90 = float(p50a[0]), float(p90a[0])
        index = float(self.index(backlog, rows, p50a, p90a, self._weight(backlog, rows))[0])
        view = request.pools.get(pool)
        due = float(backlog.due[row])
        if view is None or view.capacity is None:
            return index
        if math.isnan(due):
            return NORMAL * BAND + index
        triage = self._triage.get(pool)
        if triage is None:
            return float(self.rank(RankRequest(backlog, rows, now, request.pools))[0])
        own = p50 * (p50 / p90) ** self.objective.hope
        at = int(np.searchsorted(triage.due, due, side="right"))
        ahead = float(triage.work_upto[at - 1]) if at else 0.0
        start = triage.first_start + (now - triage.now) + ahead / triage.m
        if start + own > due:
            self._lost_mask(rows)
            self._lost[row] = True
            return LOST * BAND + index
        if due - now - p90 < triage.clear:
            return URGENT * BAND + due - self.objective.lst * p50
        return NORMAL * BAND + index

    # --- explaining ------------------------------------------------------------------------

    def explain(self, request: RankRequest) -> list[Reason]:
        backlog, row = request.backlog, request.rows[:1]
        pool = int(backlog.pool[row][0])
        same = request.rows[backlog.pool[request.rows] == pool]
        ranks, bands = self._rank_pool(request, same, pool)
        at = int(np.flatnonzero(same == row[0])[0])
        p50, p90 = float(backlog.p50[row][0]), float(backlog.p90[row][0])
        weight = float(backlog.weight[row][0])
        due = float(backlog.due[row][0])
        band = bands[at]
        reasons: list[Reason] = []
        run = f"predicted run {span_text(p50)} (p90 {span_text(p90)})"
        if math.isnan(due):
            reasons.append(Reason("deadline", 0.0, "no deadline"))
        else:
            left = due - request.now
            p_miss = float(miss_probability(np.array([p50]), np.array([p90]), np.array([left]))[0])
            verdict = {URGENT: "urgent", NORMAL: "has slack", LOST: "cannot be on time: set aside"}
            reasons.append(
                Reason(
                    "deadline",
                    p_miss,
                    f"due in {span_text(left)}, {run} → {verdict[band]}"
                    f" (P(late if started now) {p_miss:.0%})",
                )
            )
        reasons.append(Reason("weight", weight, f"weight {weight:g}"))
        seqs = backlog.seq[same]
        ahead = int(((ranks < ranks[at]) | ((ranks == ranks[at]) & (seqs < seqs[at]))).sum())
        reasons.append(
            Reason(
                "position",
                1.0 - ahead / len(same),
                f"{ahead + 1} of {len(same)} in its pool",
            )
        )
        if self.models is not None:
            top = [c for c in self.models.contributions(backlog, int(row[0])) if c[0] != "bias"]
            if top:
                text = ", ".join(f"{name} {value:+.2f}" for name, value in top[:3])
                reasons.append(Reason("duration_model", top[0][1], f"log-duration drivers: {text}"))
        if bool(backlog.ood[row][0]):
            reasons.append(
                Reason("confidence", -1.0, "features outside what the model was trained on")
            )
        return reasons
