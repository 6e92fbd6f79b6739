"""The scorers: hand-computed orders for fifo, edf, wspt and atc, and the learned scorer's bands.

A scorer ranks many rows of a `Backlog` at once: one number per row, lower starts first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from tactician.decide.features import Backlog, KindHistory, ScoredTask, as_rows
from tactician.decide.learned import Learned
from tactician.decide.scorers import (
    DEFAULT_ESTIMATE,
    LAST,
    SCORERS,
    Atc,
    PoolView,
    RankRequest,
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
    units: int = 1,
    pool: str = "p",
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
        units=units,
        pool=pool,
    )


def backlog_of(tasks: Sequence[ScoredTask], history: KindHistory | None = None) -> Backlog:
    backlog = Backlog()
    for task in tasks:
        backlog.add(task, history)
    return backlog


def request(
    tasks: Sequence[ScoredTask],
    now: float = 0.0,
    pools: Mapping[str, int | None] | None = None,
    history: KindHistory | None = None,
) -> RankRequest:
    """Every task as one row each, in the order given; `pools`: name → capacity."""
    backlog = backlog_of(tasks, history)
    views = {
        backlog.vocabulary.code("pool", name): PoolView(capacity=cap)
        for name, cap in (pools or {}).items()
    }
    return RankRequest(backlog, as_rows(range(len(tasks))), now, views)


def ranks(
    scorer: Scorer,
    tasks: Sequence[ScoredTask],
    now: float = 0.0,
    history: KindHistory | None = None,
) -> list[float]:
    return [float(r) for r in scorer.rank(request(tasks, now, history=history))]


def order(
    scorer: Scorer,
    tasks: Sequence[ScoredTask],
    now: float = 0.0,
    pools: Mapping[str, int | None] | None = None,
) -> list[str]:
    """Ids best first; ties go to the earlier submitted (as the simulator breaks them)."""
    got = scorer.rank(request(tasks, now, pools))
    seqs = np.array([t.seq for t in tasks])
    return [tasks[i].id for i in np.lexsort((seqs, got))]


# --- the classic rules -------------------------------------------------------------------------


def test_fifo_is_submission_order() -> None:
    tasks = [st("c", 2, due=1), st("a", 0, due=9), st("b", 1)]
    assert order(get_scorer("fifo"), tasks) == ["a", "b", "c"]
    assert ranks(get_scorer("fifo"), tasks) == [2.0, 0.0, 1.0]


def test_edf_is_earliest_deadline_first_and_no_deadline_last() -> None:
    tasks = [st("none", 0), st("late", 1, due=50), st("soon", 2, due=10)]
    assert order(get_scorer("edf"), tasks) == ["soon", "late", "none"]
    assert ranks(get_scorer("edf"), tasks) == [LAST, 50.0, 10.0]


def test_wspt_is_estimate_over_weight() -> None:
    # a: 10/1 = 10, b: 30/5 = 6, c: 4/1 = 4; a weight of 0 never goes first
    tasks = [
        st("a", 0, estimate=10),
        st("b", 1, estimate=30, weight=5),
        st("c", 2, estimate=4),
        st("zero", 3, estimate=1, weight=0),
    ]
    assert order(get_scorer("wspt"), tasks) == ["c", "b", "a", "zero"]
    assert ranks(get_scorer("wspt"), tasks) == [10.0, 6.0, 4.0, LAST]


def test_wspt_without_an_estimate_uses_the_kinds_median_at_submission_or_60s() -> None:
    scorer = get_scorer("wspt")
    history = KindHistory()
    assert ranks(scorer, [st("x", 0)], history=history) == [DEFAULT_ESTIMATE]
    for duration in (10.0, 20.0, 100.0):
        history.record("k", duration)
    tasks = [st("y", 0), st("z", 1, weight=2.0), st("other", 2, kind="other")]
    # median of 10, 20, 100 = 20; weight 2 halves it; a kind never seen gets the default
    assert ranks(scorer, tasks, history=history) == [20.0, 10.0, DEFAULT_ESTIMATE]
    # The median is the one known when the task arrived: a row added earlier keeps its own.
    backlog = backlog_of([st("early", 0)], history)
    history.record("k", 40.0)
    backlog.add(st("late", 1), history)  # median of 10, 20, 40, 100 = 30
    got = scorer.rank(RankRequest(backlog, as_rows([0, 1]), 0.0))
    assert list(got) == [20.0, 30.0]


def test_atc_index_by_hand() -> None:
    scorer = Atc(k=2.0)
    a = st("a", 0, due=100.0, estimate=10.0, weight=1.0)
    b = st("b", 1, due=30.0, estimate=30.0, weight=1.0)
    # Alone, p̄ = 10: rank a = -(1/10)·exp(-(100 - 10 - 0) / (2·10)) = -0.1·e^-4.5
    assert ranks(scorer, [a]) == [pytest.approx(-0.1 * math.exp(-4.5))]
    # Ranked together, p̄ = 20: a = -0.1·exp(-90/40); b has no slack: -1/30
    assert ranks(scorer, [a, b]) == [
        pytest.approx(-0.1 * math.exp(-2.25)),
        pytest.approx(-1 / 30),
    ]
    assert order(scorer, [a, b]) == ["b", "a"]
    # Later, a's slack is gone too and its higher weight per second wins.
    assert order(scorer, [a, b], now=95.0) == ["a", "b"]
    assert ranks(scorer, [a, b], now=95.0) == [pytest.approx(-0.1), pytest.approx(-1 / 30)]


def test_atc_without_deadline_ranks_after_those_with_one() -> None:
    scorer = get_scorer("atc")
    tasks = [st("free", 0, estimate=5.0), st("due", 1, due=1000.0, estimate=50.0)]
    assert order(scorer, tasks) == ["due", "free"]
    assert ranks(scorer, tasks)[0] == 0.0


@pytest.mark.parametrize("name", ["fifo", "edf", "wspt"])
def test_a_static_rank_is_per_row_whatever_else_is_ranked(name: str) -> None:
    tasks = [
        st("a", 0, due=40, estimate=20),
        st("b", 1, estimate=5, weight=2),
        st("c", 2, due=10, estimate=50, weight=3),
    ]
    scorer = get_scorer(name)
    assert scorer.time_dependent is False
    backlog = backlog_of(tasks)
    together = scorer.rank(RankRequest(backlog, as_rows([2, 0, 1]), 0.0))
    alone = [float(scorer.rank(RankRequest(backlog, as_rows([r]), 99.0))[0]) for r in (2, 0, 1)]
    assert list(together) == alone


def test_atc_and_learned_must_be_ranked_again_at_each_instant() -> None:
    assert get_scorer("atc").time_dependent is True
    assert Learned().time_dependent is True


def test_explanations_name_their_factors() -> None:
    tasks = [st("a", 0, due=100.0, estimate=10.0, weight=2.0), st("b", 1)]
    req = request(tasks, now=10.0)
    (edf,) = get_scorer("edf").explain(req)
    assert (edf.factor, edf.text) == ("deadline", "due in 90 s")
    no_deadline = RankRequest(req.backlog, as_rows([1, 0]), 10.0)
    (edf,) = get_scorer("edf").explain(no_deadline)
    assert edf.text == "no deadline: after every task that has one"
    (wspt,) = get_scorer("wspt").explain(req)
    assert wspt.text == "expected run 10 s, weight 2"
    value, urgency = get_scorer("atc").explain(req)
    assert value.factor == "value_rate" and value.contribution == pytest.approx(0.2)
    assert urgency.factor == "urgency" and urgency.text == "slack 80 s"
    value, urgency = get_scorer("atc").explain(no_deadline)
    assert (urgency.contribution, urgency.text) == (0.0, "no deadline")


def test_unknown_scorer_names_the_known_ones() -> None:
    with pytest.raises(InvalidInput, match="no policy 'lifo'; choose from fifo, edf, wspt, atc"):
        get_scorer("lifo")
    assert set(SCORERS) == {"fifo", "edf", "wspt", "atc"}
    assert all(get_scorer(name).name == name for name in SCORERS)


# --- the learned scorer, before any model ------------------------------------------------------


def test_learned_in_an_unbounded_pool_prefers_short_valuable_narrow_tasks() -> None:
    # Expected cost per unit of capacity: each task differs from "long" in one way only.
    tasks = [
        st("wide", 0, estimate=100.0, units=4),
        st("long", 1, estimate=100.0),
        st("valuable", 2, estimate=100.0, weight=5.0),
        st("short", 3, estimate=10.0, due=5.0),
    ]
    assert order(Learned(), tasks) == ["short", "valuable", "long", "wide"]
    # Without a bounded pool nothing is urgent or set aside: the same order at any time.
    assert order(Learned(), tasks, now=1000.0) == ["short", "valuable", "long", "wide"]


def test_learned_puts_the_urgent_first_and_sets_aside_what_cannot_be_on_time() -> None:
    tasks = [
        # Due in 20 s but expected to run 100 s: late wherever it goes.
        st("hopeless", 0, estimate=100.0, due=20.0),
        # Little slack left once its p90 is counted: it cannot wait for the rest.
        st("urgent", 1, estimate=10.0, due=30.0),
        st("relaxed", 2, estimate=10.0, due=1000.0),
        st("free", 3, estimate=5.0),
    ]
    scorer = Learned()
    assert order(scorer, tasks, pools={"p": 1}) == ["urgent", "free", "relaxed", "hopeless"]
    # Earliest deadline first would start the hopeless task and make the urgent one late too.
    assert order(get_scorer("edf"), tasks) == ["hopeless", "urgent", "relaxed", "free"]
    req = request(tasks, pools={"p": 1})
    deadline = scorer.explain(req)[0]
    assert deadline.factor == "deadline" and "cannot be on time: set aside" in deadline.text
    relaxed_first = RankRequest(req.backlog, as_rows([2, 0, 1, 3]), 0.0, req.pools)
    assert "has slack" in scorer.explain(relaxed_first)[0].text


@pytest.mark.parametrize("name", [*sorted(SCORERS), "learned"])
def test_runs_measured_at_zero_seconds_still_rank(name: str) -> None:
    """A kind whose runs all took 0 s (instant handlers, a clock's resolution) and a zero
    estimate: every scorer gives every task a number (found by an agent restarted on its
    history, whose planner stopped on a NaN rank)."""
    history = KindHistory()
    for _ in range(5):
        history.record("k", 0.0)
    tasks = [
        st("a", 0, due=10.0),
        st("b", 1),
        st("c", 2, estimate=0.0, weight=0.0),
    ]
    for pools in ({"p": 1}, None):
        scorer = Learned() if name == "learned" else get_scorer(name)
        got = scorer.rank(request(tasks, 1.0, pools, history))
        assert not np.isnan(got).any(), (pools, got)
