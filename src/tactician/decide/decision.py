"""A decision: what the decision service advises for one task at one time, and why.

The decision service recommends; the gate and the operators decide. Every decision names the
tier that made it and the model and policy versions it used, and carries its reasons: one per
scoring factor with its share of the score, plus any note (a fallback, an override).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum, StrEnum


class Action(StrEnum):
    RUN = "run"
    """Start when capacity allows, in score order."""
    DEFER = "defer-until"
    """Wait until `defer_until` (the task has slack and its pool is congested, or its window
    has not opened)."""
    MERGE = "merge-into"
    """Folded into the task `merge_into` (same merge key inside the window)."""
    ESCALATE = "escalate"
    """Ask the next tier: low confidence, out of distribution, or a rule says so."""
    HOLD = "hold"
    """Keep waiting without a date: an operator or a rule releases it."""


class Tier(IntEnum):
    RULES = 1
    """A heuristic or learned scorer: always answers."""
    ADVISOR = 2
    """An LLM advisor, asked in the background for escalated cases."""
    HUMAN = 3
    """An operator."""


@dataclass(frozen=True, slots=True)
class Reason:
    """One part of why: a factor, its share of the score, and a short text tied to data."""

    factor: str
    contribution: float
    text: str


@dataclass(frozen=True, slots=True)
class Decision:
    task_id: str
    action: Action
    score: float
    """Higher starts sooner."""
    confidence: float
    """0 to 1: how much the tier trusts its own answer."""
    reasons: tuple[Reason, ...]
    tier: Tier
    model_version: str | None
    policy_version: str | None
    decided_at: float
    defer_until: float | None = None
    merge_into: str | None = None
    note: str | None = None
    """What happened beyond the factors, e.g. "advisor timed out; tier 1 stands"."""

    def evolve(self, **changes: object) -> Decision:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def why(self) -> str:
        """The reasons in one line, largest contribution first."""
        ordered = sorted(self.reasons, key=lambda r: -abs(r.contribution))
        text = "; ".join(r.text for r in ordered if r.text)
        return f"{text} ({self.note})" if self.note else text
