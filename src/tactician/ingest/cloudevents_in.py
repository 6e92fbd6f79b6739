"""CloudEvents 1.0 over HTTP, in both content modes, read with the CloudEvents SDK.

Binary mode puts the attributes in `ce-*` headers and the data in the body; structured mode
sends the whole event as `application/cloudevents+json`, and is told by that content type even
when ce-* headers come along (as the HTTP binding allows). The required attributes (`id`,
`source`, `type`, `specversion` 1.0) are checked here before the SDK reads the message, because
the SDK fills a missing `id` or `specversion` in instead of refusing it. Batches
(`application/cloudevents-batch+json`) are refused.

The event's fields for the templates are `id`, `source`, `type`, `specversion`, and when sent
`subject`, `time` (ISO 8601), `datacontenttype`, `dataschema`, `traceparent`, and `data` (or
`data_base64` for data that is not text). Its idempotency key is `cloudevents:<source>:<id>`,
which the spec makes unique per distinct event, so a redelivery merges.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_binary, from_structured
from cloudevents.core.exceptions import CloudEventValidationError
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from tactician.errors import InvalidInput
from tactician.ingest.records import Event

SOURCE = "cloudevents"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
REQUIRED = ("id", "source", "type", "specversion")
OPTIONAL = ("subject", "datacontenttype", "dataschema", "traceparent")


def _fail(problem: str) -> InvalidInput:
    return InvalidInput(f"cloudevents: {problem}")


def _media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _binary(headers: Mapping[str, str]) -> bool:
    """The content mode, told by the content type first as the HTTP binding says: a structured
    event may also carry ce-* headers."""
    media_type = _media_type(headers)
    if media_type == STRUCTURED:
        return False
    if media_type == BATCH:
        raise _fail("batched events are not accepted: send one event a request")
    if media_type.startswith("application/cloudevents"):
        raise _fail(f"event format {media_type!r} is not accepted: use {STRUCTURED}")
    if any(name.startswith("ce-") for name in headers):
        return True
    shown = media_type or "none"
    raise _fail(
        f"content type {shown!r} is neither structured mode ({STRUCTURED}) "
        "nor binary mode (ce-* headers)"
    )


def _attributes_sent(headers: Mapping[str, str], body: bytes, binary: bool) -> dict[str, Any]:
    """The attributes as the sender wrote them, before the SDK adds defaults."""
    if binary:
        return {name[3:]: value for name, value in headers.items() if name.startswith("ce-")}
    try:
        # Decoded here: json.loads would guess UTF-16 or -32 from the first bytes.
        sent = json.loads(body.decode())
    except UnicodeDecodeError as exc:
        raise _fail(f"the body is not UTF-8: {exc}") from None
    except ValueError as exc:
        raise _fail(f"the body is not JSON: {exc}") from None
    if not isinstance(sent, dict):
        raise _fail(f"a structured event must be a JSON object, not {type(sent).__name__}")
    return sent


def _check_required(sent: Mapping[str, Any], binary: bool) -> None:
    for name in REQUIRED:
        where = f"header ce-{name}" if binary else f"attribute {name!r}"
        if name not in sent:
            raise _fail(f"required {where} is missing")
        if not isinstance(sent[name], str) or not sent[name]:
            raise _fail(f"{where} must be a non-empty string")
    if sent["specversion"] != "1.0":
        raise _fail(f"specversion must be 1.0, not {sent['specversion']!r}")
    if "time" in sent:
        time = unquote(sent["time"]) if binary and isinstance(sent["time"], str) else sent["time"]
        try:
            parsed = datetime.fromisoformat(time) if isinstance(time, str) else None
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise _fail(f"time must be an RFC 3339 time with its offset, not {time!r}")
    if binary:
        return
    if "data" in sent and "data_base64" in sent:
        raise _fail("data and data_base64 must not both be present")
    if "data_base64" in sent:
        try:
            base64.b64decode(sent["data_base64"], validate=True)
        except (ValueError, TypeError):
            raise _fail("data_base64 must be base64 text") from None


def parse_cloudevent(headers: Mapping[str, str], body: bytes | str, source: str = SOURCE) -> Event:
    """The event in an HTTP request, in either content mode; raises InvalidInput with one line.

    `headers` are the request's, in any letter case; `source` is the ingestion source (what
    templates match on), not the event's own `source` attribute.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    raw = body.encode() if isinstance(body, str) else body
    binary = _binary(lowered)
    sent = _attributes_sent(lowered, raw, binary)
    _check_required(sent, binary)
    read = from_binary if binary else from_structured
    try:
        event = read(HTTPMessage(lowered, raw), JSONFormat(), CloudEvent)
    except CloudEventValidationError as exc:
        problem = str(next(iter(exc.errors.values()))[0])
        raise _fail(problem[:1].lower() + problem[1:]) from None
    # The SDK reads untrusted text with dateutil and json: its errors vary by the input
    # (ValueError, TypeError, OverflowError...), and every one means the request is bad.
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(f"the event cannot be read: {message}") from None
    return Event(source, _fields(event, sent), f"cloudevents:{event.get_source()}:{event.get_id()}")


def trace_carrier(headers: Mapping[str, str], body: bytes) -> dict[str, str]:
    """The event's distributed-tracing attributes (`traceparent`, `tracestate`), read before the
    event is parsed so that its ingest span can continue the event's trace: from the ce-*
    headers in binary mode, from the JSON body in structured mode. Empty when there are none or
    the request cannot be read (parsing then refuses it with the reason)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    if _media_type(lowered) != STRUCTURED:
        sent: Any = {name: lowered.get(f"ce-{name}") for name in ("traceparent", "tracestate")}
    else:
        try:
            sent = json.loads(body.decode())
        except (UnicodeDecodeError, ValueError):
            return {}
    if not isinstance(sent, dict):
        return {}
    return {
        name: sent[name]
        for name in ("traceparent", "tracestate")
        if isinstance(sent.get(name), str)
    }


def _fields(event: BaseCloudEvent, sent: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": event.get_id(),
        "source": event.get_source(),
        "type": event.get_type(),
        "specversion": event.get_specversion(),
    }
    attributes = event.get_attributes()
    for name in OPTIONAL:
        if attributes.get(name) is not None:
            fields[name] = attributes[name]
    time = event.get_time()
    if "time" in sent and time is not None:  # the SDK stamps a missing time with its own clock
        fields["time"] = time.isoformat()
    data = event.get_data()
    if isinstance(data, bytes):
        fields["data_base64"] = base64.b64encode(data).decode()
    elif data is not None:
        fields["data"] = data
    return fields
