"""The values ingestion passes around: an accepted event, a resolved alert, an unmatched event."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """An event that passed its source's checks, ready for the templates."""

    source: str
    """The ingestion source it came in through (what a template's `source` names)."""
    body: dict[str, Any] = field(default_factory=dict)
    """The event as JSON data: templates match on and fill placeholders from its fields."""
    idempotency_key: str | None = None
    """The task's key when the template sets none, so that a repeat of the event merges."""


@dataclass(frozen=True)
class Resolution:
    """A resolved alert: cancel the pending tasks that its firing made."""

    fingerprint: str

    @property
    def key_prefix(self) -> str:
        """The idempotency keys of those tasks start with this (keys the templates default)."""
        return f"alertmanager:{self.fingerprint}:"


@dataclass(frozen=True)
class Unmatched:
    """No template of the event's source matches it: the caller dead-letters it."""

    source: str
    reason: str
