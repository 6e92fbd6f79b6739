"""Tier 2 in the live planner: escalated tasks reach a local chat-completions server in the
background, its advice reorders the next planning pass within policy, and when it fails the
tier-1 order stands. A real SQLite store, a real HTTP server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tactician.app import Tactician
from tactician.clock import SYSTEM_CLOCK
from tactician.decide.decision import Action, Tier
from tactician.decide.scorers import get_scorer
from tactician.decide.service import DecidePolicy
from tactician.domain import KindSpec, NewTask
from tactician.govern.policy import bundle_version
from tactician.govern.roles import Actor, Role
from tactician.plan.capacity import plan_starts
from tactician.run.advisor import AdvisorConfig, BackgroundAdvisor, LLMAdvisor
from tactician.run.escalation import Escalator
from tactician.run.ranking import LiveRanker
from tactician.settings import Settings
from tactician.store.base import SqlStore
from tests.integration.driving import Opener, stores_on
from tests.integration.test_advisor import ChatServer, Reply, chat  # noqa: F401 (a fixture)

ALWAYS = DecidePolicy(confidence_threshold=1.01)
"""Every decision is below this confidence: everything escalates."""


@pytest.fixture
def opener(sqlite_url: str) -> Iterator[Opener]:
    yield from stores_on(sqlite_url)


@pytest.fixture
def store(job_store: SqlStore) -> SqlStore:
    return job_store


def advice(action: str, score_change: float = 0.0) -> str:
    return json.dumps(
        {
            "action": action,
            "score_change": score_change,
            "defer_seconds": 600.0 if action == "defer-until" else None,
            "confidence": 0.9,
            "reason": "advised",
        }
    )


def setup(
    store: SqlStore, server: ChatServer, timeout_s: float = 2.0
) -> tuple[Escalator, list[str]]:
    now = time.time()
    ids = [
        store.submit([NewTask("job", {"n": i}, due_at=now + 600 * (i + 1))], store.kinds())[0]
        for i in range(3)
    ]
    ranker = LiveRanker(get_scorer("edf"))
    config = AdvisorConfig(base_url=server.base_url, model="test-model", timeout_s=timeout_s)
    advisor = BackgroundAdvisor(LLMAdvisor(config, SYSTEM_CLOCK))
    return Escalator(store, ranker, advisor, lambda: ALWAYS, every_s=0.0), ids


def order(store: SqlStore, escalator: Escalator) -> list[str]:
    """What one planning pass with this ranker grants, in claim order."""
    store.set_pool("p", 3)
    store.plan(plan_starts, store.kinds(), escalator.ranker)
    return [store.claim("w", ["job"], 1)[0].task_id for _ in range(3)]


def test_advice_arrives_in_the_background_and_moves_the_task(
    store: SqlStore,
    chat: ChatServer,  # noqa: F811 (the fixture)
) -> None:
    escalator, ids = setup(store, chat)
    chat.default = Reply(content=advice("run", 0.0))
    chat.replies = [Reply(content=advice("run", 0.0)), Reply(content=advice("run", 0.0))]
    chat.replies.append(Reply(content=advice("run", 1.0)))  # for the third task asked
    began = time.monotonic()
    assert escalator(time.time()) == 3  # handed over, not waited for
    assert time.monotonic() - began < 1.0
    chat.wait_for(3)
    deadline = time.monotonic() + 5
    while len(escalator.ranker.advice) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    advised = {task_id: d for task_id, (d, _) in escalator.ranker.advice.items()}
    assert all(d.tier is Tier.ADVISOR for d in advised.values())
    # One thread asks in the order of the decisions (earliest deadline first), so the third
    # answer is about the third task; its payload travelled in the user message's data block.
    asked = [json.dumps(r.body) for r in chat.received]
    assert ['\\"n\\": 2' in body for body in asked] == [False, False, True]
    _, delta = escalator.ranker.advice[ids[2]]
    assert delta == pytest.approx(0.25)  # clamped to the policy's bound: the model asked 1.0
    # 0.25 of 3 waiting tasks: one place up, just before the task it overtakes.
    assert order(store, escalator) == [ids[0], ids[2], ids[1]]
    assert escalator(time.time()) == 0  # asked once per task


def test_a_deferral_keeps_the_task_out_of_the_pass(
    store: SqlStore,
    chat: ChatServer,  # noqa: F811
) -> None:
    escalator, ids = setup(store, chat)
    chat.default = Reply(content=advice("defer-until"))
    escalator(time.time())
    deadline = time.monotonic() + 5
    while len(escalator.ranker.advice) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert {d.action for d, _ in escalator.ranker.advice.values()} == {Action.DEFER}
    store.set_pool("p", 3)
    report = store.plan(plan_starts, store.kinds(), escalator.ranker)
    assert report.started == 0  # all three deferred by tier 2 for now
    assert all(store.get(i).state.value == "ready" for i in ids)


def test_when_the_advisor_fails_tier_1_order_stands(
    store: SqlStore,
    chat: ChatServer,  # noqa: F811
) -> None:
    escalator, ids = setup(store, chat, timeout_s=0.2)
    chat.default = Reply(content="this is not json")
    escalator(time.time())
    chat.wait_for(3)
    deadline = time.monotonic() + 5
    while len(escalator.ranker.advice) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    decisions = [d for d, _ in escalator.ranker.advice.values()]
    assert all(d.tier is Tier.RULES and "tier 1 stands" in (d.note or "") for d in decisions)
    assert all(delta == 0 for _, delta in escalator.ranker.advice.values())
    assert order(store, escalator) == ids  # earliest deadline first, as tier 1 ranked


def test_the_escalator_reads_the_live_bundles_thresholds_each_round(
    sqlite_url: str,
    chat: ChatServer,  # noqa: F811 (the fixture)
) -> None:
    app = Tactician(settings=Settings(db=sqlite_url, scorer="edf", confidence_threshold=0.45))
    try:
        app.store.register_kinds([KindSpec("job")])
        escalator, _ = setup(app.store, chat)
        chat.default = Reply(content=advice("run", 0.0))
        assert app.decide_policy() == DecidePolicy("builtin", 0.45)  # no bundle: the settings'
        root = Actor("root", Role.ADMIN)
        text = "name: trusting\nthresholds: {confidence: 0.0}\n"
        app.gate.deploy(root, text, "a.yaml")
        assert app.decide_policy() == DecidePolicy(bundle_version(text), 0.0)
        escalator.policy = app.decide_policy
        assert escalator(time.time()) == 0  # no decision is less sure than 0
        escalator.policy = lambda: ALWAYS
        assert escalator(time.time()) == 3  # read again: all three go to the advisor
    finally:
        app.close()
