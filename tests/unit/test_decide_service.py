"""The decision service's core: `decide(snapshot, scorer, policy)` and `pending_reason`.

A snapshot and a time in, one `Decision` per waiting task out: the same snapshot, models and
policy give the same decisions field for field; each action (run, defer-until, merge-into,
hold, escalate) has the case that triggers it; explained rows carry the scorer's factors.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import pytest

from tactician.decide.decision import Action, Decision, Tier
from tactician.decide.features import Backlog, FeatureValue, ScoredTask, as_rows
from tactician.decide.learned import Learned
from tactician.decide.scorers import Atc, Edf, Fifo, PoolView, RankRequest
from tactician.decide.service import (
    SPREAD_FOR_ZERO_CONFIDENCE,
    DecidePolicy,
    MergeRule,
    Snapshot,
    confidence,
    decide,
    merges,
    pending_reason,
)
from tactician.errors import InvalidInput
from tactician.sim.policies import pretrain, split
from tactician.sim.scenarios import build
from tactician.sim.simulator import scored
from tactician.sim.workload import WorkloadTask

NOW = 1000.0


def st(
    task_id: str,
    seq: int,
    *,
    kind: str = "k",
    submit: float | None = None,
    release: float | None = None,
    due: float | None = None,
    weight: float = 1.0,
    estimate: float | None = 60.0,
    pool: str = "p",
    tenant: str | None = None,
    features: Mapping[str, FeatureValue] | None = None,
) -> ScoredTask:
    submit_at = float(seq) if submit is None else submit
    return ScoredTask(
        id=task_id,
        kind=kind,
        seq=seq,
        submit_at=submit_at,
        release_at=submit_at if release is None else release,
        due_at=due,
        weight=weight,
        estimate=estimate,
        pool=pool,
        tenant=tenant,
        features=features or {},
    )


def snapshot_of(
    tasks: Sequence[ScoredTask],
    *,
    now: float = NOW,
    pools: Mapping[str, PoolView] | None = None,
    **extra: Mapping[int, str],
) -> Snapshot:
    """Every task waiting, one row each in the order given; `pools`: name → view."""
    backlog = Backlog()
    for task in tasks:
        backlog.add(task)
    views = {backlog.vocabulary.code("pool", name): v for name, v in (pools or {}).items()}
    return Snapshot(backlog, as_rows(range(len(tasks))), now, views, **extra)


def by_id(decisions: Sequence[Decision]) -> dict[str, Decision]:
    return {d.task_id: d for d in decisions}


# --- reproducible decisions on a trained learner ---------------------------------------------

SCENARIO = build("incidents", tasks=600, seed=3)
HEAD, TAIL = split(SCENARIO.tasks, 0.5)
WAITING = 61
"""Tail tasks submitted by the snapshot's time (one storm of 35 duplicate alerts among them)."""
EXPLAINED = (0, 5, 17, 40, 60)
"""Positions in the snapshot whose decisions are explained."""


def trained_snapshot(history: Sequence[WorkloadTask]) -> tuple[Learned, Snapshot]:
    """A learned scorer trained from scratch on `history`, and a snapshot of the first tail
    tasks waiting at the last one's submission, the on-call pool full."""
    learner = Learned()
    backlog = pretrain(learner, history)
    start = len(backlog)
    waiting = TAIL[:WAITING]
    rows = [backlog.add(scored(t, start + i), learner.history) for i, t in enumerate(waiting)]
    capacity = SCENARIO.capacity["oncall"]
    pools = {
        backlog.vocabulary.code("pool", "oncall"): PoolView(
            capacity=capacity, busy_units=capacity, busy_work=900.0
        )
    }
    return learner, Snapshot(backlog, as_rows(rows), waiting[-1].submit_at, pools)


def decide_trained(
    learner: Learned, snapshot: Snapshot, policy: DecidePolicy | None = None
) -> list[Decision]:
    assert learner.models is not None
    return decide(
        snapshot,
        learner,
        policy or DecidePolicy(version="bundle-7"),
        model_version=learner.models.version,
        explain=[int(snapshot.rows[k]) for k in EXPLAINED],
    )


@pytest.fixture(scope="module")
def trained() -> tuple[Learned, Snapshot]:
    return trained_snapshot(HEAD)


