"""Prometheus Alertmanager's webhook payload, version 4.

Every field of the v4 schema is required (Alertmanager always sends them all; `truncatedAlerts`
is optional); unknown fields are ignored. A malformed payload is refused with one line naming
the field, as `alertmanager: alerts[2].fingerprint: must be a non-empty string`.

A firing alert becomes an `Event` whose idempotency key defaults to
`alertmanager:<fingerprint>:<startsAt>`: Alertmanager repeats a firing alert on every group
interval, and the repeats merge into one task, while the same alert firing again after it
resolved (a new `startsAt`) makes a new one. A resolved alert becomes a `Resolution`: the
caller cancels the pending tasks of that fingerprint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NoReturn

from tactician.errors import InvalidInput
from tactician.ingest.records import Event, Resolution

SOURCE = "alertmanager"
STATUSES = ("firing", "resolved")
_GROUP_FIELDS = ("receiver", "groupKey", "externalURL")
_GROUP_MAPS = ("groupLabels", "commonLabels", "commonAnnotations")


def _fail(path: str, problem: str) -> InvalidInput:
    return InvalidInput(f"alertmanager: {path}: {problem}")


def _text(data: Mapping[str, Any], key: str, path: str, *, empty: bool = True) -> str:
    if key not in data:
        return _missing(path)
    value = data[key]
    if not isinstance(value, str) or (not empty and not value):
        raise _fail(path, "must be a string" if empty else "must be a non-empty string")
    return value


def _labels(data: Mapping[str, Any], key: str, path: str) -> dict[str, str]:
    if key not in data:
        return _missing(path)
    value = data[key]
    if not isinstance(value, dict):
        raise _fail(path, "must be an object of strings")
    for name, item in value.items():
        if not isinstance(item, str):
            raise _fail(f"{path}.{name}", "must be a string")
    return dict(value)


def _status(data: Mapping[str, Any], path: str) -> str:
    status = _text(data, "status", path)
    if status not in STATUSES:
        raise _fail(path, f"must be firing or resolved, not {status!r}")
    return status


def _time(data: Mapping[str, Any], key: str, path: str) -> str:
    value = _text(data, key, path, empty=False)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise _fail(path, f"must be an RFC 3339 time with its offset, not {value!r}")
    return value


def _missing(path: str) -> NoReturn:
    raise _fail(path, "is missing")


def parse_alertmanager(body: bytes | str, source: str = SOURCE) -> list[Event | Resolution]:
    """One `Event` per firing alert and one `Resolution` per resolved alert, in order.

    Raises InvalidInput naming the first field at fault.
    """
    try:
        # Decoded here: json.loads would guess UTF-16 or -32 from the first bytes.
        payload = json.loads(body.decode() if isinstance(body, bytes) else body)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"alertmanager: the body is not UTF-8: {exc}") from None
    except ValueError as exc:
        raise InvalidInput(f"alertmanager: the body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _fail("(top level)", f"must be an object, not {type(payload).__name__}")
    version = _text(payload, "version", "version")
    if version != "4":
        raise _fail("version", f"must be '4', not {version!r}")
    _status(payload, "status")
    group: dict[str, Any] = {key: _text(payload, key, key) for key in _GROUP_FIELDS}
    group |= {key: _labels(payload, key, key) for key in _GROUP_MAPS}
    truncated = payload.get("truncatedAlerts", 0)
    if not isinstance(truncated, int) or isinstance(truncated, bool) or truncated < 0:
        raise _fail("truncatedAlerts", "must be a whole number >= 0")
    alerts = payload["alerts"] if "alerts" in payload else _missing("alerts")
    if not isinstance(alerts, list) or not alerts:
        raise _fail("alerts", "must be a non-empty list")
    return [_alert(alert, f"alerts[{index}]", group, source) for index, alert in enumerate(alerts)]


def _alert(alert: Any, path: str, group: Mapping[str, Any], source: str) -> Event | Resolution:
    if not isinstance(alert, dict):
        raise _fail(path, "must be an object")
    status = _status(alert, f"{path}.status")
    fingerprint = _text(alert, "fingerprint", f"{path}.fingerprint", empty=False)
    body = {
        "status": status,
        "labels": _labels(alert, "labels", f"{path}.labels"),
        "annotations": _labels(alert, "annotations", f"{path}.annotations"),
        "startsAt": _time(alert, "startsAt", f"{path}.startsAt"),
        # A firing alert's endsAt is Go's zero time or a guess: checked as text only.
        "endsAt": _text(alert, "endsAt", f"{path}.endsAt"),
        "generatorURL": _text(alert, "generatorURL", f"{path}.generatorURL"),
        "fingerprint": fingerprint,
        **group,
    }
    if status == "resolved":
        return Resolution(fingerprint)
    return Event(source, body, f"alertmanager:{fingerprint}:{body['startsAt']}")
