"""The centre's endpoints for edge agents (tactician.agent) and the sites view.

    GET  /agents/bundle?site=NAME   the signed bundle: live policy + model sets, with hashes
    POST /agents/{site}/sync        the site's audit records after its last acknowledged one
    POST /agents/{site}/tokens      a lease of global-limit tokens (unspent ones handed back)
    GET  /sites                     sites, bundle versions, link state, backlog, tokens, lag
    GET  /sites/{site}/approvals    the site's pending approvals, as its synced chain shows them
    POST /sites/{site}/approvals/{task_id}   a vote on one, delivered with the next sync reply

An agent acts for its site as an operator acts at the centre: it submits work, runs it and
spends shared capacity. So the agent endpoints need `task.submit` (operator or admin): a
viewer's token can read /sites but can neither pull a bundle nor hold tokens. A vote on a
site's approval needs `approval.vote` here; the site's gate then applies the rule's own
approvers and refuses self-approval, and its answer comes back with the agent's next sync
(`votes_applied`), after which the vote shows as applied or refused.
"""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from tactician.agent.centre import global_limits, issue_bundle
from tactician.api.routes import ActorDep, AppDep
from tactician.app import Tactician
from tactician.errors import NotFound, TacticianError
from tactician.govern.audit import AuditRecord
from tactician.govern.policy import ApprovalRule, parse_bundle
from tactician.govern.roles import SITE_NAME, Actor, Operation
from tactician.store.site_votes import SiteApproval, VoteReport
from tactician.store.sites import MAX_RETURNS, SyncState

SITE = f"^{SITE_NAME.pattern}$"
Site = Annotated[str, Query(pattern=SITE)]
SitePath = Annotated[str, Path(pattern=SITE)]
TaskPath = Annotated[str, Path(min_length=1, max_length=200)]
MAX_RECORDS = 5000


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecordIn(_In):
    seq: int = Field(ge=1)
    at: float = Field(allow_inf_nan=False)
    actor: str
    action: str
    subject: str
    detail: str
    """The record's canonical JSON text, as hashed."""
    prev_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")


class VoteApplied(_In):
    """What the site's gate made of a vote the centre sent: applied, or refused and why."""

    id: str = Field(min_length=1, max_length=100)
    ok: bool
    message: str = Field(default="", max_length=2000)


class SyncIn(_In):
    records: list[RecordIn] = Field(default_factory=list, max_length=MAX_RECORDS)
    backlog: int = Field(default=0, ge=0)
    unsynced: int = Field(default=0, ge=0)
    oldest_unsynced_at: float | None = Field(default=None, allow_inf_nan=False)
    votes_applied: list[VoteApplied] = Field(default_factory=list, max_length=1000)


MAX_EDITS = 50
"""Fields one vote may change (a rule names a few; this bounds what a request carries)."""


class SiteVoteIn(_In):
    verdict: Literal["approve", "reject"]
    reason: str = Field(min_length=1, max_length=2000)
    edits: dict[str, Any] = Field(default_factory=dict, max_length=MAX_EDITS)
    """Fields the site's rule lets an approver change (`weight`, `payload.region`...)."""


class Returned(_In):
    lease: str = Field(min_length=1, max_length=100)
    unspent: int = Field(ge=0)


class LeaseIn(_In):
    kind: str = Field(min_length=1, max_length=200)
    want: int = Field(ge=0, le=100_000)
    lease_s: float = Field(default=10.0, gt=0, le=3600, allow_inf_nan=False)
    returns: list[Returned] = Field(default_factory=list, max_length=MAX_RETURNS)


