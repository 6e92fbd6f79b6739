"""What the governance tables hold, as frozen values (rows become these at the store's edge)."""

from __future__ import annotations

from dataclasses import dataclass

from tactician.govern.approvals import RuleSpec, Tally, Vote, tally
from tactician.govern.roles import Actor, Role


@dataclass(frozen=True)
class TokenRow:
    id: str
    name: str
    role: Role
    groups: frozenset[str]
    created_at: float
    created_by: str
    revoked_at: float | None
    site: str | None = None
    """The edge site the token was made for (None: not a site's token)."""

    def actor(self) -> Actor:
        return Actor(self.name, self.role, self.groups, site=self.site)


@dataclass(frozen=True)
class Deployment:
    seq: int
    slot: str
    version: str | None
    share: float | None
    split_by: str | None
    at: float
    actor: str
    reason: str | None


@dataclass(frozen=True)
class ApprovalRow:
    task_id: str
    rule: RuleSpec
    policy_version: str
    requested_by: str
    requested_at: float
    expires_at: float
    escalated: int
    state: str
    resolved_at: float | None
    resolved_by: str | None
    reason: str | None
    votes: tuple[Vote, ...]

    def tally(self) -> Tally:
        return tally(self.rule, self.votes)


@dataclass(frozen=True)
class Override:
    task_id: str
    what: str
    value: float | None
    actor: str
    reason: str
    at: float
    expires_at: float | None


@dataclass(frozen=True)
class NewApproval:
    """An approval to open for a task as it is submitted or gated."""

    rule: RuleSpec
    policy_version: str
    requested_by: str


@dataclass(frozen=True)
class DecisionRow:
    """One bundle's first decision on a task, kept to compare bundles (live beside shadow)."""

    task_id: str
    slot: str
    version: str
    position: float
    """0: first of its planning pass, 1: last."""
    action: str
    confidence: float
    decided_at: float


@dataclass(frozen=True)
class OutcomeOfTask:
    """A finished task as a bundle comparison sees it."""

    task_id: str
    tenant: str
    created_at: float
    due_at: float | None
    finished_at: float | None
    weight: float
    state: str
    asked_approval: bool


@dataclass(frozen=True)
class Fallback:
    """The decision service's drift fallback, while it is engaged."""

    since: float
    signal: str
    reason: str
    policy: str