def test_the_scenario_trains_a_duration_model(trained: tuple[Learned, Snapshot]) -> None:
    learner, _ = trained
    assert learner.models is not None
    assert learner.models.p50 is not None, "the duration model was refused: nothing to explain"


def test_same_snapshot_models_and_policy_give_the_same_decisions(
    trained: tuple[Learned, Snapshot],
) -> None:
    learner, snapshot = trained
    first = decide_trained(learner, snapshot)
    again = decide_trained(learner, snapshot)
    fresh_learner, fresh_snapshot = trained_snapshot(HEAD)
    assert fresh_learner is not learner and fresh_snapshot.backlog is not snapshot.backlog
    assert learner.models is not None and fresh_learner.models is not None
    assert fresh_learner.models.version == learner.models.version
    fresh = decide_trained(fresh_learner, fresh_snapshot)

    assert len(first) == WAITING
    assert {d.action for d in first} >= {Action.RUN, Action.DEFER, Action.ESCALATE}
    for other in (again, fresh):
        for a, b in zip(first, other, strict=True):
            for name in (f.name for f in dataclasses.fields(Decision)):
                assert getattr(a, name) == getattr(b, name), (a.task_id, name)
        assert other == first
    # What was compared is real: explained rows have reasons, versions are recorded.
    explained = [first[k] for k in EXPLAINED]
    assert all(d.reasons for d in explained)
    assert all(not d.reasons for k, d in enumerate(first) if k not in EXPLAINED)
    assert {d.model_version for d in first} == {learner.models.version}
    assert {d.policy_version for d in first} == {"bundle-7"}
    assert [d.task_id for d in first] == [t.id for t in TAIL[:WAITING]]
    assert sorted(d.score for d in first) == [(k + 1) / WAITING for k in range(WAITING)]


def test_another_policy_or_model_version_is_recorded(trained: tuple[Learned, Snapshot]) -> None:
    learner, snapshot = trained
    assert learner.models is not None
    base = decide_trained(learner, snapshot)
    other_policy = decide_trained(learner, snapshot, DecidePolicy(version="bundle-8"))
    assert {d.policy_version for d in other_policy} == {"bundle-8"}
    assert [d.evolve(policy_version="bundle-7") for d in other_policy] == base

    other_learner, other_snapshot = trained_snapshot(HEAD[:250])
    assert other_learner.models is not None
    assert other_learner.models.version != learner.models.version
    other_model = decide_trained(other_learner, other_snapshot)
    assert {d.model_version for d in other_model} == {other_learner.models.version}
    assert [d.task_id for d in other_model] == [d.task_id for d in base]
    assert [d.confidence for d in other_model] != [d.confidence for d in base]


def test_a_decision_names_no_model_unless_the_caller_passes_it(
    trained: tuple[Learned, Snapshot],
) -> None:
    """`decide` does not read the scorer's model: the version is the caller's to pass."""
    learner, snapshot = trained
    unnamed = decide(snapshot, learner, DecidePolicy())
    assert {d.model_version for d in unnamed} == {None}
    assert {d.policy_version for d in unnamed} == {"builtin"}


# --- actions ----------------------------------------------------------------------------------


def test_a_task_whose_window_has_not_opened_is_deferred_until_its_release() -> None:
    snapshot = snapshot_of([st("now", 0), st("later", 1, submit=900.0, release=NOW + 300.0)])
    got = by_id(decide(snapshot, Fifo(), DecidePolicy()))
    assert got["later"].action is Action.DEFER
    assert got["later"].defer_until == NOW + 300.0
    assert got["now"].action is Action.RUN and got["now"].defer_until is None


def slack_tasks() -> list[ScoredTask]:
    return [
        st("relaxed", 0, due=NOW + 100_000.0, estimate=60.0),
        st("tight", 1, due=NOW + 200.0, estimate=60.0),
        st("open", 2, due=None, estimate=60.0),
    ]


