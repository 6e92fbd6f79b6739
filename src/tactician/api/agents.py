"""The centre's endpoints for edge agents (tactician.agent) and the sites view.

    GET  /agents/bundle?site=NAME   the signed bundle: live policy + model sets, with hashes
    POST /agents/{site}/sync        the site's audit records after its last acknowledged one
    POST /agents/{site}/tokens      a lease of global-limit tokens (unspent ones handed back)
    GET  /sites                     sites, bundle versions, link state, backlog, tokens, lag

An agent acts for its site as an operator acts at the centre: it submits work, runs it and
spends shared capacity. So the agent endpoints need `task.submit` (operator or admin): a
viewer's token can read /sites but can neither pull a bundle nor hold tokens.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from tactician.agent.centre import global_limits, issue_bundle
from tactician.api.routes import ActorDep, AppDep
from tactician.app import Tactician
from tactician.errors import NotFound
from tactician.govern.audit import AuditRecord
from tactician.govern.roles import Actor, Operation
from tactician.store.sites import SyncState

SITE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
Site = Annotated[str, Query(pattern=SITE)]
SitePath = Annotated[str, Path(pattern=SITE)]
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


class SyncIn(_In):
    records: list[RecordIn] = Field(default_factory=list, max_length=MAX_RECORDS)
    backlog: int = Field(default=0, ge=0)
    unsynced: int = Field(default=0, ge=0)
    oldest_unsynced_at: float | None = Field(default=None, allow_inf_nan=False)


class Returned(_In):
    lease: str = Field(min_length=1, max_length=100)
    unspent: int = Field(ge=0)


class LeaseIn(_In):
    kind: str = Field(min_length=1, max_length=200)
    want: int = Field(ge=0, le=100_000)
    lease_s: float = Field(default=10.0, gt=0, le=3600, allow_inf_nan=False)
    returns: list[Returned] = Field(default_factory=list, max_length=1000)


def build(current_app: AppDep, actor_of: ActorDep) -> APIRouter:
    router = APIRouter(tags=["agents"])
    App = Annotated[Tactician, Depends(current_app)]
    Who = Annotated[Actor, Depends(actor_of)]

    @router.get("/agents/bundle")
    def bundle(app: App, actor: Who, site: Site) -> dict[str, Any]:
        """The signed bundle for `site` (Ed25519 over the manifest of part hashes)."""
        app.gate.authorize(actor, Operation.SUBMIT, f"site:{site}")
        return issue_bundle(app, site)

    @router.post("/agents/{site}/sync")
    def sync(app: App, actor: Who, site: SitePath, body: SyncIn) -> dict[str, Any]:
        """Accept the site's records in chain order; sending a batch again changes nothing."""
        app.gate.authorize(actor, Operation.SUBMIT, f"site:{site}")
        records = [AuditRecord(**r.model_dump()) for r in body.records]
        state = SyncState(body.backlog, body.unsynced, body.oldest_unsynced_at)
        acked, accepted = app.store.accept_site_records(site, records, state)
        return {"site": site, "acked_seq": acked, "accepted": accepted}

    @router.post("/agents/{site}/tokens")
    def tokens(app: App, actor: Who, site: SitePath, body: LeaseIn) -> dict[str, Any]:
        """Lend global-limit tokens of a kind for `lease_s` seconds."""
        app.gate.authorize(actor, Operation.SUBMIT, f"site:{site}")
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

    return router
