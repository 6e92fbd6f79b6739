"""The baseline scorers: hand-computed orders for fifo, edf, wspt and atc."""

from __future__ import annotations

import math

import pytest

from tactician.decide.scorers import (
    DEFAULT_ESTIMATE,
    SCORERS,
    Atc,
    ScoredTask,
    Scorer,
    get_scorer,
)
from tactician.errors import InvalidInput


def st(
    task_id: str,
    seq: int,
    *,
    kind: str = "k",
    due: float | None = None,
    weight: float = 1.0,
    estimate: float | None = None,
) -> ScoredTask:
    return ScoredTask(
        id=task_id,
        kind=kind,
        seq=seq,
        submit_at=float(seq),
        release_at=float(seq),
        due_at=due,
        weight=weight,
        estimate=estimate,
    )


def order(scorer: Scorer, tasks: list[ScoredTask], now: float = 0.0) -> list[str]:
    ranks = {t.id: scorer.rank(t, now) for t in tasks}
    return [t.id for t in sorted(tasks, key=lambda t: (ranks[t.id], t.seq))]


def test_fifo_is_submission_order() -> None:
    tasks = [st("c", 2, due=1), st("a", 0, due=9), st("b", 1)]
    assert order(get_scorer("fifo"), tasks) == ["a", "b", "c"]


def test_edf_is_earliest_deadline_first_and_no_deadline_last() -> None:
    tasks = [st("none", 0), st("late", 1, due=50), st("soon", 2, due=10)]
    assert order(get_scorer("edf"), tasks) == ["soon", "late", "none"]


def test_wspt_is_estimate_over_weight() -> None:
    # a: 10/1 = 10, b: 30/5 = 6, c: 4/1 = 4
    tasks = [st("a", 0, estimate=10), st("b", 1, estimate=30, weight=5), st("c", 2, estimate=4)]
    assert order(get_scorer("wspt"), tasks) == ["c", "b", "a"]


def test_wspt_without_an_estimate_uses_the_kinds_median_or_60s() -> None:
    scorer = get_scorer("wspt")
    assert scorer.rank(st("x", 0), 0.0) == DEFAULT_ESTIMATE
    for i, estimate in enumerate((10.0, 20.0, 100.0)):
        scorer.rank(st(f"e{i}", i, estimate=estimate), 0.0)
    assert scorer.rank(st("y", 5), 0.0) == 20.0  # median of 10, 20, 100
    assert scorer.rank(st("z", 6, weight=2.0), 0.0) == 10.0
    assert scorer.rank(st("other", 7, kind="other"), 0.0) == DEFAULT_ESTIMATE
    scorer.rank(st("e3", 8, estimate=40.0), 0.0)
    assert scorer.rank(st("w", 9), 0.0) == 30.0  # median of 10, 20, 40, 100


def test_atc_index_by_hand() -> None:
    scorer = Atc(k=2.0)
    a = st("a", 0, due=100.0, estimate=10.0, weight=1.0)
    b = st("b", 1, due=30.0, estimate=30.0, weight=1.0)
    # p̄ = 10 after seeing a; rank a = -(1/10)·exp(-(100-10-0)/(2·10)) = -0.1·e^-4.5
    assert scorer.rank(a, 0.0) == pytest.approx(-0.1 * math.exp(-4.5))
    # p̄ = 20 after seeing b; b has no slack: rank = -1/30
    assert scorer.rank(b, 0.0) == pytest.approx(-1 / 30)
    # a again with p̄ = 20: -(0.1)·exp(-90/40)
    assert scorer.rank(a, 0.0) == pytest.approx(-0.1 * math.exp(-2.25))
    assert order(scorer, [a, b]) == ["b", "a"]
    # Later, a's slack is gone and its higher w/p wins.
    assert order(scorer, [a, b], now=95.0) == ["a", "b"]


def test_atc_without_deadline_ranks_after_those_with_one() -> None:
    scorer = get_scorer("atc")
    tasks = [st("free", 0, estimate=5.0), st("due", 1, due=1000.0, estimate=50.0)]
    assert order(scorer, tasks) == ["due", "free"]


def test_unknown_scorer_names_the_known_ones() -> None:
    with pytest.raises(InvalidInput, match="no policy 'lifo'; choose from fifo, edf, wspt, atc"):
        get_scorer("lifo")
    assert set(SCORERS) == {"fifo", "edf", "wspt", "atc"}
    assert all(get_scorer(name).name == name for name in SCORERS)
