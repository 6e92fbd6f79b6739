"""Event → task templates, from the policy bundle.

The first template of the event's source whose `match` holds makes the task: templates are
tried in bundle order, as approval rules are, so an event makes at most one task and its
idempotency key is never shared by two.

In the task's payload, tags and idempotency key, `{labels.severity}` is the event's field at
that dotted path (a number picks a list item: `{alerts.0.status}`), and `{{`, `}}` are literal
braces. A payload string that is one placeholder and nothing else takes the field as it is, so a
number stays a number and an object an object; within longer text a field is written as text
(JSON for anything but a string).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tactician.domain import NewTask
from tactician.errors import InvalidInput
from tactician.govern.policy import Template
from tactician.ingest.records import Event, Unmatched

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_ONLY_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class _Missing:
    """The value of a path the event does not have (None is a value an event may hold)."""


_MISSING = _Missing()


def lookup(event: Mapping[str, Any], path: str) -> Any:
    """The field of `event` at the dotted `path`, or `_MISSING`."""
    value: Any = event
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isascii() and part.isdigit():
            if int(part) >= len(value):
                return _MISSING
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _equal(actual: Any, expected: Any) -> bool:
    # Python's True == 1 would let `match: {count: 1}` accept `"count": true`.
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(actual, int | float) and isinstance(expected, int | float):
        return actual == expected
    return type(actual) is type(expected) and bool(actual == expected)


def matches(template: Template, event: Event) -> bool:
    if template.source != event.source:
        return False
    for path, expected in template.match.items():
        actual = lookup(event.body, path)
        if actual is _MISSING or not _equal(actual, expected):
            return False
    return True


def task_for(event: Event, templates: Sequence[Template], now: float) -> NewTask | Unmatched:
    """The task the first matching template makes of `event`, or why none applies.

    Raises InvalidInput when that template names a field the event does not have.
    """
    for template in templates:
        if matches(template, event):
            return render_task(template, event, now)
    tried = [t.name for t in templates if t.source == event.source]
    why = f"tried {', '.join(tried)}" if tried else "the policy has none"
    return Unmatched(event.source, f"no template of source {event.source!r} matches ({why})")


def render_task(template: Template, event: Event, now: float) -> NewTask:
    """The task `template` makes of `event`, whether or not its `match` holds."""
    filler = _Filler(template.name, event.body)
    spec = template.task
    payload = filler.value(dict(spec.payload))
    key = event.idempotency_key
    if spec.idempotency_key is not None:
        key = filler.text(spec.idempotency_key)
        if not key:
            raise InvalidInput(f"template {template.name!r}: idempotency_key is empty once filled")
    return NewTask(
        kind=spec.kind,
        payload=payload,
        due_at=None if spec.due_in is None else now + spec.due_in,
        weight=1.0 if spec.weight is None else spec.weight,
        idempotency_key=key,
        source=event.source,
        tags=tuple(filler.text(tag) for tag in spec.tags),
    )


class _Filler:
    """Fills one template's placeholders from one event."""

    def __init__(self, template: str, event: Mapping[str, Any]) -> None:
        self.template = template
        self.event = event

    def field(self, path: str) -> Any:
        found = lookup(self.event, path)
        if found is _MISSING:
            if not path:
                raise InvalidInput(f"template {self.template!r}: empty placeholder {{}}")
            raise InvalidInput(f"template {self.template!r}: the event has no field {path!r}")
        # A copy: the task's payload must not share lists or objects with the event.
        return copy.deepcopy(found)

    def text(self, text: str) -> str:
        def replace(found: re.Match[str]) -> str:
            if found[0] in ("{{", "}}"):
                return found[0][0]
            value = self.field(found[1])
            if isinstance(value, str):
                return value
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

        return _PLACEHOLDER.sub(replace, text)

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            if whole := _ONLY_PLACEHOLDER.fullmatch(value):
                return self.field(whole[1])
            return self.text(value)
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value