def test_a_task_with_plenty_of_slack_is_deferred_while_its_pool_is_full() -> None:
    full = PoolView(capacity=2, busy_units=2, busy_work=120.0)
    snapshot = snapshot_of(slack_tasks(), pools={"p": full})
    got = by_id(decide(snapshot, Edf(), DecidePolicy(defer_slack_factor=3.0)))
    # Clearing the pool: (120 s running + 3 x 60 s waiting) / 2 units = 150 s.
    clear = (120.0 + 3 * 60.0) / 2
    slack = 100_000.0 - 60.0  # no prediction: p90 falls back to the 60 s estimate
    assert got["relaxed"].action is Action.DEFER
    assert got["relaxed"].defer_until == pytest.approx(NOW + slack - 3.0 * clear)
    assert got["tight"].action is Action.RUN
    assert got["open"].action is Action.RUN  # no deadline, no slack to spend


@pytest.mark.parametrize("busy", [0, 1])
def test_a_task_with_plenty_of_slack_runs_when_its_pool_has_room(busy: int) -> None:
    room = PoolView(capacity=2, busy_units=busy, busy_work=60.0 * busy)
    snapshot = snapshot_of(slack_tasks(), pools={"p": room})
    got = decide(snapshot, Edf(), DecidePolicy())
    assert [d.action for d in got] == [Action.RUN] * 3


def test_a_task_with_slack_in_an_unbounded_pool_runs() -> None:
    snapshot = snapshot_of(slack_tasks(), pools={"p": PoolView(capacity=None, busy_units=50)})
    assert [d.action for d in decide(snapshot, Edf(), DecidePolicy())] == [Action.RUN] * 3


REMEDIATE = MergeRule(kind="remediate", key="{kind}/{features.fingerprint}", window_s=600)


def alert(task_id: str, seq: int, at: float, fingerprint: str | None) -> ScoredTask:
    features: dict[str, FeatureValue] = {"severity": 2}
    if fingerprint is not None:
        features["fingerprint"] = fingerprint
    return st(task_id, seq, kind="remediate", submit=at, features=features)


def merge_tasks() -> list[ScoredTask]:
    return [
        alert("a1", 0, 0.0, "db/DiskFull"),
        alert("b1", 1, 10.0, "api/Latency"),
        alert("a2", 2, 60.0, "db/DiskFull"),
        alert("a3", 3, 600.0, "db/DiskFull"),  # exactly at the end of a1's window
        alert("nofp", 4, 620.0, None),
        alert("a4", 5, 700.0, "db/DiskFull"),  # outside a1's window: starts its own
        st("other", 6, kind="deploy", submit=710.0, features={"fingerprint": "db/DiskFull"}),
        alert("a5", 7, 900.0, "db/DiskFull"),  # inside a4's window
        alert("b2", 8, 950.0, "api/Latency"),  # 940 s after b1: outside
    ]


def test_duplicates_inside_the_window_merge_into_the_first() -> None:
    snapshot = snapshot_of(merge_tasks())
    got = by_id(decide(snapshot, Fifo(), DecidePolicy(merge=(REMEDIATE,))))
    into = {task_id: d.merge_into for task_id, d in got.items() if d.action is Action.MERGE}
    assert into == {"a2": "a1", "a3": "a1", "a5": "a4"}
    for task_id in ("a1", "b1", "nofp", "a4", "other", "b2"):
        assert got[task_id].action is Action.RUN, task_id
        assert got[task_id].merge_into is None


def test_merges_follow_submission_order_not_the_snapshots() -> None:
    tasks = merge_tasks()
    backlog = Backlog()
    for task in tasks:
        backlog.add(task)
    shuffled = Snapshot(backlog, as_rows([8, 5, 2, 0, 7, 3, 1, 6, 4]), NOW)
    assert merges(shuffled, (REMEDIATE,)) == {2: 0, 3: 0, 7: 5}


def test_a_task_missing_the_keys_field_merges_with_nothing() -> None:
    snapshot = snapshot_of([alert("x1", 0, 0.0, None), alert("x2", 1, 5.0, None)])
    assert merges(snapshot, (REMEDIATE,)) == {}


def test_without_merge_rules_nothing_merges() -> None:
    snapshot = snapshot_of(merge_tasks())
    assert Action.MERGE not in {d.action for d in decide(snapshot, Fifo(), DecidePolicy())}


