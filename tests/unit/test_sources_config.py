"""Bus source declarations (an ingest config file, or a bundle's `sources:`) and how a message is
read: every mistake is one line naming the file, the line and the field."""

from __future__ import annotations

import pytest

from tactician.errors import InvalidInput
from tactician.govern.policy import BundleError, parse_bundle
from tactician.ingest.records import Event
from tactician.ingest.sources import Message, parse_sources, select_sources
from tactician.ingest.sources.base import redact_url
from tactician.ingest.sources.convert import message_key, read_message

GOOD = """sources:
  - name: orders
    type: redis
    url: redis://127.0.0.1:6379/0
    stream: orders
    claim_idle: 5s
  - name: alerts
    type: nats
    url: nats://127.0.0.1:4222
    subject: alerts.>
    format: cloudevents
    ack_wait: 1m
  - name: jobs
    type: rabbitmq
    url: amqp://guest:secret@127.0.0.1:5672/%2F
    queue: jobs
    batch_size: 50
    max_pending: 200
  - name: app-outbox
    type: outbox
"""


def test_a_good_file_gives_every_source_with_defaults() -> None:
    orders, alerts, jobs, outbox = parse_sources(GOOD, "ingest.yaml")
    assert (orders.type, orders.stream, orders.claim_idle) == ("redis", "orders", 5.0)
    assert (orders.batch_size, orders.max_pending, orders.format) == (100, 10_000, "json")
    assert (alerts.subject, alerts.format, alerts.ack_wait) == ("alerts.>", "cloudevents", 60.0)
    assert (jobs.queue, jobs.batch_size, jobs.max_pending) == ("jobs", 50, 200)
    assert (outbox.type, outbox.url) == ("outbox", None)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "sources:\n  - name: a\n    type: redis\n    url: redis://x\n",
            "ingest.yaml:2: sources[0].stream: is required for type redis",
        ),
        (
            "sources:\n  - name: a\n    type: redis\n    url: redis://x\n    stream: s\n"
            "    queue: q\n",
            "ingest.yaml:6: sources[0].queue: applies to type rabbitmq only",
        ),
        (
            "sources:\n  - name: a\n    type: nats\n    subject: s\n",
            "ingest.yaml:2: sources[0].url: is required for type nats",
        ),
        (
            "sources:\n  - name: a\n    type: outbox\n    url: postgresql://x/db\n",
            "ingest.yaml:4: sources[0].url: an outbox is a table of Tactician's own database "
            "(--db): no url",
        ),
        (
            "sources:\n  - name: a\n    type: kafka\n",
            "ingest.yaml:3: sources[0].type: must be one of 'redis', 'nats', 'rabbitmq' or "
            "'outbox', not 'kafka'",
        ),
        (
            "sources:\n  - name: a\n    type: outbox\n  - name: a\n    type: outbox\n",
            "ingest.yaml:4: sources[1].name: 'a' is already the name of sources[0]",
        ),
        (
            "sources:\n  - name: Orders!\n    type: outbox\n",
            "ingest.yaml:2: sources[0].name: must be 1 to 64 characters of a-z, 0-9, '.', '_' "
            "or '-'",
        ),
        (
            "sources:\n  - name: a\n    type: outbox\n    batch_size: 0\n",
            "ingest.yaml:4: sources[0].batch_size: must be >= 1",
        ),
        (
            "sources:\n  - name: a\n    type: outbox\n    max_pending: '10'\n",
            "ingest.yaml:4: sources[0].max_pending: must be a whole number",
        ),
        (
            "sources:\n  - name: a\n    type: outbox\n    poll_interval: soon\n",
            "ingest.yaml:4: sources[0].poll_interval: must be a duration like 30s, 15m, 2h, 1d "
            "or a number of seconds",
        ),
        (
            "sources:\n  - name: a\n    type: outbox\n    colour: red\n",
            "ingest.yaml:4: sources[0].colour: unknown field",
        ),
        (
            "sources:\n  - name: a\n    type: outbox\n    type: redis\n",
            "ingest.yaml:4: sources[0].type: is given twice",
        ),
        ("", "ingest.yaml:1: (top level): must be a mapping with sources, not empty"),
        ("- a\n", "ingest.yaml:1: (top level): must be a mapping with sources, not a list"),
        ("sources: [\n", "ingest.yaml:2: syntax:"),
    ],
)
def test_a_mistake_is_one_line_with_file_line_and_field(text: str, error: str) -> None:
    with pytest.raises(BundleError) as caught:
        parse_sources(text, "ingest.yaml")
    assert str(caught.value).startswith(error), str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_policy_bundle_may_declare_sources_with_the_same_checks() -> None:
    bundle = parse_bundle("name: p\n" + GOOD)
    assert [s.name for s in bundle.sources] == ["orders", "alerts", "jobs", "app-outbox"]
    assert parse_bundle("name: p\n").sources == ()
    with pytest.raises(BundleError, match=r"^policy.yaml:3: sources\[0\].stream: is required"):
        parse_bundle("name: p\nsources:\n  - name: a\n    type: redis\n    url: redis://x\n")


def test_selecting_sources_by_name() -> None:
    specs = parse_sources(GOOD)
    assert [s.name for s in select_sources(specs, [])] == [s.name for s in specs]
    assert [s.name for s in select_sources(specs, ["jobs", "orders"])] == ["orders", "jobs"]
    with pytest.raises(InvalidInput, match=r"no source is named 'job' \(declared: alerts, app"):
        select_sources(specs, ["job"])


def test_passwords_stay_out_of_messages() -> None:
    assert redact_url("amqp://guest:secret@h:5672/%2F") == "amqp://guest:***@h:5672/%2F"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_json_message_is_an_event_keyed_by_its_id() -> None:
    message = Message("1700-0", b'{"type": "order", "n": 1}')
    key = message_key("redis", "orders", message)
    assert key == "redis:orders:1700-0"
    assert read_message(message, "orders", "json", key) == [
        Event("orders", {"type": "order", "n": 1}, "redis:orders:1700-0")
    ]
    assert message_key("rabbitmq", "jobs", Message(None, b"{}")) is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"n": ', "the message is not JSON: Expecting value"),
        (b"\xff\xfe", "the message is not UTF-8 text"),
        (b"[1]", "an event is a JSON object, not list"),
        (b'"text"', "an event is a JSON object, not str"),
    ],
)
def test_an_unreadable_message_says_why(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        read_message(Message("1", body), "orders", "json", "k")
    assert caught.value.message.startswith(reason)


def test_a_cloudevent_without_headers_is_read_in_structured_mode_with_its_own_key() -> None:
    body = b'{"specversion": "1.0", "id": "e1", "source": "/shop", "type": "order", "data": {}}'
    [event] = read_message(Message("5", body), "shop", "cloudevents", "nats:shop:5")
    assert isinstance(event, Event)
    assert event.idempotency_key == "cloudevents:/shop:e1"
    assert event.body["type"] == "order"
