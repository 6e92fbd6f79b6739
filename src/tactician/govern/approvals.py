"""Approval rules as the gate applies them: which task needs whose sign-off, and when it is done.

A rule comes from the policy bundle and is copied into each approval it opens (`RuleSpec`), so
a later deploy never changes the terms of an approval already asked. Static conditions (kind,
tags, tenant, sensitivity) are known at submission; decision conditions (the advised action,
confidence, predicted impact) only once the decision service has looked at the task, so such a
rule holds the task back from the planner until it has been approved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tactician.errors import Forbidden, InvalidInput
from tactician.govern.roles import Actor

Verdict = Literal["approve", "reject"]


@dataclass(frozen=True)
class Match:
    kinds: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    sensitive: bool | None = None
    actions: tuple[str, ...] = ()
    confidence_below: float | None = None
    impact_above: float | None = None

    @property
    def needs_decision(self) -> bool:
        return (
            bool(self.actions)
            or self.confidence_below is not None
            or (self.impact_above is not None)
        )

    def static(self, kind: str, tags: Sequence[str], tenant: str, sensitive: bool) -> bool:
        """The conditions known at submission all hold (decision conditions not looked at)."""
        return (
            (not self.kinds or kind in self.kinds)
            and all(tag in tags for tag in self.tags)
            and (not self.tenants or tenant in self.tenants)
            and (self.sensitive is None or self.sensitive == sensitive)
        )

    def decided(self, action: str, confidence: float, impact: float) -> bool:
        """The decision conditions all hold."""
        return (
            (not self.actions or action in self.actions)
            and (self.confidence_below is None or confidence < self.confidence_below)
            and (self.impact_above is None or impact > self.impact_above)
        )


@dataclass(frozen=True)
class Step:
    after: float
    """Seconds after the request."""
    notify: str
    """A channel of the policy bundle."""


@dataclass(frozen=True)
class RuleSpec:
    name: str
    match: Match
    roles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    required: int = 1
    expires_after: float = 86_400.0
    escalation: tuple[Step, ...] = ()
    on_expiry: Literal["reject", "approve"] = "reject"
    editable: tuple[str, ...] = ()
    offline: Literal["hold", "approve", "reject"] = "hold"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RuleSpec:
        data = dict(data)
        conditions: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("match").items()
        }
        match = Match(**conditions)
        steps = tuple(Step(**s) for s in data.pop("escalation", ()))
        tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
        return cls(**{**data, **tuples, "match": match, "escalation": steps})

    def may_vote(self, actor: Actor) -> bool:
        return actor.role.value in self.roles or bool(actor.groups & set(self.groups))


def first_static(
    rules: Sequence[RuleSpec], kind: str, tags: Sequence[str], tenant: str, sensitive: bool
) -> RuleSpec | None:
    """The first rule decided at submission: static conditions only, all holding."""
    for rule in rules:
        if rule.match.static(kind, tags, tenant, sensitive) and not rule.match.needs_decision:
            return rule
    return None


def is_sensitive(payload: Mapping[str, Any], tags: Sequence[str]) -> bool:
    """A task is sensitive when its payload says so or it is tagged `sensitive`."""
    return payload.get("sensitive") is True or "sensitive" in tags


@dataclass(frozen=True)
class Vote:
    actor: str
    verdict: Verdict
    reason: str
    edits: Mapping[str, Any] = field(default_factory=dict)
    at: float = 0.0


@dataclass(frozen=True)
class Tally:
    state: Literal["pending", "approved", "rejected"]
    approvals: int
    required: int

    def text(self) -> str:
        if self.state == "pending":
            return f"{self.approvals} of {self.required} approvals"
        return f"{self.state} ({self.approvals} of {self.required} approvals)"


def tally(rule: RuleSpec, votes: Sequence[Vote]) -> Tally:
    """One rejection rejects; `required` distinct approvals approve."""
    approvals = sum(1 for v in votes if v.verdict == "approve")
    if any(v.verdict == "reject" for v in votes):
        return Tally("rejected", approvals, rule.required)
    return Tally("approved" if approvals >= rule.required else "pending", approvals, rule.required)


def check_vote(
    rule: RuleSpec,
    actor: Actor,
    requested_by: str,
    verdict: str,
    reason: str,
    edits: Mapping[str, Any],
    earlier: Sequence[Vote],
) -> None:
    """Raise unless `actor` may cast this vote now."""
    if verdict not in ("approve", "reject"):
        raise InvalidInput(f"a verdict is approve or reject, not {verdict!r}")
    if not reason.strip():
        raise InvalidInput("approve and reject need a reason")
    if actor.name == requested_by:
        raise Forbidden(f"{actor.name} asked for this task and cannot approve or reject it")
    if not rule.may_vote(actor):
        who = ", ".join([*(f"role {r}" for r in rule.roles), *(f"group {g}" for g in rule.groups)])
        raise Forbidden(f"rule {rule.name} is answered by {who}; {actor.name} is not one of them")
    if any(v.actor == actor.name for v in earlier):
        raise InvalidInput(f"{actor.name} has already answered this approval")
    if edits and verdict != "approve":
        raise InvalidInput("only an approval can edit the task")
    check_edits(rule, edits)


def check_edits(rule: RuleSpec, edits: Mapping[str, Any]) -> None:
    for name, value in edits.items():
        if name not in rule.editable:
            allowed = ", ".join(rule.editable) or "nothing"
            raise InvalidInput(f"rule {rule.name} does not let an approver edit {name} ({allowed})")
        if name == "weight" and not (
            isinstance(value, int | float) and value > 0 and math.isfinite(value)
        ):
            raise InvalidInput(f"weight must be a positive number, got {value!r}")
        if name == "due_at" and not (
            value is None or (isinstance(value, int | float) and math.isfinite(value))
        ):
            raise InvalidInput(f"due_at must be a time in seconds or null, got {value!r}")


def apply_edits(
    payload: Mapping[str, Any], weight: float, due_at: float | None, edits: Mapping[str, Any]
) -> tuple[dict[str, Any], float, float | None]:
    """The task's payload, weight and deadline after an approver's edits."""
    new_payload = dict(payload)
    for name, value in edits.items():
        if name == "weight":
            weight = float(value)
        elif name == "due_at":
            due_at = None if value is None else float(value)
        else:
            new_payload[name.removeprefix("payload.")] = value
    return new_payload, weight, due_at


def next_due(rule: RuleSpec, notified: int) -> float:
    """Seconds after the request when the next step not yet notified, or the expiry, is due."""
    return min([s.after for s in rule.escalation[notified:]] + [rule.expires_after])


def due_steps(rule: RuleSpec, requested_at: float, notified: int, now: float) -> list[int]:
    """Escalation steps (indexes) that are due now and were not notified yet."""
    return [
        i
        for i, step in enumerate(rule.escalation)
        if i >= notified and requested_at + step.after <= now
    ]