def test_a_merge_key_naming_an_unknown_field_is_invalid_input() -> None:
    rule = MergeRule(kind="remediate", key="{kind}/{region}", window_s=600)
    snapshot = snapshot_of(merge_tasks())
    with pytest.raises(InvalidInput, match="unknown field 'region'"):
        decide(snapshot, Fifo(), DecidePolicy(merge=(rule,)))


def test_merge_keys_may_name_the_tenant() -> None:
    rule = MergeRule(kind="send", key="{tenant}", window_s=60)
    tasks = [
        st("acme1", 0, kind="send", submit=0.0, tenant="acme"),
        st("beta1", 1, kind="send", submit=1.0, tenant="beta"),
        st("acme2", 2, kind="send", submit=30.0, tenant="acme"),
    ]
    assert merges(snapshot_of(tasks), (rule,)) == {2: 0}


def test_a_held_task_is_held_whatever_else_applies() -> None:
    tasks = [*merge_tasks(), st("future", 9, release=NOW + 60.0)]
    snapshot = snapshot_of(tasks, held={2: "alice: maintenance window", 9: "bob"})
    got = by_id(decide(snapshot, Fifo(), DecidePolicy(merge=(REMEDIATE,))))
    assert got["a2"].action is Action.HOLD
    assert got["a2"].note == "held by alice: maintenance window"
    assert got["a2"].merge_into is None
    assert got["future"].action is Action.HOLD and got["future"].defer_until is None
    assert got["a3"].action is Action.MERGE  # holding a2 does not change a3's merge


def spread_snapshot(p90_over_p50: Sequence[float], ood: Sequence[bool]) -> Snapshot:
    tasks = [st(f"t{k}", k, due=NOW + 10_000.0) for k in range(len(p90_over_p50))]
    snapshot = snapshot_of(tasks)
    backlog = snapshot.backlog
    for row, (ratio, outside) in enumerate(zip(p90_over_p50, ood, strict=True)):
        backlog.p50[row] = 100.0
        backlog.p90[row] = 100.0 * ratio
        backlog.ood[row] = outside
    return snapshot


def test_confidence_comes_from_the_predicted_spread() -> None:
    snapshot = spread_snapshot([1.0, 2.0, 3.0, 4.0, 9.0, 1.0], [False] * 5 + [True])
    got = confidence(snapshot.backlog, snapshot.rows)
    expected = [1.0, 1 - math.log(2) / SPREAD_FOR_ZERO_CONFIDENCE, 1 - math.log(3) / math.log(4)]
    assert got.tolist() == pytest.approx([*expected, 0.0, 0.0, 0.0])
    unpredicted = snapshot_of([st("x", 0)])
    assert confidence(unpredicted.backlog, unpredicted.rows).tolist() == [1.0]


def test_low_confidence_is_escalated() -> None:
    snapshot = spread_snapshot([1.5, 3.0, 5.0], [False] * 3)
    got = decide(snapshot, Edf(), DecidePolicy(confidence_threshold=0.3))
    assert [d.action for d in got] == [Action.RUN, Action.ESCALATE, Action.ESCALATE]
    assert got[1].confidence == pytest.approx(1 - math.log(3) / math.log(4))
    assert got[1].note == "confidence 0.21 below 0.3: asks tier 2"
    assert all(d.tier is Tier.RULES for d in got)  # tier 1's answer stands meanwhile
    lenient = decide(snapshot, Edf(), DecidePolicy(confidence_threshold=0.1))
    assert [d.action for d in lenient] == [Action.RUN, Action.RUN, Action.ESCALATE]


def test_out_of_distribution_is_escalated() -> None:
    snapshot = spread_snapshot([1.1, 1.1], [False, True])
    got = decide(snapshot, Edf(), DecidePolicy())
    assert [d.action for d in got] == [Action.RUN, Action.ESCALATE]
    assert got[1].note is not None and "outside the training range" in got[1].note
    assert got[1].confidence == 0.0


def test_out_of_distribution_is_not_escalated_for_it_when_the_policy_says_so() -> None:
    """With a threshold of 0 the OOD flag alone decides: off, the row runs."""
    snapshot = spread_snapshot([1.1], [True])
    policy = DecidePolicy(confidence_threshold=0.0, escalate_out_of_distribution=False)
    assert decide(snapshot, Edf(), policy)[0].action is Action.RUN


