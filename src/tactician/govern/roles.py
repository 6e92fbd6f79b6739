"""Roles, actors and what each role may do.

Four roles: a viewer reads; an operator runs the queue (submit, cancel, retry, overrides); an
approver answers approvals; an admin does everything, including policies, models and tokens.
Every mutation names its actor, and a refused one is audited like any other.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from dataclasses import dataclass

from tactician.errors import Forbidden, InvalidInput


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    APPROVER = "approver"
    ADMIN = "admin"


class Operation(enum.StrEnum):
    """Every mutation an actor can ask for (reads need only a valid token)."""

    SUBMIT = "task.submit"
    CANCEL = "task.cancel"
    RETRY = "task.retry"
    REPRIORITIZE = "task.reprioritize"
    OVERRIDE = "override.set"
    CLEAR_OVERRIDE = "override.clear"
    VOTE = "approval.vote"
    DEPLOY_POLICY = "policy.deploy"
    ROLLBACK_POLICY = "policy.rollback"
    PROMOTE_MODEL = "model.promote"
    SCHEDULE = "schedule.change"
    SET_POOL = "pool.set"
    CLEAR_DRIFT = "drift.clear"
    CREATE_TOKEN = "token.create"
    REVOKE_TOKEN = "token.revoke"
    PURGE = "task.purge"


_OPERATOR = frozenset(
    {
        Operation.SUBMIT,
        Operation.CANCEL,
        Operation.RETRY,
        Operation.REPRIORITIZE,
        Operation.OVERRIDE,
        Operation.CLEAR_OVERRIDE,
        Operation.SCHEDULE,
        Operation.CLEAR_DRIFT,
    }
)
ALLOWED: dict[Role, frozenset[Operation]] = {
    Role.VIEWER: frozenset(),
    Role.OPERATOR: _OPERATOR,
    Role.APPROVER: frozenset({Operation.VOTE}),
    Role.ADMIN: frozenset(Operation),
}
"""The whole permission matrix: a role may do these operations and nothing else."""


@dataclass(frozen=True)
class Actor:
    """Who asks: a token's name and role, or the local bootstrap admin."""

    name: str
    role: Role
    groups: frozenset[str] = frozenset()
    bootstrap: bool = False
    """True for a CLI with direct access to the database file and no token: it acts as admin,
    and its audit records say so."""
    site: str | None = None
    """An edge site's token: it may act only as that site's agent (`Gate.authorize_site`)."""

    @property
    def label(self) -> str:
        return (
            f"{self.name} (bootstrap admin: direct database access)"
            if self.bootstrap
            else self.name
        )


SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
"""An edge site's name."""

SYSTEM = Actor("tactician", Role.ADMIN)
"""The engine itself: the planner, workers, expiring approvals and overrides."""


def allowed(actor: Actor, operation: Operation) -> bool:
    return operation in ALLOWED[actor.role]


def check(actor: Actor, operation: Operation) -> None:
    if not allowed(actor, operation):
        raise Forbidden(f"{actor.name} ({actor.role}) may not {operation.value}")


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise InvalidInput(
            f"unknown role {text!r}: one of {', '.join(r.value for r in Role)}"
        ) from None


TOKEN_PREFIX = "tct_"


def new_secret() -> str:
    """A bearer token: shown once, then only its hash is kept."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