def build(current_app: AppDep, actor_of: ActorDep) -> APIRouter:
    router = APIRouter(tags=["agents"])
    App = Annotated[Tactician, Depends(current_app)]
    Who = Annotated[Actor, Depends(actor_of)]

    @router.get("/agents/bundle")
    def bundle(app: App, actor: Who, site: Site) -> dict[str, Any]:
        """The signed bundle for `site` (Ed25519 over the manifest of part hashes)."""
        app.gate.authorize_site(actor, site)
        return issue_bundle(app, site)

    @router.post("/agents/{site}/sync")
    def sync(app: App, actor: Who, site: SitePath, body: SyncIn) -> dict[str, Any]:
        """Accept the site's records in chain order (sending a batch again changes nothing)
        and its reports on the votes sent to it; answer with the votes it has not reported."""
        app.gate.authorize_site(actor, site)
        records = [AuditRecord(**r.model_dump()) for r in body.records]
        state = SyncState(body.backlog, body.unsynced, body.oldest_unsynced_at)
        acked, accepted = app.store.accept_site_records(site, records, state)
        reports = [VoteReport(v.id, v.ok, v.message) for v in body.votes_applied]
        app.store.site_votes_reported(site, reports)
        votes = [v.wire() for v in app.store.site_votes(site)]
        return {"site": site, "acked_seq": acked, "accepted": accepted, "votes": votes}

    @router.post("/agents/{site}/tokens")
    def tokens(app: App, actor: Who, site: SitePath, body: LeaseIn) -> dict[str, Any]:
        """Lend global-limit tokens of a kind for `lease_s` seconds."""
        app.gate.authorize_site(actor, site)
        limit = global_limits(app).get(body.kind)
        if limit is None:
            raise NotFound(f"kind {body.kind!r} has no global rate limit in the live policy")
        lease = app.store.lease_tokens(
            site,
            body.kind,
            body.want,
            limit.per_second,
            limit.burst,
            body.lease_s,
            [(r.lease, r.unspent) for r in body.returns],
        )
        return {
            "lease": lease.id,
            "kind": lease.kind,
            "granted": lease.granted,
            "expires_in": body.lease_s,
            "expires_at": lease.expires_at,
        }

    @router.get("/sites")
    def sites(app: App, actor: Who) -> list[dict[str, Any]]:
        """Every site the centre has heard from."""
        now = app.store.db_now()
        return [row.to_json(now) for row in app.store.sites()]

    @router.get("/sites/{site}/approvals")
    def site_approvals(app: App, _: Who, site: SitePath) -> list[dict[str, Any]]:
        """The site's approvals asked for and not yet resolved, as far as it has synced, with
        the votes its chain shows and those cast here (queued, applied or refused)."""
        rules = _Rules(app)
        return [_approval_json(a, rules) for a in app.store.site_approvals(site)]

    @router.post("/sites/{site}/approvals/{task_id}", status_code=202)
    def site_vote(
        app: App, actor: Who, site: SitePath, task_id: TaskPath, body: SiteVoteIn
    ) -> dict[str, Any]:
        """Vote on the site's pending approval of `task_id`: queued until the site's agent
        applies it through its own gate (its answer shows here after its next sync)."""
        app.gate.authorize(actor, Operation.VOTE, f"site:{site}/{task_id}")
        vote = app.store.cast_site_vote(site, task_id, actor, body.verdict, body.reason, body.edits)
        return vote.to_json()

    return router


class _Rules:
    """The terms of the rules that opened a site's approvals, from the policies the centre
    issued (each version parsed once a request); unknown when the version is not kept here."""

    def __init__(self, app: Tactician) -> None:
        self.app = app
        self.parsed: dict[str, dict[str, ApprovalRule]] = {}

    def get(self, version: str, name: str) -> ApprovalRule | None:
        if version not in self.parsed:
            try:
                bundle = parse_bundle(self.app.store.policy_text(version), version[:12])
            except TacticianError:
                bundle = None
            rules = {} if bundle is None else {r.name: r for r in bundle.approvals}
            if bundle is not None and bundle.drift.confirm is not None:
                rules.setdefault(bundle.drift.confirm.name, bundle.drift.confirm)
            self.parsed[version] = rules
        return self.parsed[version].get(name)


def _approval_json(approval: SiteApproval, rules: _Rules) -> dict[str, Any]:
    rule = rules.get(approval.policy_version, approval.rule)
    return {
        "site": approval.site,
        "task_id": approval.task_id,
        "rule": approval.rule,
        "policy_version": approval.policy_version,
        "requested_by": approval.requested_by,
        "requested_at": approval.requested_at,
        "why": approval.why,
        "expires_at": None if rule is None else approval.requested_at + rule.expires_after,
        "approvers": None
        if rule is None
        else {"roles": list(rule.approvers.roles), "groups": list(rule.approvers.groups)},
        "required": None if rule is None else rule.required,
        "offline": None if rule is None else rule.offline,
        "votes": [
            {"voter": v.actor, "verdict": v.verdict, "reason": v.reason, "at": v.at}
            for v in approval.site_votes
        ],
        "centre_votes": [v.to_json() for v in approval.centre_votes],
    }