def test_out_of_distribution_is_not_escalated_under_the_default_threshold_when_off() -> None:
    snapshot = spread_snapshot([1.1], [True])
    policy = DecidePolicy(escalate_out_of_distribution=False)  # threshold 0.3
    assert decide(snapshot, Edf(), policy)[0].action is Action.RUN


def test_an_empty_snapshot_gives_no_decisions() -> None:
    snapshot = Snapshot(Backlog(), as_rows([]), NOW)
    assert decide(snapshot, Fifo(), DecidePolicy()) == []


# --- pending reasons --------------------------------------------------------------------------


def reasons_for(snapshot: Snapshot, policy: DecidePolicy | None = None) -> dict[str, str]:
    decisions = decide(snapshot, Edf(), policy or DecidePolicy())
    return {
        d.task_id: pending_reason(snapshot, row, d)
        for row, d in zip(snapshot.rows.tolist(), decisions, strict=True)
    }


def test_pending_reasons_name_what_the_task_waits_for() -> None:
    tasks = [
        st("held", 0, due=NOW + 100.0),
        st("approval", 1, due=NOW + 100.0),
        st("dependency", 2, due=NOW + 100.0),
        alert("first", 3, 10.0, "db/DiskFull"),
        alert("duplicate", 4, 20.0, "db/DiskFull"),
        st("window", 5, release=NOW + 300.0, due=NOW + 10_000.0),
        st("slack", 6, due=NOW + 100_000.0),
        st("limited", 7, due=NOW + 100.0),
        st("breaker", 8, due=NOW + 100.0),
        st("full", 9, due=NOW + 100.0),
    ]
    snapshot = snapshot_of(
        tasks,
        pools={"p": PoolView(capacity=1, busy_units=1, busy_work=30.0)},
        held={0: "alice: change freeze"},
        waiting_on={1: "approval", 2: "a dependency"},
        blocked={7: "rate limit of 10/min on kind k", 8: "circuit open"},
    )
    got = reasons_for(snapshot, DecidePolicy(merge=(REMEDIATE,)))
    assert got["held"] == "held by alice: change freeze"
    assert got["approval"] == "awaiting approval"
    assert got["dependency"] == "awaiting a dependency"
    assert got["duplicate"] == "merged into first"
    assert got["window"] == "deferred until its window opens in 5 min"
    assert re.fullmatch(r"deferred for \d+(\.\d)? h: has slack", got["slack"]), got["slack"]
    assert got["limited"] == "rate limit of 10/min on kind k"
    assert got["breaker"] == "circuit open"
    assert got["full"] == "pool full"
    assert got["first"] == "pool full"


def test_a_task_with_room_in_its_pool_is_next_in_line() -> None:
    tasks = [st("a", 0, due=NOW + 100.0), st("b", 1, pool="unbounded")]
    snapshot = snapshot_of(tasks, pools={"p": PoolView(capacity=2, busy_units=1)})
    assert reasons_for(snapshot) == {"a": "next in line", "b": "next in line"}


def test_the_deferral_in_the_pending_reason_matches_the_decision() -> None:
    snapshot = snapshot_of(
        [st("slack", 0, due=NOW + 7200.0)],
        pools={"p": PoolView(capacity=1, busy_units=1, busy_work=0.0)},
    )
    (decision,) = decide(snapshot, Edf(), DecidePolicy())
    # slack 7200 - 60 = 7140 s; clearing the pool takes 60 s; defer 7140 - 3 x 60 = 6960 s.
    assert decision.defer_until == pytest.approx(NOW + 6960.0)
    assert pending_reason(snapshot, 0, decision) == "deferred for 116 min: has slack"


# --- explanations -----------------------------------------------------------------------------


