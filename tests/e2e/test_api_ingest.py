"""HTTP ingestion through a real API server on both databases: JSON events, CloudEvents (both
content modes), Alertmanager webhooks and HMAC-signed sources become tasks through the live
bundle's templates, committed before the 2xx; repeats merge; a resolved alert cancels its
pending task; anything malformed is answered 4xx with the reason and kept as a dead letter."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from tactician.app import Tactician
from tactician.domain import KindSpec, TaskState
from tactician.govern.roles import Actor, Role
from tactician.ingest.signatures import sign
from tactician.settings import Settings
from tactician.store.protocol import TaskFilter
from tests.e2e.serving import serving

ROOT = Actor("root", Role.ADMIN)
BUNDLE = """name: ingest
templates:
  - name: disk
    source: alertmanager
    match: {labels.alertname: DiskFull}
    task:
      kind: fix
      payload: {host: "{labels.instance}"}
      due_in: 15m
  - name: order
    source: shop
    match: {type: order}
    task: {kind: job, payload: {order: "{id}"}, weight: 2}
  - name: invoice
    source: billing
    match: {type: com.example.invoice}
    task: {kind: job, payload: {invoice: "{data.number}"}}
  - name: push
    source: github
    match: {action: opened}
    task: {kind: job, payload: {pr: "{number}"}}
