"""A site's approvals, linked and cut off, on real databases: an approver at the centre votes on
a site's pending approval, the vote reaches the agent with a sync reply and goes through the
site's own gate (its rule's approvers, no self-approval), and the agent's answer comes back with
its next sync; votes sent again are applied once. Cut off for `offline_after_s`, the site follows
each rule's `offline` fallback (approve, reject, or hold until expiry), audited in its chain.

The centre runs on SQLite and PostgreSQL (the `db_url` parameter) behind the real API, served
by uvicorn on loopback in a thread; the agent's `Link` talks to it with its own httpx client.
Each site is a real SQLite file with its own app and gate; the gate's clock is a FakeClock
where the test needs time to pass."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from tactician.agent.approvals import apply_votes, offline_fallback
from tactician.agent.bundle import generate_keys
from tactician.agent.process import Agent, AgentOptions, Link, LinkDown
from tactician.app import Tactician
from tactician.clock import FakeClock
from tactician.domain import KindSpec, NewTask, TaskState
from tactician.govern.roles import Actor, Role
from tactician.run.gate import Gate
from tactician.settings import Settings
from tests.e2e.serving import free_port, serving

ROOT = Actor("root", Role.ADMIN)
OPS = Actor("ops", Role.OPERATOR)
"""Who submits the site's tasks (so a centre approver named `ops` approves their own task)."""
SITE = "north"
POLICY = """
name: edge
approvals:
  - name: risky-needs-an-approver
    match: {kinds: [risky]}
    approvers: {roles: [approver]}
    expires_after: 2h
    offline: hold
    editable: [weight]
  - name: fixes-by-sre
    match: {kinds: [fix]}
    approvers: {groups: [sre]}
    offline: hold
  - name: routine-goes-ahead
    match: {kinds: [routine]}
    approvers: {roles: [approver]}
    offline: approve
  - name: payments-stop
    match: {kinds: [payment]}
    approvers: {roles: [approver]}
    offline: reject
"""
KINDS = [KindSpec(k, pool="crew") for k in ("risky", "fix", "routine", "payment")]


def site_app(url: str) -> Tactician:
    app = Tactician(settings=Settings(db=url))
    app.store.register_kinds(KINDS)
    app.store.set_pool("crew", 1)
    app.gate.deploy(ROOT, POLICY, "policy.yaml")
    return app


def submit(app: Tactician, kind: str) -> str:
    return app.submit_many([NewTask(kind, {})], actor=OPS)[0]


def records(app: Tactician, action: str) -> list[Any]:
    return [r for r in app.store.audit_records() if r.action == action]


def eventually(done: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.01)
    return done()


# --- the offline fallback: the store and the gate, on both databases ------------------------


def test_the_offline_fallback_approves_rejects_or_holds_as_each_rule_says(db_url: str) -> None:
    app = site_app(db_url)
    clock = FakeClock(app.store.db_now())
    app._gate = Gate(app.store, clock)
    routine, payment, risky = (submit(app, k) for k in ("routine", "payment", "risky"))

    resolved = offline_fallback(app, SITE, 45.2)

    assert sorted((r.task_id, r.state) for r in resolved) == sorted(
        [(routine, "approved"), (payment, "rejected")]
    )
    approval = app.store.approval(routine)
    assert (approval.resolved_by, approval.votes) == ("site:north", ())  # not a person's vote
    assert approval.reason == (
        "offline fallback: no contact with the centre for 45 s; rule routine-goes-ahead says "
        "approve"
    )
    assert app.get(routine).state is TaskState.PENDING
    payment_task = app.get(payment)
    assert payment_task.state is TaskState.REJECTED
    assert (
        payment_task.last_error is not None
        and "payments-stop says reject" in payment_task.last_error
    )
    (approved,) = [r for r in records(app, "approval.approved") if r.subject == routine]
    assert approved.actor == "site:north"
    assert approved.details["fallback"] == "offline" and approved.details["offline_s"] == 45.2
    assert approved.at == clock.now()
    assert not records(app, "approval.voted")
    # A hold rule keeps its task waiting; its expiry still applies as the rule says.
    assert app.get(risky).state is TaskState.AWAITING_APPROVAL
    assert offline_fallback(app, SITE, 3600.0) == []  # nothing left to resolve: nothing changes
    assert app.store.resolve_offline(routine, Actor("site:north", Role.ADMIN), 1.0, 0.0) is None
    clock.advance(2 * 3600 + 1)  # the expiry counts from the request (database time)
    app.gate.tick()
    assert app.get(risky).state is TaskState.REJECTED
    assert app.store.approval(risky).resolved_by == "tactician"  # expired, not the fallback
    app.close()


