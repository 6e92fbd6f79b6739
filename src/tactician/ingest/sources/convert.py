"""A bus message read as events, as the HTTP intake reads a request body.

The body is one JSON object (format json), a CloudEvent (structured mode, or binary mode when the
bus carries ce-* headers) or an Alertmanager webhook. A plain JSON event's idempotency key is
`<type>:<source>:<message id>`, so a redelivered message merges into the task it made; a
CloudEvent keeps its own key (`cloudevents:<source>:<id>`, unique per event by the spec) and an
alert its fingerprint's, and a template's `idempotency_key` overrides them all.
"""

from __future__ import annotations

import json

from tactician.errors import InvalidInput
from tactician.govern.sources import EventFormat
from tactician.ingest.alertmanager import parse_alertmanager
from tactician.ingest.cloudevents_in import STRUCTURED, parse_cloudevent
from tactician.ingest.records import Event, Resolution
from tactician.ingest.sources.base import Message


def message_key(source_type: str, source: str, message: Message) -> str | None:
    return None if message.id is None else f"{source_type}:{source}:{message.id}"


def read_message(
    message: Message, source: str, format: EventFormat, key: str | None
) -> list[Event | Resolution]:
    """The message's events; raises InvalidInput (one line) when it cannot be read."""
    if format == "alertmanager":
        return parse_alertmanager(message.body, source)
    if format == "cloudevents":
        headers = dict(message.headers)
        if "content-type" not in headers and not any(h.startswith("ce-") for h in headers):
            headers["content-type"] = STRUCTURED  # a bus without headers: the whole event
        return [parse_cloudevent(headers, message.body, source)]
    try:
        # Decoded here: json.loads would guess UTF-16 or -32 from the first bytes.
        data = json.loads(message.body.decode())
    except UnicodeDecodeError:
        raise InvalidInput("the message is not UTF-8 text") from None
    except ValueError as exc:
        raise InvalidInput(f"the message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"an event is a JSON object, not {type(data).__name__}")
    return [Event(source, data, key)]