"""


@dataclass
class World:
    app: Tactician
    client: httpx.Client
    operator: dict[str, str]
    viewer: dict[str, str]


@pytest.fixture
def world(db_url: str) -> Iterator[World]:
    settings = Settings(db=db_url, webhook_secrets="github=s3cret")
    app = Tactician(settings=settings)
    app.store.register_kinds([KindSpec("job", pool="p"), KindSpec("fix", pool="p")])
    app.gate.deploy(ROOT, BUNDLE, "ingest.yaml")
    op = app.gate.create_token(ROOT, "ops", Role.OPERATOR)
    viewer = app.gate.create_token(ROOT, "view", Role.VIEWER)
    with serving(settings) as client:
        yield World(
            app,
            client,
            {"Authorization": f"Bearer {op}"},
            {"Authorization": f"Bearer {viewer}"},
        )
    app.close()


def refused(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message"} and "\n" not in body["message"]
    return str(body["message"])


def test_a_json_event_becomes_one_task_and_repeats_merge(world: World) -> None:
    headers = {**world.operator, "Idempotency-Key": "order-7"}
    first = world.client.post("/events/shop", json={"type": "order", "id": 7}, headers=headers)
    assert first.status_code == 202, first.text
    (task_id,) = first.json()["tasks"]
    task = world.app.get(task_id)  # committed before the answer
    assert task.payload == {"order": 7} and task.weight == 2 and task.kind == "job"
    again = world.client.post("/events/shop", json={"type": "order", "id": 7}, headers=headers)
    assert again.json()["tasks"] == [task_id]
    assert len(world.app.tasks()) == 1
    assert world.app.store.dead_letters() == []  # refused signatures store nothing


def test_an_event_needs_a_token_that_may_submit(world: World) -> None:
    refused(world.client.post("/events/shop", json={"type": "order", "id": 1}), 401)
    message = refused(
        world.client.post("/events/shop", json={"type": "order", "id": 1}, headers=world.viewer),
        403,
    )
    assert "may not task.submit" in message
    assert world.app.tasks() == []


@pytest.mark.parametrize(
    ("path", "body", "content_type", "reason"),
    [
        ("/events/shop", b"{not json", "application/json", "the body is not JSON"),
        ("/events/shop", b"[1, 2]", "application/json", "an event is a JSON object"),
        ("/events/shop", b'{"type": "refund"}', "application/json", "no template of source"),
        (
            "/events/alertmanager/alertmanager",
            b'{"version": "4"}',
            "application/json",
            "alertmanager",
        ),
        (
            "/events/billing/cloudevents",
            b'{"specversion": "1.0"}',
            "application/cloudevents+json",
            "cloudevent",
        ),
    ],
    ids=["not-json", "not-object", "unmatched", "bad-alertmanager", "bad-cloudevent"],
)
def test_a_bad_event_is_4xx_and_kept_as_a_dead_letter(
    world: World, path: str, body: bytes, content_type: str, reason: str
) -> None:
    headers = {**world.operator, "Content-Type": content_type}
    message = refused(world.client.post(path, content=body, headers=headers), 400)
    assert reason.lower() in message.lower()
    assert world.app.tasks() == []
    letters = world.client.get("/dead-letters", headers=world.viewer).json()["items"]
    assert len(letters) == 1 and letters[0]["reason"] == message
    assert letters[0]["body"] == body.decode()
    assert letters[0]["headers"]["authorization"] == "[redacted]"
    trail = [r.action for r in world.app.store.audit_records()]
    assert trail[-1] == "event.dead_lettered"


def alert(status: str, fingerprint: str = "fp1") -> dict[str, object]:
    return {
        "version": "4",
        "groupKey": '{}:{alertname="DiskFull"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "tactician",
        "groupLabels": {"alertname": "DiskFull"},
        "commonLabels": {"alertname": "DiskFull"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.local",
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": "DiskFull", "instance": "db-1"},
                "annotations": {"summary": "disk 95% full"},
                "startsAt": "2026-11-28T04:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-28T04:10:00Z",
                "generatorURL": "http://prometheus.local/graph",
                "fingerprint": fingerprint,
            }
        ],
    }


def test_alertmanager_firing_makes_a_task_and_resolved_cancels_it(world: World) -> None:
    path = "/events/alertmanager/alertmanager"
    fired = world.client.post(path, json=alert("firing"), headers=world.operator)
    assert fired.status_code == 202, fired.text
    (task_id,) = fired.json()["tasks"]
    task = world.app.get(task_id)
    assert task.payload == {"host": "db-1"} and task.due_at is not None
    repeat = world.client.post(path, json=alert("firing"), headers=world.operator)
    assert repeat.json()["tasks"] == [task_id]  # same fingerprint and start: one task
    resolved = world.client.post(path, json=alert("resolved"), headers=world.operator)
    assert resolved.status_code == 202 and resolved.json()["cancelled"] == [task_id]
    assert world.app.get(task_id).state is TaskState.CANCELLED


def test_cloudevents_in_both_content_modes(world: World) -> None:
    event = {
        "specversion": "1.0",
        "id": "inv-1",
        "source": "/billing",
        "type": "com.example.invoice",
        "datacontenttype": "application/json",
        "data": {"number": 42},
    }
    structured = world.client.post(
        "/events/billing/cloudevents",
        content=json.dumps(event).encode(),
        headers={**world.operator, "Content-Type": "application/cloudevents+json"},
    )
    assert structured.status_code == 202, structured.text
    binary_headers = {
        **world.operator,
        "Content-Type": "application/json",
        "ce-specversion": "1.0",
        "ce-id": "inv-2",
        "ce-source": "/billing",
        "ce-type": "com.example.invoice",
    }
    binary = world.client.post(
        "/events/billing/cloudevents", content=b'{"number": 43}', headers=binary_headers
    )
    assert binary.status_code == 202, binary.text
    made = sorted(
        world.app.get(t).payload["invoice"]
        for t in [*structured.json()["tasks"], *binary.json()["tasks"]]
    )
    assert made == [42, 43]


def test_a_signed_source_needs_a_valid_signature_not_a_token(world: World) -> None:
    body = json.dumps({"action": "opened", "number": 5}).encode()
    good = sign(body, "s3cret", int(time.time()))
    accepted = world.client.post(
        "/events/github", content=body, headers={**good, "Content-Type": "application/json"}
    )
    assert accepted.status_code == 202, accepted.text
    (task_id,) = accepted.json()["tasks"]
    submitted = [r for r in world.app.store.audit_records() if r.action == "task.submitted"]
    assert submitted[-1].actor == "source:github" and world.app.get(task_id).payload == {"pr": 5}
    replayed = world.client.post(
        "/events/github", content=body, headers={**good, "Content-Type": "application/json"}
    )
    assert "already used" in refused(replayed, 401)
    forged = sign(body, "wrong", int(time.time()))
    assert "does not match" in refused(
        world.client.post("/events/github", content=body, headers=forged), 401
    )
    stale = sign(body, "s3cret", int(time.time()) - 3600)
    assert "replay window" in refused(
        world.client.post("/events/github", content=body, headers=stale), 401
    )
    assert "missing" in refused(
        world.client.post("/events/github", content=body, headers=world.operator), 401
    )
    assert len(world.app.tasks()) == 1
    assert world.app.store.dead_letters() == []  # refused signatures store nothing


def test_a_thousand_concurrent_events_are_all_kept(world: World) -> None:
    """1,000 events from 16 threads at once: every 202 has its task, nothing else appears."""

    def post(n: int) -> tuple[int, list[str]]:
        response = world.client.post(
            "/events/shop",
            json={"type": "order", "id": n},
            headers={**world.operator, "Idempotency-Key": f"order-{n}"},
        )
        if response.status_code != 202:
            return response.status_code, [response.text[:200]]
        return response.status_code, response.json()["tasks"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(post, range(1000)))
    accepted = [ids[0] for status, ids in answers if status == 202]
    refused_count = sum(1 for status, _ in answers if status != 202)
    problems = {(status, ids[0]) for status, ids in answers if status != 202}
    stored = {t.id: t.payload["order"] for t in world.app.tasks(TaskFilter(limit=10_000))}
    print(f"posted 1000, accepted {len(accepted)}, refused {refused_count}, stored {len(stored)}")
    assert set(accepted) == set(stored) and len(accepted) == len(set(accepted))
    assert sorted(stored.values()) == list(range(1000)) or refused_count > 0
    assert refused_count == 0, problems  # on a healthy server every one is taken
