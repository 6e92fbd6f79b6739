"""HTTP ingestion, pure parts: event→task templates, Alertmanager v4 payloads, CloudEvents in both
content modes, HMAC signatures with a replay window. Every refusal is one line naming the fault."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

from tactician.domain import NewTask
from tactician.errors import Forbidden, InvalidInput
from tactician.govern.policy import Template, parse_bundle
from tactician.ingest.alertmanager import parse_alertmanager
from tactician.ingest.cloudevents_in import parse_cloudevent
from tactician.ingest.records import Event, Resolution, Unmatched
from tactician.ingest.signatures import BadSignature, sign, verify
from tactician.ingest.templates import render_task, task_for

NOW = 1_700_000_000.0


def template(**fields: Any) -> Template:
    spec: dict[str, Any] = {"name": "t", "source": "hooks", "task": {"kind": "fix"}}
    spec.update(fields)
    return Template.model_validate(spec)


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) < 200


# --- templates ----------------------------------------------------------------------------


def test_the_first_matching_template_makes_the_task() -> None:
    templates = [
        template(name="other-source", source="github"),
        template(name="warnings", match={"severity": "warning"}, task={"kind": "look"}),
        template(
            name="pages",
            match={"severity": "page", "labels.team": "db"},
            task={
                "kind": "restart",
                "payload": {"host": "{labels.instance}", "note": "restart {labels.instance}"},
                "due_in": "15m",
                "weight": 3,
                "tags": ["team:{labels.team}", "prod"],
            },
        ),
        template(name="also-pages", match={"severity": "page"}, task={"kind": "never"}),
    ]
    event = Event("hooks", {"severity": "page", "labels": {"team": "db", "instance": "db-1"}}, "k1")
    task = task_for(event, templates, NOW)
    assert task == NewTask(
        kind="restart",
        payload={"host": "db-1", "note": "restart db-1"},
        due_at=NOW + 900.0,
        weight=3.0,
        idempotency_key="k1",
        source="hooks",
        tags=("team:db", "prod"),
    )


def test_a_template_without_due_in_or_weight_leaves_the_defaults() -> None:
    task = task_for(Event("hooks", {}), [template()], NOW)
    assert task == NewTask(kind="fix", source="hooks")


def test_a_whole_placeholder_keeps_the_field_as_it_is() -> None:
    body = {"n": 3, "ok": True, "none": None, "obj": {"a": [1, 2]}, "items": [{"id": "x"}]}
    spec = {
        "kind": "fix",
        "payload": {
            "n": "{n}",
            "ok": "{ok}",
            "none": "{none}",
            "obj": "{obj}",
            "first": "{items.0.id}",
            "nested": {"list": ["{obj.a.1}", "literal"]},
        },
    }
    task = render_task(template(task=spec), Event("hooks", body), NOW)
    assert task.payload == {
        "n": 3,
        "ok": True,
        "none": None,
        "obj": {"a": [1, 2]},
        "first": "x",
        "nested": {"list": [2, "literal"]},
    }


def test_placeholders_within_text_are_written_as_text() -> None:
    body = {"n": 3, "ok": False, "obj": {"a": 1}, "name": "db"}
    spec = {
        "kind": "fix",
        "payload": {"text": "{name}:{n}:{ok}:{obj}", "braces": "{{name}} is {name}"},
        "idempotency_key": "hooks:{name}:{n}",
    }
    task = render_task(template(task=spec), Event("hooks", body, "default"), NOW)
    assert task.payload == {"text": 'db:3:false:{"a":1}', "braces": "{name} is db"}
    assert task.idempotency_key == "hooks:db:3"


def test_the_payload_shares_nothing_with_the_event() -> None:
    body: dict[str, Any] = {"obj": {"a": [1]}}
    task = render_task(
        template(task={"kind": "fix", "payload": {"o": "{obj}"}}), Event("hooks", body), NOW
    )
    body["obj"]["a"].append(2)
    assert task.payload == {"o": {"a": [1]}}


@pytest.mark.parametrize(
    ("match", "body"),
    [
        ({"severity": "page"}, {}),
        ({"severity": "page"}, {"severity": "warning"}),
        ({"labels.team": "db"}, {"labels": "db"}),
        ({"count": 1}, {"count": True}),
        ({"flag": True}, {"flag": 1}),
        ({"count": 1}, {"count": "1"}),
        ({"value": None}, {}),
        ({"items.3": "x"}, {"items": ["x"]}),
    ],
    ids=[
        "missing",
        "different",
        "not-an-object",
        "bool-is-not-1",
        "1-is-not-true",
        "text-is-not-1",
        "null-is-not-missing",
        "index-out-of-range",
    ],
)
def test_a_template_matches_only_equal_values(match: dict[str, Any], body: dict[str, Any]) -> None:
    result = task_for(Event("hooks", body), [template(name="only", match=match)], NOW)
    assert result == Unmatched("hooks", "no template of source 'hooks' matches (tried only)")


@pytest.mark.parametrize(
    ("match", "body"),
    [
        ({"count": 1}, {"count": 1.0}),
        ({"value": None}, {"value": None}),
        ({"a.0": "x"}, {"a": ["x"]}),
    ],
)
def test_equal_values_match(match: dict[str, Any], body: dict[str, Any]) -> None:
    assert isinstance(task_for(Event("hooks", body), [template(match=match)], NOW), NewTask)


def test_an_event_of_a_source_without_templates_is_unmatched() -> None:
    result = task_for(Event("github", {"action": "opened"}), [template()], NOW)
    assert result == Unmatched(
        "github", "no template of source 'github' matches (the policy has none)"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"payload": {"host": "{labels.instance}"}}, "the event has no field 'labels.instance'"),
        ({"payload": {"host": "on {host}"}}, "the event has no field 'host'"),
        ({"payload": {"deep": [{"x": "{a.b.c}"}]}}, "the event has no field 'a.b.c'"),
        ({"payload": {"item": "{items.5}"}}, "the event has no field 'items.5'"),
        ({"tags": ["team:{team}"]}, "the event has no field 'team'"),
        ({"idempotency_key": "k:{fingerprint}"}, "the event has no field 'fingerprint'"),
        ({"payload": {"x": "{}"}}, "empty placeholder {}"),
        ({"idempotency_key": "{empty}"}, "idempotency_key is empty once filled"),
    ],
)
def test_a_placeholder_the_event_cannot_fill_is_refused(spec: dict[str, Any], message: str) -> None:
    tpl = template(name="restart-db", task={"kind": "fix", **spec})
    with pytest.raises(InvalidInput) as raised:
        task_for(Event("hooks", {"items": [1], "empty": ""}), [tpl], NOW)
    assert raised.value.message == f"template 'restart-db': {message}"
    assert one_line(raised.value.message)


def test_templates_from_a_policy_bundle() -> None:
    bundle = parse_bundle(
        "name: ops\n"
        "templates:\n"
        "  - name: disk-full\n"
        "    source: alertmanager\n"
        "    match: {labels.alertname: DiskFull}\n"
        "    task:\n"
        "      kind: remediate\n"
        '      payload: {host: "{labels.instance}", runbook: "{annotations.runbook_url}"}\n'
        "      due_in: 15m\n"
        "      tags: [prod]\n"
    )
    (event,) = parse_alertmanager(json.dumps(alertmanager_payload()))
    assert isinstance(event, Event)
    task = task_for(event, bundle.templates, NOW)
    assert isinstance(task, NewTask)
    assert task.kind == "remediate"
    assert task.payload == {"host": "db-1:9100", "runbook": "https://runbooks/disk-full"}
    assert task.due_at == NOW + 900.0
    assert task.idempotency_key == "alertmanager:5e6f1a2b3c4d5e6f:2024-05-01T10:00:00.123456789Z"
    assert task.source == "alertmanager"


# --- Alertmanager -------------------------------------------------------------------------


def alertmanager_payload(status: str = "firing", **alert_changes: Any) -> dict[str, Any]:
    """A version 4 payload as Alertmanager 0.27 sends it."""
    alert = {
        "status": status,
        "labels": {"alertname": "DiskFull", "instance": "db-1:9100", "severity": "page"},
        "annotations": {"summary": "disk 95% full", "runbook_url": "https://runbooks/disk-full"},
        "startsAt": "2024-05-01T10:00:00.123456789Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2024-05-01T10:30:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=disk_used+%3E+0.95",
        "fingerprint": "5e6f1a2b3c4d5e6f",
    }
    alert.update(alert_changes)
    return {
        "receiver": "tactician",
        "status": status,
        "alerts": [alert],
        "groupLabels": {"alertname": "DiskFull"},
        "commonLabels": dict(alert["labels"]) if isinstance(alert["labels"], dict) else {},
        "commonAnnotations": {"summary": "disk 95% full"},
        "externalURL": "http://alertmanager:9093",
        "version": "4",
        "groupKey": '{}:{alertname="DiskFull"}',
        "truncatedAlerts": 0,
    }


def test_a_firing_alert_becomes_an_event_keyed_by_fingerprint_and_start() -> None:
    (event,) = parse_alertmanager(json.dumps(alertmanager_payload()).encode())
    assert isinstance(event, Event)
    assert event.source == "alertmanager"
    assert event.idempotency_key == "alertmanager:5e6f1a2b3c4d5e6f:2024-05-01T10:00:00.123456789Z"
    assert event.body["labels"]["instance"] == "db-1:9100"
    assert event.body["annotations"]["summary"] == "disk 95% full"
    assert event.body["fingerprint"] == "5e6f1a2b3c4d5e6f"
    assert event.body["status"] == "firing"
    assert event.body["startsAt"] == "2024-05-01T10:00:00.123456789Z"
    assert event.body["receiver"] == "tactician"
    assert event.body["commonLabels"]["severity"] == "page"


def test_firing_then_resolved_makes_a_task_then_cancels_it() -> None:
    (firing,) = parse_alertmanager(json.dumps(alertmanager_payload("firing")))
    (resolved,) = parse_alertmanager(json.dumps(alertmanager_payload("resolved")))
    assert resolved == Resolution("5e6f1a2b3c4d5e6f")
    assert isinstance(firing, Event) and firing.idempotency_key
    assert firing.idempotency_key.startswith(resolved.key_prefix)


def test_a_repeated_alert_merges_and_a_new_firing_does_not() -> None:
    (first,) = parse_alertmanager(json.dumps(alertmanager_payload()))
    (repeat,) = parse_alertmanager(json.dumps(alertmanager_payload()))
    (again,) = parse_alertmanager(json.dumps(alertmanager_payload(startsAt="2024-05-02T08:00:00Z")))
    assert isinstance(first, Event) and isinstance(repeat, Event) and isinstance(again, Event)
    assert first.idempotency_key == repeat.idempotency_key != again.idempotency_key


def test_each_alert_of_a_group_is_handled_in_order() -> None:
    payload = alertmanager_payload()
    second = copy.deepcopy(payload["alerts"][0])
    second.update(status="resolved", fingerprint="aaaa", endsAt="2024-05-01T11:00:00Z")
    third = copy.deepcopy(payload["alerts"][0])
    third["fingerprint"] = "bbbb"
    payload["alerts"] += [second, third]
    results = parse_alertmanager(json.dumps(payload), source="am-eu")
    assert [type(r).__name__ for r in results] == ["Event", "Resolution", "Event"]
    assert results[1] == Resolution("aaaa")
    assert isinstance(results[2], Event) and results[2].source == "am-eu"
    assert results[2].body["fingerprint"] == "bbbb"


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload.pop(key)


def _drop_alert(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload["alerts"][0].pop(key)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload.__setitem__(key, value)


def _set_alert(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload["alerts"][0].__setitem__(key, value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop("version"), "version: is missing"),
        (_set("version", "3"), "version: must be '4', not '3'"),
        (_set("version", 4), "version: must be a string"),
        (_drop("status"), "status: is missing"),
        (_set("status", "pending"), "status: must be firing or resolved, not 'pending'"),
        (_drop("receiver"), "receiver: is missing"),
        (_set("groupKey", None), "groupKey: must be a string"),
        (_drop("externalURL"), "externalURL: is missing"),
        (_set("groupLabels", []), "groupLabels: must be an object of strings"),
        (_set("commonLabels", {"severity": 2}), "commonLabels.severity: must be a string"),
        (_drop("commonAnnotations"), "commonAnnotations: is missing"),
        (_set("truncatedAlerts", -1), "truncatedAlerts: must be a whole number >= 0"),
        (_set("truncatedAlerts", True), "truncatedAlerts: must be a whole number >= 0"),
        (_drop("alerts"), "alerts: is missing"),
        (_set("alerts", []), "alerts: must be a non-empty list"),
        (_set("alerts", {"0": {}}), "alerts: must be a non-empty list"),
        (_set("alerts", ["firing"]), "alerts[0]: must be an object"),
        (_drop_alert("status"), "alerts[0].status: is missing"),
        (
            _set_alert("status", "silenced"),
            "alerts[0].status: must be firing or resolved, not 'silenced'",
        ),
        (_drop_alert("labels"), "alerts[0].labels: is missing"),
        (_set_alert("labels", {"alertname": None}), "alerts[0].labels.alertname: must be a string"),
        (_set_alert("annotations", "x"), "alerts[0].annotations: must be an object of strings"),
        (_drop_alert("startsAt"), "alerts[0].startsAt: is missing"),
        (_set_alert("startsAt", ""), "alerts[0].startsAt: must be a non-empty string"),
        (
            _set_alert("startsAt", "yesterday"),
            "alerts[0].startsAt: must be an RFC 3339 time with its offset, not 'yesterday'",
        ),
        (
            _set_alert("startsAt", "2024-05-01T10:00:00"),
            "alerts[0].startsAt: must be an RFC 3339 time with its offset, "
            "not '2024-05-01T10:00:00'",
        ),
        (_drop_alert("endsAt"), "alerts[0].endsAt: is missing"),
        (_set_alert("generatorURL", 1), "alerts[0].generatorURL: must be a string"),
        (_drop_alert("fingerprint"), "alerts[0].fingerprint: is missing"),
        (_set_alert("fingerprint", ""), "alerts[0].fingerprint: must be a non-empty string"),
    ],
)
def test_a_malformed_alertmanager_payload_names_the_field(
    change: Callable[[dict[str, Any]], None], message: str
) -> None:
    payload = alertmanager_payload()
    change(payload)
    with pytest.raises(InvalidInput) as raised:
        parse_alertmanager(json.dumps(payload))
    assert raised.value.message == f"alertmanager: {message}"
    assert "\n" not in raised.value.message


def test_the_second_alert_at_fault_is_named() -> None:
    payload = alertmanager_payload()
    payload["alerts"].append({**payload["alerts"][0], "fingerprint": 7})
    with pytest.raises(
        InvalidInput, match=r"^alertmanager: alerts\[1\]\.fingerprint: must be a non-empty string$"
    ):
        parse_alertmanager(json.dumps(payload))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "alertmanager: the body is not JSON: Expecting value: line 1 column 1 (char 0)"),
        (
            b"{oops",
            "alertmanager: the body is not JSON: Expecting property name enclosed in double "
            "quotes: line 1 column 2 (char 1)",
        ),
        (
            b"\xff\xfe",
            "alertmanager: the body is not UTF-8: 'utf-8' codec can't decode byte 0xff in "
            "position 0: invalid start byte",
        ),
        (b"[]", "alertmanager: (top level): must be an object, not list"),
        (b"null", "alertmanager: (top level): must be an object, not NoneType"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_refused(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        parse_alertmanager(body)
    assert raised.value.message == message


# --- CloudEvents --------------------------------------------------------------------------


def sdk_event(**attributes: Any) -> CloudEvent:
    base: dict[str, Any] = {
        "id": "evt-1",
        "source": "/orders/eu",
        "type": "com.example.order.created",
        "subject": "order-42",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    base.update(attributes)
    return CloudEvent(base, {"order": 42, "lines": [{"sku": "a"}]})


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_both_content_modes_give_the_same_event(mode: str) -> None:
    sent = sdk_event()
    message = to_structured_event(sent) if mode == "structured" else to_binary_event(sent)
    event = parse_cloudevent(message.headers, message.body)
    assert event.source == "cloudevents"
    assert event.idempotency_key == "cloudevents:/orders/eu:evt-1"
    body = dict(event.body)
    time = body.pop("time")
    assert time == sent.get_time().isoformat()  # type: ignore[union-attr]
    body.pop("datacontenttype", None)
    assert body == {
        "id": "evt-1",
        "source": "/orders/eu",
        "type": "com.example.order.created",
        "specversion": "1.0",
        "subject": "order-42",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "data": {"order": 42, "lines": [{"sku": "a"}]},
    }


def test_a_structured_event_written_by_hand() -> None:
    body = json.dumps(
        {
            "specversion": "1.0",
            "id": "A234-1234-1234",
            "source": "https://github.com/cloudevents/spec/pull",
            "type": "com.github.pull_request.opened",
            "time": "2018-04-05T17:31:00Z",
            "datacontenttype": "text/xml",
            "data": '<much wow="xml"/>',
        }
    )
    headers = {"Content-Type": "application/cloudevents+json; charset=utf-8"}
    event = parse_cloudevent(headers, body, source="github")
    assert event == Event(
        "github",
        {
            "id": "A234-1234-1234",
            "source": "https://github.com/cloudevents/spec/pull",
            "type": "com.github.pull_request.opened",
            "specversion": "1.0",
            "time": "2018-04-05T17:31:00+00:00",
            "datacontenttype": "text/xml",
            "data": '<much wow="xml"/>',
        },
        "cloudevents:https://github.com/cloudevents/spec/pull:A234-1234-1234",
    )


def test_a_binary_event_with_mixed_case_and_percent_encoded_headers() -> None:
    headers = {
        "CE-SpecVersion": "1.0",
        "Ce-Id": "42",
        "ce-source": "/shop/caf%C3%A9",
        "ce-type": "order.paid",
        "Content-Type": "application/json",
    }
    event = parse_cloudevent(headers, b'{"total": 12.5}')
    assert event.body["source"] == "/shop/café"
    assert event.body["data"] == {"total": 12.5}
    assert "time" not in event.body  # not sent: the SDK's own clock is not the event's time
    assert event.idempotency_key == "cloudevents:/shop/café:42"


def test_a_structured_event_with_ce_headers_is_read_from_its_body() -> None:
    body = {"specversion": "1.0", "id": "from-body", "source": "/s", "type": "t"}
    headers = {"Content-Type": "application/cloudevents+json", "ce-id": "from-header"}
    event = parse_cloudevent(headers, json.dumps(body))
    assert event.body["id"] == "from-body"
    assert event.idempotency_key == "cloudevents:/s:from-body"


def test_binary_data_that_is_not_text_arrives_as_base64() -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "1",
        "ce-source": "/s",
        "ce-type": "t",
        "content-type": "application/octet-stream",
    }
    event = parse_cloudevent(headers, b"\xff\x00\x01")
    assert event.body["data_base64"] == "/wAB"
    assert "data" not in event.body


def test_a_structured_event_without_data() -> None:
    body = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    event = parse_cloudevent({"content-type": "application/cloudevents+json"}, json.dumps(body))
    assert event.body == body


STRUCTURED = {"content-type": "application/cloudevents+json"}
GOOD = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
BINARY = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}


def _without(mapping: dict[str, str], key: str) -> dict[str, str]:
    return {k: v for k, v in mapping.items() if k != key}


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        (
            {},
            b"{}",
            "content type 'none' is neither structured mode (application/cloudevents+json) "
            "nor binary mode (ce-* headers)",
        ),
        (
            {"content-type": "application/json"},
            json.dumps(GOOD),
            "content type 'application/json' is neither structured mode "
            "(application/cloudevents+json) nor binary mode (ce-* headers)",
        ),
        (
            {"content-type": "application/cloudevents+xml", **BINARY},
            b"<event/>",
            "event format 'application/cloudevents+xml' is not accepted: "
            "use application/cloudevents+json",
        ),
        (
            {"content-type": "application/cloudevents-batch+json"},
            "[]",
            "batched events are not accepted: send one event a request",
        ),
        (
            STRUCTURED,
            b"{",
            "the body is not JSON: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)",
        ),
        (
            STRUCTURED,
            b"\xff",
            "the body is not UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: "
            "invalid start byte",
        ),
        (STRUCTURED, b"[1]", "a structured event must be a JSON object, not list"),
        (STRUCTURED, json.dumps(_without(GOOD, "id")), "required attribute 'id' is missing"),
        (
            STRUCTURED,
            json.dumps(_without(GOOD, "source")),
            "required attribute 'source' is missing",
        ),
        (STRUCTURED, json.dumps(_without(GOOD, "type")), "required attribute 'type' is missing"),
        (
            STRUCTURED,
            json.dumps(_without(GOOD, "specversion")),
            "required attribute 'specversion' is missing",
        ),
        (STRUCTURED, json.dumps({**GOOD, "id": ""}), "attribute 'id' must be a non-empty string"),
        (
            STRUCTURED,
            json.dumps({**GOOD, "source": 5}),
            "attribute 'source' must be a non-empty string",
        ),
        (
            STRUCTURED,
            json.dumps({**GOOD, "specversion": "0.3"}),
            "specversion must be 1.0, not '0.3'",
        ),
        (
            STRUCTURED,
            json.dumps({**GOOD, "specversion": "2.0"}),
            "specversion must be 1.0, not '2.0'",
        ),
        (
            STRUCTURED,
            json.dumps({**GOOD, "time": "yesterday"}),
            "time must be an RFC 3339 time with its offset, not 'yesterday'",
        ),
        (
            STRUCTURED,
            json.dumps({**GOOD, "time": "2024-01-01T00:00:00"}),
            "time must be an RFC 3339 time with its offset, not '2024-01-01T00:00:00'",
        ),
        (
            STRUCTURED,
            json.dumps({**GOOD, "time": 5}),
            "time must be an RFC 3339 time with its offset, not 5",
        ),
        (STRUCTURED, json.dumps({**GOOD, "subject": ""}), "attribute 'subject' must not be empty"),
        (
            STRUCTURED,
            json.dumps({**GOOD, "Bad_Ext": "x"}),
            "extension attribute 'Bad_Ext' should only contain lowercase letters and numbers",
        ),
        (
            STRUCTURED,
            json.dumps({**GOOD, "data": 1, "data_base64": "AA=="}),
            "data and data_base64 must not both be present",
        ),
        (STRUCTURED, json.dumps({**GOOD, "data_base64": "!!"}), "data_base64 must be base64 text"),
        (_without(BINARY, "ce-id"), b"", "required header ce-id is missing"),
        (_without(BINARY, "ce-type"), b"", "required header ce-type is missing"),
        ({**BINARY, "ce-source": ""}, b"", "header ce-source must be a non-empty string"),
        ({**BINARY, "ce-specversion": "0.3"}, b"", "specversion must be 1.0, not '0.3'"),
        (
            {**BINARY, "ce-time": "2024-13-01T00:00:00Z"},
            b"",
            "time must be an RFC 3339 time with its offset, not '2024-13-01T00:00:00Z'",
        ),
    ],
)
def test_a_malformed_cloudevent_is_refused_with_one_line(
    headers: dict[str, str], body: bytes | str, message: str
) -> None:
    with pytest.raises(InvalidInput) as raised:
        parse_cloudevent(headers, body)
    assert raised.value.message == f"cloudevents: {message}"
    assert "\n" not in raised.value.message


# --- signatures ---------------------------------------------------------------------------

SECRET = b"s3cret-for-hooks"
BODY = b'{"action": "opened", "number": 7}'


def test_a_signed_request_within_the_window_passes() -> None:
    headers = sign(BODY, SECRET, int(NOW))
    digest = verify(headers, BODY, SECRET, NOW + 299)
    message = f"{int(NOW)}.".encode() + BODY
    assert digest == hmac.new(SECRET, message, hashlib.sha256).hexdigest()
    assert headers == {
        "X-Tactician-Timestamp": str(int(NOW)),
        "X-Hub-Signature-256": f"sha256={digest}",
    }


def test_headers_in_any_case_a_text_secret_and_upper_case_hex_pass() -> None:
    headers = sign(BODY, SECRET, int(NOW))
    lowered = {
        name.lower(): value.upper().replace("SHA256=", "sha256=") for name, value in headers.items()
    }
    assert verify(lowered, BODY, SECRET.decode(), NOW) == headers["X-Hub-Signature-256"][7:]


def test_the_window_is_inclusive_both_ways() -> None:
    headers = sign(BODY, SECRET, int(NOW))
    verify(headers, BODY, SECRET, NOW + 300)
    verify(headers, BODY, SECRET, NOW - 300)


def test_signatures_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module `signatures` calls it through
    digest = verify(sign(BODY, SECRET, int(NOW)), BODY, SECRET, NOW)
    assert compared == [(digest, digest)]


def _tampered(**changes: str) -> dict[str, str]:
    headers = sign(BODY, SECRET, int(NOW))
    headers.update(changes)
    return {k: v for k, v in headers.items() if v != "<drop>"}


GITHUB_STYLE = {
    "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET, BODY, hashlib.sha256).hexdigest()
}


@pytest.mark.parametrize(
    ("headers", "body", "secret", "now", "message"),
    [
        (
            _tampered(**{"X-Hub-Signature-256": "<drop>"}),
            BODY,
            SECRET,
            NOW,
            "signature missing: no X-Hub-Signature-256 header",
        ),
        (
            _tampered(**{"X-Hub-Signature-256": "  "}),
            BODY,
            SECRET,
            NOW,
            "signature missing: no X-Hub-Signature-256 header",
        ),
        (
            _tampered(**{"X-Hub-Signature-256": "sha1=abc"}),
            BODY,
            SECRET,
            NOW,
            "signature malformed: X-Hub-Signature-256 must be sha256=<64 hex>",
        ),
        (
            _tampered(**{"X-Hub-Signature-256": "sha256=" + "é" * 64}),
            BODY,
            SECRET,
            NOW,
            "signature malformed: X-Hub-Signature-256 must be sha256=<64 hex>",
        ),
        (
            _tampered(**{"X-Tactician-Timestamp": "<drop>"}),
            BODY,
            SECRET,
            NOW,
            "timestamp missing: no X-Tactician-Timestamp header",
        ),
        (GITHUB_STYLE, BODY, SECRET, NOW, "timestamp missing: no X-Tactician-Timestamp header"),
        (
            _tampered(**{"X-Tactician-Timestamp": "1.7e9"}),
            BODY,
            SECRET,
            NOW,
            "timestamp malformed: X-Tactician-Timestamp must be whole seconds",
        ),
        (
            _tampered(**{"X-Tactician-Timestamp": "-5"}),
            BODY,
            SECRET,
            NOW,
            "timestamp malformed: X-Tactician-Timestamp must be whole seconds",
        ),
        (
            _tampered(**{"X-Tactician-Timestamp": "9" * 5000}),
            BODY,
            SECRET,
            NOW,
            "timestamp malformed: X-Tactician-Timestamp must be whole seconds",
        ),
        (_tampered(), BODY + b" ", SECRET, NOW, "signature does not match"),
        (_tampered(), BODY, b"another secret", NOW, "signature does not match"),
        (
            _tampered(**{"X-Tactician-Timestamp": str(int(NOW) + 1)}),
            BODY,
            SECRET,
            NOW,
            "signature does not match",
        ),
        (
            _tampered(**{"X-Hub-Signature-256": "sha256=" + "0" * 64}),
            BODY,
            SECRET,
            NOW,
            "signature does not match",
        ),
        (
            _tampered(),
            BODY,
            SECRET,
            NOW + 301,
            "timestamp outside the replay window: 301 s old, 300 s allowed",
        ),
        (
            _tampered(),
            BODY,
            SECRET,
            NOW + 86_400,
            "timestamp outside the replay window: 86400 s old, 300 s allowed",
        ),
        (
            _tampered(),
            BODY,
            SECRET,
            NOW - 3_600,
            "timestamp outside the replay window: 3600 s in the future, 300 s allowed",
        ),
    ],
    ids=[
        "missing",
        "blank",
        "sha1",
        "not-hex",
        "no-timestamp",
        "github-body-only",
        "float-timestamp",
        "negative-timestamp",
        "huge-timestamp",
        "tampered-body",
        "wrong-secret",
        "moved-timestamp",
        "zeros",
        "replayed-just-late",
        "replayed-a-day-later",
        "skewed-ahead",
    ],
)
def test_a_request_that_fails_verification_is_refused_with_one_line(
    headers: dict[str, str], body: bytes, secret: bytes, now: float, message: str
) -> None:
    with pytest.raises(BadSignature) as raised:
        verify(headers, body, secret, now)
    assert raised.value.message == message
    assert isinstance(raised.value, Forbidden)


def test_a_narrower_window_refuses_sooner() -> None:
    headers = sign(BODY, SECRET, int(NOW))
    with pytest.raises(
        BadSignature, match=r"^timestamp outside the replay window: 31 s old, 30 s allowed$"
    ):
        verify(headers, BODY, SECRET, NOW + 31, window_s=30)


@pytest.mark.parametrize(
    ("secret", "window", "message"),
    [
        (b"", 300.0, "a webhook secret must not be empty"),
        ("", 300.0, "a webhook secret must not be empty"),
        (SECRET, 0.0, "the replay window must be > 0 seconds, not 0.0"),
        (SECRET, float("nan"), "the replay window must be > 0 seconds, not nan"),
    ],
)
def test_a_bad_configuration_is_refused(secret: bytes | str, window: float, message: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        verify(sign(BODY, SECRET, int(NOW)), BODY, secret, NOW, window_s=window)
    assert raised.value.message == message
