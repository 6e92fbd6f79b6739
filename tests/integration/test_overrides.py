"""Operator overrides on real databases: run-now and a pinned score reorder the planner's line
but never exceed a pool; hold and release; overrides lapse at their expiry; every one is audited
and the decision says who overrode it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tactician.app import Tactician
from tactician.decide.decision import Tier
from tactician.domain import KindSpec, NewTask, Result, TaskState
from tactician.errors import Conflict, InvalidInput
from tactician.govern.roles import Actor, Role
from tactician.run.gate import GateHook
from tactician.settings import Settings
from tactician.store.protocol import Finish

OPS = Actor("ops", Role.OPERATOR)


@pytest.fixture
def app(db_url: str) -> Iterator[Tactician]:
    app = Tactician(settings=Settings(db=db_url, scorer="edf"))
    app.store.register_kinds([KindSpec("job", pool="p")])
    app.store.set_pool("p", 1)
    yield app
    app.close()


def line_up(app: Tactician, count: int) -> list[str]:
    """Tasks whose deadlines put them in submission order."""
    now = app.store.db_now()
    return app.submit_many([NewTask("job", {"n": i}, due_at=now + 600 + i) for i in range(count)])


def granted(app: Tactician) -> list[str]:
    return [t.id for t in app.tasks() if t.state is TaskState.LEASED]


def test_run_now_goes_first_but_waits_for_room(app: Tactician) -> None:
    ids = line_up(app, 4)
    planner = app.planner()
    planner.tick()
    assert granted(app) == [ids[0]]  # the one unit
    app.store.set_override(ids[3], "run_now", None, OPS, "customer escalation")
    planner._tick(lead=True, reap=True, hooks=True)
    assert granted(app) == [ids[0]]  # still one unit: the override does not make room
    claim = app.store.claim("w", ["job"], 1)[0]
    result = Result(claim.task_id, claim.token, ok=True, started_at=0.0, duration=0.0)
    app.store.finish("w", [Finish(result, "job", 1, None)], app.store.kinds())
    planner.tick()
    assert granted(app) == [ids[3]]  # first in line once a unit is free


def test_a_pinned_score_moves_a_task_and_the_decision_says_who(app: Tactician) -> None:
    ids = line_up(app, 5)
    app.store.set_override(ids[4], "pin", 1.0, OPS, "VIP", None)
    decisions, _, _ = app.decisions()
    pinned = next(d for d in decisions if d.task_id == ids[4])
    assert pinned.tier is Tier.HUMAN and pinned.note == "overridden by ops: score pinned at 1 (VIP)"
    hook = GateHook(app.gate, ranker := app.ranker())
    hook(app.store.db_now())
    assert ranker.overrides[ids[4]] == ("pin", 1.0, "ops")
    planner = app.planner()
    planner.tick()
    assert granted(app) == [ids[4]]
    assert [r.action for r in app.store.audit_records()].count("override.set") == 1
    with pytest.raises(InvalidInput, match="needs a reason"):
        app.store.set_override(ids[1], "pin", 0.5, OPS, " ")
    with pytest.raises(InvalidInput, match="unknown override"):
        app.store.set_override(ids[1], "boost", 0.5, OPS, "why not")


def test_hold_and_release_and_expiry(app: Tactician) -> None:
    ids = line_up(app, 3)
    now = app.store.db_now()
    held = app.store.hold(ids[0], OPS, "change freeze", until=now + 3600)
    assert held.state is TaskState.HELD
    app.planner().tick()
    assert granted(app) == [ids[1]]  # the held task is passed over
    with pytest.raises(Conflict, match="not held"):
        app.store.release(ids[1], OPS, "oops")
    app.store.set_override(ids[2], "pin", 0.2, OPS, "for a while", expires_at=now + 60)
    assert app.store.expire_overrides(now + 59) == 0
    assert app.store.expire_overrides(now + 3600) == 2  # the pin lapsed, the hold ended
    assert app.get(ids[0]).state in (TaskState.PENDING, TaskState.READY)
    assert app.store.overrides() == []
    actions = [r.action for r in app.store.audit_records()]
    assert "task.held" in actions and "override.expired" in actions
    assert actions.count("task.released") == 1
