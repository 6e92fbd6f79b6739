"""Deploying and rolling back policy bundles on real databases: atomic, audited, and a rollback
gives back exactly the decisions the earlier bundle made on the same snapshot."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tactician.app import Tactician
from tactician.domain import KindSpec, NewTask, RateLimit, Result
from tactician.errors import Conflict, InvalidInput
from tactician.govern.policy import BundleError, bundle_version, limited, parse_bundle
from tactician.govern.roles import Actor, Role
from tactician.run.ranking import LiveRanker
from tactician.settings import Settings
from tactician.store.protocol import Finish

ROOT = Actor("root", Role.ADMIN)
A = "name: calm\nobjective: {scorer: edf}\nthresholds: {confidence: 0.3}\npools: {p: 2}\n"
B = "name: rush\nobjective: {scorer: wspt}\nthresholds: {confidence: 0.95}\npools: {p: 4}\n"


@pytest.fixture
def app(db_url: str) -> Iterator[Tactician]:
    app = Tactician(settings=Settings(db=db_url, scorer="fifo"))
    app.store.register_kinds([KindSpec("job", pool="p")])
    now = app.store.db_now()
    app.submit_many(
        [
            NewTask("job", {"n": i}, due_at=now + 3600 - 100 * i, weight=1 + i % 3, estimate=30 + i)
            for i in range(12)
        ]
    )
    yield app
    app.close()


def test_rollback_restores_the_exact_previous_decisions(app: Tactician) -> None:
    now = app.store.db_now()
    app.gate.deploy(ROOT, A, "a.yaml")
    before, reasons, scorer = app.decisions(now)
    assert scorer == "edf" and {d.policy_version for d in before} == {bundle_version(A)}
    app.gate.deploy(ROOT, B, "b.yaml", reason="try wspt")
    during, _, scorer = app.decisions(now)
    assert scorer == "wspt"
    assert [d.score for d in during] != [d.score for d in before]
    assert {d.policy_version for d in during} == {bundle_version(B)}
    assert {u.pool.name: u.pool.capacity for u in app.store.pools()}["p"] == 4
    app.gate.rollback(ROOT, "wspt starves the urgent ones")
    after, reasons_after, _ = app.decisions(now)
    assert after == before  # field for field, reasons and policy version included
    assert reasons_after == reasons
    assert {u.pool.name: u.pool.capacity for u in app.store.pools()}["p"] == 2
    trail = [
        (r.action, r.subject) for r in app.store.audit_records() if r.action.startswith("policy.")
    ]
    assert trail == [
        ("policy.deployed", bundle_version(A)),
        ("policy.deployed", bundle_version(B)),
        ("policy.rolled_back", bundle_version(A)),
    ]
    history = app.store.deployments("live")
    assert [d.version for d in history] == [bundle_version(v) for v in (A, B, A)]


def test_the_planner_follows_the_live_bundle_and_records_its_version(app: Tactician) -> None:
    app.gate.deploy(ROOT, A, "a.yaml")
    planner = app.planner()
    planner.tick()
    granted = [r for r in app.store.audit_records() if r.action == "task.granted"]
    assert granted and granted[-1].details["policy"] == bundle_version(A)
    assert granted[-1].details["scorer"] == "edf"
    assert len(granted[-1].details["tasks"]) == 2  # the bundle's pool of 2
    assert planner.ranker.max_wait is None
    app.gate.deploy(ROOT, A.replace("{scorer: edf}", "{scorer: edf, max_wait: 15m}"), "a2.yaml")
    planner.tick()
    assert planner.ranker.max_wait == 900.0  # the planner ages with the live bundle's bound
    assert planner.ranker.fair is None
    fair = "{scorer: edf, fair_share: {shares: {ops: 2, bi: 1}}}"
    app.gate.deploy(ROOT, A.replace("{scorer: edf}", fair), "a3.yaml")
    planner.tick()
    assert planner.ranker.fair is not None and planner.ranker.fair.shares == {"ops": 2, "bi": 1}
    assert planner.ranker.max_wait is None


def test_a_bad_bundle_or_rollback_changes_nothing(app: Tactician) -> None:
    with pytest.raises(Conflict, match="nothing to roll back"):
        app.gate.rollback(ROOT)
    app.gate.deploy(ROOT, A, "a.yaml")
    with pytest.raises(BundleError, match=r"^bad.yaml:2: objective.scorer: "):
        app.gate.deploy(ROOT, "name: bad\nobjective: {scorer: magic}\n", "bad.yaml")
    with pytest.raises(InvalidInput, match="share between 0 and 1"):
        app.gate.deploy(ROOT, B, "b.yaml", slot="experiment", share=1.5, split_by="task")
    assert [d.version for d in app.store.deployments()] == [bundle_version(A)]
    assert app.gate.policy().version == bundle_version(A)


OPEN = "name: open\nobjective: {scorer: edf}\npools: {p: null}\n"


def started(app: Tactician) -> int:
    return app.store.counts().get("leased", 0)


def test_the_bundle_rate_applies_to_the_planner_until_it_is_rolled_back(app: Tactician) -> None:
    app.gate.deploy(ROOT, OPEN, "open.yaml")
    app.gate.deploy(ROOT, OPEN + "limits: {job: {rate: 1/h, burst: 3}}\n", "rate.yaml")
    planner = app.planner()
    planner.tick()
    assert started(app) == 3  # the bucket's burst; the next token is an hour away
    planner.tick()
    assert started(app) == 3
    app.gate.rollback(ROOT, "the downstream API was upgraded")
    planner.tick()
    assert started(app) == 12  # the code declared no rate


def test_the_bundle_concurrency_ceiling_caps_the_planner(app: Tactician) -> None:
    app.gate.deploy(ROOT, OPEN + "limits: {job: {max_concurrency: 2}}\n", "ceiling.yaml")
    planner = app.planner()
    planner.tick()
    planner.tick()
    assert started(app) == 2
    app.gate.deploy(ROOT, OPEN + "limits: {job: {max_concurrency: 5}}\n", "ceiling5.yaml")
    planner.tick()
    assert started(app) == 5


def test_the_bundle_concurrency_key_applies_to_tasks_submitted_under_it(app: Tactician) -> None:
    app.gate.deploy(ROOT, OPEN + "limits: {job: {concurrency_key: '{customer}'}}\n", "key.yaml")
    keyed = [NewTask("job", {"customer": c, "n": 100 + i}) for i, c in enumerate("aabbb")]
    ids = app.submit_many(keyed)
    assert [app.get(i).concurrency_key for i in ids] == ["job:" + c for c in "aabbb"]
    with pytest.raises(InvalidInput, match="concurrency key"):
        app.submit_many([NewTask("job", {"n": 200})])  # no customer: refused, nothing kept
    assert sum(app.store.counts().values()) == 12 + 5
    app.planner().tick()
    leased = [t for t in app.tasks() if t.state == "leased"]
    assert sorted(t.concurrency_key or "-" for t in leased) == ["-"] * 12 + ["job:a", "job:b"]


def test_an_edge_agents_leased_kinds_keep_their_rate() -> None:
    limits = "{job: {rate: 5/s, max_concurrency: 3}, gone: {rate: 1/s}}"
    bundle = parse_bundle(f"name: x\nlimits: {limits}\n")
    marker = RateLimit(1e-12, 1e9)
    kinds = {"job": KindSpec("job", rate=marker), "other": KindSpec("other")}
    assert limited(kinds, bundle.limits)["job"].rate == RateLimit(5.0, 1.0)
    leased = limited(kinds, bundle.limits, leased={"job"})["job"]
    assert leased.rate == marker and leased.max_concurrency == 3
    assert set(limited(kinds, bundle.limits)) == {"job", "other"}  # `gone` is not a kind here
    assert limited(kinds, {}) is kinds


def test_tasks_why_shows_the_fair_share_shift(db_url: str) -> None:
    app = Tactician(settings=Settings(db=db_url, scorer="fifo"))
    try:
        app.store.register_kinds([KindSpec("job", pool="p")])
        app.store.set_pool("p", 2)
        app.submit_many([NewTask("job", tenant="a") for _ in range(2)])
        planner = app.planner()
        planner.tick()
        for claim in app.store.claim("w1", ["job"], 2):  # tenant a ran 2 x 100 s
            done = Result(claim.task_id, claim.token, True, time.time() - 100.0, 100.0)
            finish = Finish(done, claim.kind, claim.attempt, None)
            assert app.store.finish("w1", [finish], app.store.kinds())
        app.store.set_pool("p", 0)  # the planner starts nothing more
        planner.ranker.refresh(time.time() + 60)  # type: ignore[union-attr]
        planner.tick()  # a running planner, which has read the outcomes so far
        (first,) = app.submit_many([NewTask("job", tenant="a")])  # fifo alone: a's first
        (second,) = app.submit_many([NewTask("job", tenant="b")])
        plain = {d.task_id: d.score for d in app.decisions()[0]}
        assert plain[first] > plain[second]
        fair = "{scorer: fifo, fair_share: {shares: {a: 1, b: 1}, weight: 2.0}}"
        app.gate.deploy(ROOT, f"name: fair\nobjective: {fair}\n", "fair.yaml")
        planner.tick()  # the planner follows the deploy; its book counts a's earlier use too
        ranker = planner.ranker
        assert isinstance(ranker, LiveRanker) and ranker.fair is not None
        now = time.time()
        assert ranker.fair.factor("a", now) < 0.5 < ranker.fair.factor("b", now) == 1.0
        shown = {d.task_id: d for d in app.decisions(explain=[first])[0]}
        assert shown[second].score > shown[first].score  # as the planner orders them
        assert "tenant a: fair-share factor" in shown[first].why()
        assert "used more than its share" in shown[first].why()
    finally:
        app.close()