def test_the_link_applies_the_fallback_once_offline_for_offline_after_s(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/north.db"
    app = site_app(url)
    routine, risky = submit(app, "routine"), submit(app, "risky")
    _, public = generate_keys(tmp_path / "keys")
    options = AgentOptions(
        central=f"http://127.0.0.1:{free_port()}",  # nobody listens: every sync fails
        token="tct_none",
        site=SITE,
        public_key=str(public),
        sync_every=0.01,
        max_backoff_s=0.02,
        timeout_s=1.0,
        offline_after_s=30.0,
    )
    agent = Agent(app, options)
    clock = FakeClock(app.store.db_now())
    agent.app.gate.clock = clock
    checker = Tactician(settings=Settings(db=url))  # the link's thread has its own connection
    stop = threading.Event()
    link = threading.Thread(target=agent.run_link, args=(stop,))
    link.start()
    try:
        time.sleep(0.2)  # rounds fail, but for 0 s of the link's clock: not offline yet
        assert checker.store.approval(routine).state == "pending"
        clock.advance(31.0)
        assert eventually(lambda: checker.store.approval(routine).state == "approved")
    finally:
        stop.set()
        link.join(5)
        agent.link.client.close()
    approval = checker.store.approval(routine)
    assert approval.resolved_by == "site:north"
    assert "no contact with the centre for 31 s" in (approval.reason or "")
    assert checker.store.approval(risky).state == "pending"  # hold
    checker.close()
    app.close()


# --- votes cast at the centre, applied at the site ------------------------------------------


class LossyLink(Link):
    """The real link, whose next reply can be lost after the centre has acted on the request."""

    lose_next = False

    def sync(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = super().sync(body)
        if self.lose_next:
            self.lose_next = False
            raise LinkDown("reply lost")
        return answer


@dataclass
class Linked:
    centre: Tactician
    client: httpx.Client
    site: Tactician
    agent: Agent
    link: LossyLink
    tokens: dict[str, str]

    def as_(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def vote(self, voter: str, task_id: str, verdict: str = "approve", reason: str = "ok") -> Any:
        return self.client.post(
            f"/sites/{SITE}/approvals/{task_id}",
            json={"verdict": verdict, "reason": reason},
            headers=self.as_(voter),
        )

    def pending(self, *, first_sync: bool = False) -> dict[str, Any]:
        answer = self.client.get(f"/sites/{SITE}/approvals", headers=self.as_("alice"))
        if first_sync and answer.status_code == 404:
            return {}  # the site has not synced yet
        assert answer.status_code == 200, answer.text
        return {a["task_id"]: a for a in answer.json()}


@pytest.fixture
def linked(db_url: str, tmp_path: Path) -> Iterator[Linked]:
    centre = Tactician(settings=Settings(db=db_url))
    centre.gate.deploy(ROOT, POLICY, "policy.yaml")  # the policy the site's bundle came from
    tokens = {
        "agent": centre.gate.create_token(ROOT, "agent-north", Role.OPERATOR, site=SITE),
        "south": centre.gate.create_token(ROOT, "agent-south", Role.OPERATOR, site="south"),
        "oper": centre.gate.create_token(ROOT, "oper", Role.OPERATOR),
        "alice": centre.gate.create_token(ROOT, "alice", Role.APPROVER),
        "bob": centre.gate.create_token(ROOT, "bob", Role.APPROVER, ["sre"]),
        "boss": centre.gate.create_token(ROOT, "boss", Role.ADMIN),
        "ops": centre.gate.create_token(ROOT, "ops", Role.APPROVER),
        "val": centre.gate.create_token(ROOT, "val", Role.VIEWER),
    }
    _, public = generate_keys(tmp_path / "keys")
    site = site_app(f"sqlite:///{tmp_path}/north.db")
    with serving(Settings(db=db_url)) as client:
        options = AgentOptions(
            central=str(client.base_url), token=tokens["agent"], site=SITE, public_key=str(public)
        )
        link = LossyLink(options)
        yield Linked(centre, client, site, Agent(site, options, link), link, tokens)
        link.client.close()
    site.close()
    centre.close()


def test_a_vote_at_the_centre_goes_through_the_sites_gate_and_its_answer_comes_back(
    linked: Linked,
) -> None:
    site, agent = linked.site, linked.agent
    risky1, risky2, risky3, fix = (submit(site, k) for k in ("risky", "risky", "risky", "fix"))
    agent.sync_once()
    pending = linked.pending()
    assert list(pending) == [risky1, risky2, risky3, fix]
    first = pending[risky1]
    assert (first["rule"], first["requested_by"], first["required"]) == (
        "risky-needs-an-approver",
        "ops",
        1,
    )
    assert first["approvers"] == {"roles": ["approver"], "groups": []}
    assert first["expires_at"] == pytest.approx(first["requested_at"] + 7200)
    assert (first["votes"], first["centre_votes"]) == ([], [])

    cast = {
        "alice": linked.vote("alice", risky1, reason="looked at it"),
        "boss": linked.vote("boss", risky2),  # an admin may vote here; the site's rule says no
        "ops": linked.vote("ops", risky3),  # asked for it at the site
        "bob": linked.vote("bob", fix, reason="sre on call"),  # the rule's group, carried over
    }
    for answer in cast.values():
        assert answer.status_code == 202, answer.text
        assert answer.json()["state"] == "queued"
    ids = {name: answer.json()["id"] for name, answer in cast.items()}
    assert site.get(risky1).state is TaskState.AWAITING_APPROVAL  # nothing until a sync

    agent.sync_once()  # the reply carries the four votes: applied through the site's gate
    assert site.get(risky1).state is TaskState.PENDING
    assert site.get(fix).state is TaskState.PENDING
    assert site.get(risky2).state is TaskState.AWAITING_APPROVAL
    assert site.get(risky3).state is TaskState.AWAITING_APPROVAL
    voted = {r.actor: r for r in records(site, "approval.voted")}
    assert sorted(voted) == ["alice", "bob"]
    assert voted["alice"].details["via"] == f"centre:{ids['alice']}"
    assert voted["alice"].details["reason"] == "looked at it"
    refused = {r.actor: r.details["why"] for r in records(site, "access.refused")}
    assert refused == {
        "boss": "rule risky-needs-an-approver is answered by role approver; boss is not one of "
        "them",
        "ops": "ops asked for this task and cannot approve or reject it",
    }
    assert {v["id"] for v in pending_votes(linked)} == set(ids.values())  # not reported yet

    agent.sync_once()  # the reports, and the site's records of them
    states = {v.actor: (v.state, v.message) for v in linked.centre.store.site_votes(SITE, None)}
    assert states == {
        "alice": ("applied", "approved (1 of 1 approvals)"),
        "bob": ("applied", "approved (1 of 1 approvals)"),
        "boss": ("refused", refused["boss"]),
        "ops": ("refused", refused["ops"]),
    }
    pending = linked.pending()
    assert list(pending) == [risky2, risky3]  # the site's chain shows the other two resolved
    assert [(v["voter"], v["state"]) for v in pending[risky2]["centre_votes"]] == [
        ("boss", "refused")
    ]
    centre_actions = [r.action for r in linked.centre.store.audit_records()]
    assert centre_actions.count("site_vote.cast") == 4
    assert centre_actions.count("site_vote.applied") == 2
    assert centre_actions.count("site_vote.refused") == 2
    assert centre_actions.count("site.access.refused") == 2  # the site's refusals, synced
    # Another approver answers the approval the admin could not.
    assert linked.vote("alice", risky2, "reject", "not today").status_code == 202
    agent.sync_once()
    assert site.get(risky2).state is TaskState.REJECTED
    assert site.get(risky2).last_error == "rejected by alice: not today"


def test_while_the_link_is_up_no_fallback_applies_and_votes_arrive_through_the_link_loop(
    linked: Linked,
) -> None:
    site, agent = linked.site, linked.agent
    routine = submit(site, "routine")  # offline: approve, but the centre is reachable
    clock = FakeClock(site.store.db_now())
    site.gate.clock = clock
    agent.options = replace(agent.options, sync_every=0.01, offline_after_s=30.0)
    checker = Tactician(settings=Settings(db=site.settings.db))
    stop = threading.Event()
    link = threading.Thread(target=agent.run_link, args=(stop,))
    link.start()
    try:
        assert eventually(lambda: routine in linked.pending(first_sync=True))
        clock.advance(3600.0)  # an hour on the link's clock, each sync a success meanwhile
        time.sleep(0.1)
        assert checker.store.approval(routine).state == "pending"
        assert linked.vote("alice", routine, "reject", "not now").status_code == 202
        assert eventually(
            lambda: [v.state for v in linked.centre.store.site_votes(SITE, None)] == ["applied"]
        )
    finally:
        stop.set()
        link.join(5)
    approval = checker.store.approval(routine)
    assert (approval.state, approval.resolved_by, approval.reason) == (
        "rejected",
        "alice",
        "not now",
    )
    checker.close()


def pending_votes(linked: Linked) -> list[Any]:
    return [v.wire() for v in linked.centre.store.site_votes(SITE)]


def test_votes_sent_again_are_applied_once_and_reported_once(linked: Linked) -> None:
    site, agent, link = linked.site, linked.agent, linked.link
    risky, fix = submit(site, "risky"), submit(site, "fix")
    agent.sync_once()
    assert linked.vote("alice", risky).status_code == 202
    # The reply that carried the vote is lost: the centre sends it again with the next one.
    link.lose_next = True
    with pytest.raises(LinkDown):
        agent.sync_once()
    assert site.get(risky).state is TaskState.AWAITING_APPROVAL
    agent.sync_once()
    assert site.get(risky).state is TaskState.PENDING
    # The reply to the report is lost: the agent reports again, and nothing changes twice.
    link.lose_next = True
    with pytest.raises(LinkDown):
        agent.sync_once()
    agent.sync_once()
    agent.sync_once()
    (vote,) = linked.centre.store.site_votes(SITE, None)
    assert (vote.state, vote.message) == ("applied", "approved (1 of 1 approvals)")
    actions = [r.action for r in linked.centre.store.audit_records()]
    assert actions.count("site_vote.applied") == 1
    assert [r.actor for r in records(site, "approval.voted")] == ["alice"]
    # The same votes again (a resend), straight to the agent: dealt with already, nothing new.
    assert apply_votes(site, [vote.wire()]) == []
    assert len(records(site, "approval.voted")) == 1
    # Applied by the gate but not yet kept as dealt with (the link died in between): the
    # site's own vote record says so, and it is not cast twice.
    assert linked.vote("bob", fix, reason="sre on call").status_code == 202
    (bob,) = linked.centre.store.site_votes(SITE)
    site.gate.vote(Actor("bob", Role.APPROVER, frozenset({"sre"})), fix, "approve", "sre on call")
    (report,) = apply_votes(site, [bob.wire()])
    assert (report.ok, report.message) == (True, "bob had already voted approve")
    assert [r.actor for r in records(site, "approval.voted")] == ["alice", "bob"]
    agent.sync_once()
    assert linked.centre.store.site_votes(SITE) == []  # delivered


def test_bad_votes_get_a_clear_error_and_change_nothing(linked: Linked) -> None:
    site, agent, client = linked.site, linked.agent, linked.client
    risky = submit(site, "risky")
    agent.sync_once()

    def error(answer: Any, status: int) -> str:
        assert answer.status_code == status, answer.text
        message = answer.json()["message"]
        assert "\n" not in message
        return str(message)

    unknown_site = client.post(
        "/sites/south/approvals/x",
        json={"verdict": "approve", "reason": "ok"},
        headers=linked.as_("alice"),
    )
    assert error(unknown_site, 404) == "no site named 'south' has synced with the centre"
    assert error(client.get("/sites/south/approvals", headers=linked.as_("alice")), 404)
    assert error(linked.vote("alice", "no-such-task"), 404) == (
        "site north has no pending approval for task no-such-task (as of its last sync)"
    )
    assert error(linked.vote("val", risky), 403) == "val (viewer) may not approval.vote"
    (refusal,) = [r for r in records(linked.centre, "access.refused") if r.actor == "val"]
    assert (refusal.subject, refusal.details["operation"]) == (
        f"site:north/{risky}",
        "approval.vote",
    )
    assert error(linked.vote("alice", risky, verdict="maybe"), 422).startswith("verdict:")
    assert error(linked.vote("alice", risky, reason=""), 422).startswith("reason:")
    assert linked.centre.store.site_votes(SITE, None) == []  # none of these was queued
    assert linked.vote("alice", risky).status_code == 202
    assert error(linked.vote("alice", risky), 409) == (
        f"alice has already voted on task {risky} at site north"
    )
    agent.sync_once()
    agent.sync_once()
    assert error(linked.vote("bob", risky), 409) == (
        f"the approval of {risky} at site north is already approved"
    )


def test_only_the_sites_own_token_or_an_admins_acts_as_the_site(linked: Linked) -> None:
    client, centre = linked.client, linked.centre
    linked.agent.sync_once()

    def as_north(name: str) -> list[int]:
        headers = linked.as_(name)
        return [
            client.get(f"/agents/bundle?site={SITE}", headers=headers).status_code,
            client.post(f"/agents/{SITE}/sync", json={}, headers=headers).status_code,
            client.post(
                f"/agents/{SITE}/tokens", json={"kind": "risky", "want": 0}, headers=headers
            ).status_code,
        ]

    # The site's own token and an admin's pass the gate (past it, this centre has no signing
    # key for a bundle, 400, and no global limit on that kind to lease, 404); anyone else is
    # refused before anything happens.
    assert as_north("agent") == [400, 200, 404]
    keyless = client.get(f"/agents/bundle?site={SITE}", headers=linked.as_("agent"))
    assert "signing key" in keyless.json()["message"], keyless.text
    assert as_north("boss") == [400, 200, 404]
    for name in ("south", "oper", "val"):
        assert as_north(name) == [403, 403, 403], name
    answer = client.post(f"/agents/{SITE}/sync", json={}, headers=linked.as_("oper"))
    assert answer.json()["message"] == (
        "oper: acting as site north needs a token made for it (tokens create --site)"
    )
    answer = client.post(f"/agents/{SITE}/sync", json={}, headers=linked.as_("south"))
    assert answer.json()["message"] == (
        "agent-south: a token of site south acts only as that site's agent"
    )
    # A site's token does nothing else at the centre either: no task, no vote.
    task = client.post("/tasks", json={"kind": "fix"}, headers=linked.as_("agent"))
    assert task.status_code == 403, task.text
    assert centre.tasks() == []
    refused = [r for r in records(centre, "access.refused") if r.subject.startswith("site:")]
    assert {r.actor for r in refused} >= {"agent-south", "oper", "val"}
    # The token remembers its site; the API lists it.
    listed = client.get("/tokens", headers=linked.as_("boss")).json()
    assert {t["name"]: t["site"] for t in listed}["agent-north"] == SITE
    bad = client.post(
        "/tokens",
        json={"name": "x", "role": "operator", "site": "no good"},
        headers=linked.as_("boss"),
    )
    assert bad.status_code == 422 and bad.json()["message"].startswith("site:")


def test_a_task_cancelled_at_the_site_leaves_the_centres_list(linked: Linked) -> None:
    site, agent = linked.site, linked.agent
    kept, dropped = submit(site, "risky"), submit(site, "risky")
    agent.sync_once()
    assert list(linked.pending()) == [kept, dropped]
    site.store.cancel(dropped, ROOT, "raised twice")
    agent.sync_once()
    assert list(linked.pending()) == [kept]  # withdrawn there: nobody here is asked either
    answer = linked.vote("alice", dropped)
    assert answer.status_code == 409, answer.text
    assert answer.json()["message"] == (
        f"the approval of {dropped} at site north is already withdrawn"
    )


def test_a_vote_at_the_centre_carries_the_edits_the_sites_rule_allows(linked: Linked) -> None:
    site, agent, client = linked.site, linked.agent, linked.client
    edited, wrong = submit(site, "risky"), submit(site, "risky")
    agent.sync_once()

    def vote(task_id: str, edits: dict[str, Any]) -> Any:
        body = {"verdict": "approve", "reason": "ok", "edits": edits}
        return client.post(
            f"/sites/{SITE}/approvals/{task_id}", json=body, headers=linked.as_("alice")
        )

    too_many = vote(edited, {f"payload.f{i}": i for i in range(51)})
    assert too_many.status_code == 422, too_many.text  # bounded, and nothing queued
    assert "edits" in too_many.json()["message"]
    assert linked.centre.store.site_votes(SITE, None) == []
    assert vote(edited, {"weight": 5}).json()["edits"] == {"weight": 5}
    assert vote(wrong, {"due_at": 1.0}).status_code == 202  # the site's rule decides
    agent.sync_once()
    agent.sync_once()
    assert site.get(edited).state is TaskState.PENDING and site.get(edited).weight == 5
    assert site.get(wrong).state is TaskState.AWAITING_APPROVAL
    states = {v.task_id: (v.state, v.message) for v in linked.centre.store.site_votes(SITE, None)}
    assert states[edited] == ("applied", "approved (1 of 1 approvals)")
    assert states[wrong][0] == "refused"
    assert "does not let an approver edit due_at" in (states[wrong][1] or "")
    (change,) = records(site, "task.edited")
    assert (change.subject, change.details["edits"]) == (edited, {"weight": 5})