def test_learned_explanations_tie_the_decision_to_its_data(
    trained: tuple[Learned, Snapshot],
) -> None:
    learner, snapshot = trained
    assert learner.models is not None
    rows = snapshot.rows.tolist()
    decisions = decide(snapshot, learner, DecidePolicy(), explain=rows)
    backlog = snapshot.backlog
    ranks = learner.rank(RankRequest(backlog, snapshot.rows, snapshot.now, snapshot.pools))
    for k, (row, d) in enumerate(zip(rows, decisions, strict=True)):
        texts = [r.text for r in d.reasons]
        factors = [r.factor for r in d.reasons]
        assert factors[:3] == ["deadline", "weight", "position"], factors
        deadline = texts[0]
        assert deadline.startswith("due in ") and "predicted run " in deadline
        assert "(p90 " in deadline and "P(late if started now)" in deadline
        assert texts[1] == f"weight {float(backlog.weight[row]):g}"
        # The position agrees with the decision's score: score = (n - position) / n.
        match = re.fullmatch(r"(\d+) of (\d+) in its pool", texts[2])
        assert match is not None, texts[2]
        place, count = int(match.group(1)), int(match.group(2))
        assert count == WAITING
        ties = int((ranks == ranks[k]).sum()) - 1
        position = round(WAITING * (1 - d.score))
        assert place - 1 <= position <= place - 1 + ties
        if not ties:
            assert place == position + 1
        # Drivers: the duration model's own pred_contrib, largest first, bias left out.
        top = [c for c in learner.models.contributions(backlog, row) if c[0] != "bias"][:3]
        drivers = ", ".join(f"{name} {value:+.2f}" for name, value in top)
        assert f"log-duration drivers: {drivers}" in texts
        if backlog.ood[row]:
            assert "features outside what the model was trained on" in texts
        assert "\n" not in d.why()


def test_the_explained_position_breaks_ties_as_the_decision_does() -> None:
    tasks = [st("first", 0, due=NOW + 5000.0), st("twin", 1, submit=0.0, due=NOW + 5000.0)]
    snapshot = snapshot_of(tasks, pools={"p": PoolView(capacity=1)})
    decisions = decide(snapshot, Learned(), DecidePolicy(), explain=[0, 1])
    assert [d.score for d in decisions] == [1.0, 0.5]  # the twin is decided second
    positions = [r.text for d in decisions for r in d.reasons if r.factor == "position"]
    assert positions == ["1 of 2 in its pool", "2 of 2 in its pool"]


def test_why_is_one_line_largest_contribution_first(trained: tuple[Learned, Snapshot]) -> None:
    learner, snapshot = trained
    row = int(snapshot.rows[0])
    (d,) = [x for x in decide(snapshot, learner, DecidePolicy(), explain=[row]) if x.reasons]
    line = d.why()
    assert "\n" not in line
    biggest = max(d.reasons, key=lambda r: abs(r.contribution))
    assert line.startswith(biggest.text)
    assert all(r.text in line for r in d.reasons)
    noted = d.evolve(note="advisor timed out; tier 1 stands")
    assert noted.why() == f"{line} (advisor timed out; tier 1 stands)"


def test_edf_and_atc_explain_their_factors() -> None:
    tasks = [st("due", 0, due=NOW + 600.0, weight=2.0), st("open", 1, due=None)]
    snapshot = snapshot_of(tasks)
    edf = decide(snapshot, Edf(), DecidePolicy(), explain=[0, 1])
    assert [(r.factor, r.text) for r in edf[0].reasons] == [("deadline", "due in 10 min")]
    assert [r.factor for r in edf[1].reasons] == ["deadline"]
    assert "no deadline" in edf[1].reasons[0].text

    atc = decide(snapshot, Atc(), DecidePolicy(), explain=[0, 1])
    assert [r.factor for r in atc[0].reasons] == ["value_rate", "urgency"]
    assert atc[0].reasons[0].text == f"weight per second {2.0 / 60.0:.3g}"
    assert atc[0].reasons[1].text == "slack 9 min"  # 600 s left - 60 s to run
    assert atc[1].reasons[1].text == "no deadline"
    assert all(d.why().count("\n") == 0 and d.why() for d in (*edf, *atc))


def test_learned_runs_first_the_task_that_others_wait_for() -> None:
    backlog = Backlog()
    rows = as_rows(
        [
            backlog.add(
                ScoredTask(
                    id=name, kind="k", seq=n, submit_at=0.0, release_at=0.0, estimate=60.0, pool="p"
                )
            )
            for n, name in enumerate(["alone", "unblocks"])
        ]
    )
    backlog.dependents[rows[1]] = 4.0  # four tasks of weight 1 wait for it
    ranks = Learned(learn=False).rank(RankRequest(backlog, rows, 0.0))
    assert ranks[1] < ranks[0]
