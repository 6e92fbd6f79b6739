"""Factors every scorer can use: aging (no task starves) and fair share across tenants.

Both wrap a scorer and keep its interface, so the planner, the simulator and the benchmarks use
them the same way:

    Aging(scorer, max_wait_s)     a task released longer than `max_wait_s` ago goes before
                                  every task that was not, oldest first (the wait counts from
                                  `release_at`: time spent waiting on a dependency counts too,
                                  as the backlog keeps no "ready since"). If it does not fit,
                                  it holds its pool (the planner's `HOLD_BELOW`): its wait is
                                  then bounded by max_wait_s plus the time the pool needs to
                                  free units for it and the tasks that aged before it.
    FairShare(scorer, shares)     Slurm's fair-share factor F = 2^(-U/S): U is the tenant's share
                                  of recent usage (unit-seconds, decaying with a half-life), S its
                                  share of the weights. The scorer's ranks become percentiles
                                  (0 best) and `weight x (1 - F)` is added: a tenant that used
                                  more than its share slides back, one that used less comes
                                  forward. Tasks without a tenant count as tenant "".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from tactician.decide.decision import Reason
from tactician.decide.features import Array, Backlog
from tactician.decide.scorers import RankRequest, Scorer, span_text

AGED = -1e15
"""Rank offset of an aged task: below any rank a scorer gives, and below the planner's
`HOLD_BELOW`, so that an aged task that does not fit holds its pool until it starts."""


def aged(ranks: Array, released: Array, now: float, max_wait_s: float) -> Array:
    """`ranks` with every task released more than `max_wait_s` ago put first, oldest first."""
    return np.where(now - released > max_wait_s, AGED + released, ranks)


class Aging:
    """See the module docstring."""

    time_dependent = True

    def __init__(self, inner: Scorer, max_wait_s: float) -> None:
        if not max_wait_s > 0:
            raise ValueError("max_wait_s must be positive")
        self.inner = inner
        self.max_wait_s = max_wait_s
        self.name = inner.name

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)  # observe, history, fits... of a learning scorer

    def rank(self, request: RankRequest) -> Array:
        ranks = self.inner.rank(request)
        return aged(ranks, request.backlog.release[request.rows], request.now, self.max_wait_s)

    def explain(self, request: RankRequest) -> list[Reason]:
        reasons = self.inner.explain(request)
        waited = request.now - float(request.backlog.release[request.rows[0]])
        if waited > self.max_wait_s:
            reasons.insert(
                0,
                Reason(
                    "aging",
                    1.0,
                    f"ready for {span_text(waited)}, over the "
                    f"{span_text(self.max_wait_s)} limit: goes first",
                ),
            )
        return reasons


class FairBook:
    """Tenants' recent usage and the fair-share factor it gives; `adjust` applies it to ranks.
    Kept by the FairShare wrapper (simulator, benchmarks) and by the live ranker (from a
    bundle's `objective.fair_share`)."""

    def __init__(
        self, shares: Mapping[str, float], *, weight: float = 0.5, half_life_s: float = 3600.0
    ) -> None:
        if not (0.0 <= weight <= 10.0) or math.isnan(weight):
            raise ValueError("fair-share weight must be between 0 and 10")
        self.shares = dict(shares)
        self.weight = weight
        self.half_life_s = half_life_s
        self._usage: dict[str, float] = {}
        self._at = 0.0

    def used(self, tenant: str, unit_seconds: float, at: float) -> None:
        """Record usage (e.g. units x run time of a finished task) at time `at`."""
        self._decay(at)
        self._usage[tenant] = self._usage.get(tenant, 0.0) + unit_seconds

    def _decay(self, at: float) -> None:
        if at > self._at:
            factor = 0.5 ** ((at - self._at) / self.half_life_s)
            self._usage = {k: v * factor for k, v in self._usage.items()}
            self._at = at

    def factor(self, tenant: str, now: float) -> float:
        """F = 2^(-U/S) in (0, 1]: 1 for an idle tenant, 0.5 at exactly its share."""
        self._decay(now)
        total_usage = sum(self._usage.values())
        total_share = sum(self.shares.values()) or 1.0
        share = self.shares.get(tenant, 0.0) / total_share
        if total_usage <= 0:
            return 1.0
        usage = self._usage.get(tenant, 0.0) / total_usage
        if share <= 0:
            return 0.0 if usage > 0 else 1.0
        return float(2.0 ** (-usage / share))

    def adjust(self, ranks: Array, tenants: Sequence[str], now: float) -> Array:
        """Ranks become percentiles (0 best; tied ranks share the lowest of the tie, so fair
        share decides ties) plus `weight x (1 - F)` of each task's tenant."""
        count = len(ranks)
        if count == 0:
            return ranks
        ordered = np.sort(ranks)
        percentile = np.searchsorted(ordered, ranks, side="left") / max(1, count - 1)
        factors = {t: self.factor(t, now) for t in set(tenants)}
        penalty = np.array([1.0 - factors[t] for t in tenants])
        result: Array = percentile + self.weight * penalty
        return result


class FairShare:
    """See the module docstring."""

    time_dependent = True

    def __init__(
        self,
        inner: Scorer,
        shares: Mapping[str, float],
        *,
        weight: float = 0.5,
        half_life_s: float = 3600.0,
        book: FairBook | None = None,
    ) -> None:
        """With `book`, rank by that accounting (the live ranker's) instead of a new one."""
        self.book = book or FairBook(shares, weight=weight, half_life_s=half_life_s)
        self.inner = inner
        self.name = inner.name
        self.weight = weight

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def used(self, tenant: str, unit_seconds: float, at: float) -> None:
        self.book.used(tenant, unit_seconds, at)

    def factor(self, tenant: str, now: float) -> float:
        return self.book.factor(tenant, now)

    def _tenants(self, backlog: Backlog, rows: np.ndarray) -> list[str]:
        return [backlog.tasks[r].tenant or "" for r in rows.tolist()]

    def rank(self, request: RankRequest) -> Array:
        ranks = self.inner.rank(request)
        tenants = self._tenants(request.backlog, request.rows)
        return self.book.adjust(ranks, tenants, request.now)

    def explain(self, request: RankRequest) -> list[Reason]:
        reasons = self.inner.explain(request)
        tenant = self._tenants(request.backlog, request.rows[:1])[0]
        value = self.factor(tenant, request.now)
        shown = tenant or "(none)"
        reasons.append(
            Reason(
                "fair_share",
                -self.weight * (1 - value),
                f"tenant {shown}: fair-share factor {value:.2f}"
                + (" (used more than its share)" if value < 0.5 else ""),
            )
        )
        return reasons
