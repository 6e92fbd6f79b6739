"""OpenTelemetry traces from an incoming event to the handler's own span, on both databases.

A CloudEvent carrying a W3C `traceparent` is posted to the real API (served by uvicorn in a
thread of this process, so that the in-memory exporter sees its spans); the planner ticks and a
real worker runs the task in a forked runner process, whose spans travel back to the worker and
reach the same exporter. The handler opens a span of its own and logs a line inside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tactician.app import Tactician
from tactician.domain import TaskState
from tactician.errors import InvalidInput
from tactician.govern.roles import Actor, Role
from tactician.observe import traces
from tactician.observe.logs import configure_logging
from tactician.run.context import add_task
from tactician.settings import Settings
from tests.e2e.procs import TACTICIAN, Proc
from tests.e2e.serving import free_port, serving
from tests.integration.driving import final, run_until

pytestmark = pytest.mark.timeout(60)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
REMOTE_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{REMOTE_SPAN}-01"
ROOT = Actor("root", Role.ADMIN)
BUNDLE = """name: traced
templates:
  - name: invoice
    source: billing
    match: {type: com.example.invoice}
    task: {kind: traced, payload: {note: "{data.number}"}}
  - name: order
    source: shop
    match: {type: order}
    task: {kind: traced, payload: {note: "{id}"}}
"""


# --- the handler (module level: it runs in a forked runner process) -------------------------


def traced(note: str) -> None:
    """Opens a span of its own and logs inside it, as instrumented user code would."""
    with trace.get_tracer("tests.handler").start_as_current_span("handler work"):
        logging.getLogger("tests.handler").warning("handling %s", note)


def failing(note: str) -> None:
    raise ValueError(f"cannot handle {note}")


def stalls(seconds: float) -> None:
    time.sleep(seconds)


served = Tactician()
"""The app `tactician serve` runs in the multi-process test (its settings come from there)."""
served.task(traced)


# --- fixtures ---------------------------------------------------------------------------------


@dataclass
class World:
    app: Tactician
    client: httpx.Client
    operator: dict[str, str]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, into memory."""
    spans = InMemorySpanExporter()
    traces.enable(SimpleSpanProcessor(spans))
    yield spans
    traces.disable()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def make_world(url: str) -> Iterator[World]:
    settings = Settings(db=url, lease_seconds=5.0, poll_interval=0.01)
    app = Tactician(settings=settings)
    app.task(traced)
    app.task(failing, retries=0)
    app.task(stalls, retries=0, timeout=0.5)
    app.gate.deploy(ROOT, BUNDLE, "traced.yaml")
    token = app.gate.create_token(ROOT, "ops", Role.OPERATOR)
    with serving(settings) as client:
        yield World(app, client, {"Authorization": f"Bearer {token}"})
    app.close()


@pytest.fixture
def world(db_url: str) -> Iterator[World]:
    yield from make_world(db_url)


@pytest.fixture
def sqlite_world(sqlite_url: str) -> Iterator[World]:
    yield from make_world(sqlite_url)


def structured(
    traceparent: str | None, number: int = 7, **extra: str
) -> tuple[bytes, dict[str, str]]:
    event = {
        "specversion": "1.0",
        "id": f"inv-{number}",
        "source": "/billing",
        "type": "com.example.invoice",
        "data": {"number": number},
        **extra,
    }
    if traceparent is not None:
        event["traceparent"] = traceparent
    return json.dumps(event).encode(), {"Content-Type": "application/cloudevents+json"}


def post_event(world: World, body: bytes, headers: dict[str, str]) -> str:
    response = world.client.post(
        "/events/billing/cloudevents", content=body, headers={**world.operator, **headers}
    )
    assert response.status_code == 202, response.text
    (task_id,) = response.json()["tasks"]
    return str(task_id)


def run_to_the_end(world: World, task_id: str) -> None:
    assert run_until(world.app, final(world.app, task_id), timeout=20)


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def chain(spans: tuple[ReadableSpan, ...], start: ReadableSpan) -> list[str]:
    """Span names from `start` up through its parents, ending with the remote parent's id."""
    ids = {s.context.span_id: s for s in spans if s.context is not None}
    names = [start.name]
    span = start
    while span.parent is not None:
        parent = ids.get(span.parent.span_id)
        if parent is None:
            assert span.parent.is_remote
            names.append(f"remote:{hex_id(span.parent.span_id, 16)}")
            break
        names.append(parent.name)
        span = parent
    return names


# --- the trace, end to end --------------------------------------------------------------------


def test_a_cloudevent_traceparent_reaches_the_handler_span(
    world: World,
    exporter: InMemorySpanExporter,
    restore_logging: None,
    capfd: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", "json", [add_task])
    task_id = post_event(world, *structured(TRACEPARENT, tracestate="vendor=abc"))
    run_to_the_end(world, task_id)
    assert world.app.get(task_id).state is TaskState.SUCCEEDED
    spans = exporter.get_finished_spans()

    (handler,) = by_name(spans, "handler work")
    assert handler.context is not None and hex_id(handler.context.trace_id, 32) == TRACE_ID
    assert chain(spans, handler) == [
        "handler work",
        "run traced",
        "ingest",
        f"remote:{REMOTE_SPAN}",
    ]

    (ingest,) = by_name(spans, "ingest")
    assert ingest.kind is SpanKind.SERVER and ingest.context is not None
    assert ingest.attributes is not None and ingest.attributes["tactician.format"] == "cloudevents"
    assert ingest.context.trace_state.get("vendor") == "abc"  # tracestate carried along
    ingest_traceparent = f"00-{TRACE_ID}-{hex_id(ingest.context.span_id, 16)}-01"
    assert world.app.get(task_id).trace_context == ingest_traceparent  # stored with the task

    (gate,) = by_name(spans, "gate")
    assert gate.parent is not None and gate.parent.span_id == ingest.context.span_id

    (run,) = by_name(spans, "run traced")
    assert run.kind is SpanKind.CONSUMER and run.status.status_code is StatusCode.UNSET
    assert run.attributes is not None
    assert dict(run.attributes) == {
        "tactician.task_id": task_id,
        "tactician.kind": "traced",
        "tactician.attempt": 1,
        "tactician.outcome": "succeeded",
    }

    plans = [
        p
        for p in by_name(spans, "plan")
        if any(
            link.attributes and link.attributes.get("tactician.task_id") == task_id
            for link in p.links
        )
    ]
    (plan,) = plans
    (link,) = plan.links
    assert (link.context.trace_id, link.context.span_id) == (
        ingest.context.trace_id,
        ingest.context.span_id,
    )
    assert plan.parent is None and plan.context is not None
    assert plan.context.trace_id != ingest.context.trace_id  # a pass has a trace of its own
    decides = [d for d in by_name(spans, "decide") if d.parent is not None]
    assert any(d.parent.span_id == plan.context.span_id for d in decides if d.parent)

    lines = [json.loads(x) for x in capfd.readouterr().err.splitlines() if x.startswith("{")]
    (line,) = [x for x in lines if x.get("event") == "handling 7"]
    assert line["trace_id"] == TRACE_ID
    assert line["span_id"] == hex_id(handler.context.span_id, 16)
    assert (line["task_id"], line["kind"], line["attempt"]) == (task_id, "traced", 1)


def test_binary_mode_carries_ce_traceparent(world: World, exporter: InMemorySpanExporter) -> None:
    headers = {
        "Content-Type": "application/json",
        "ce-specversion": "1.0",
        "ce-id": "inv-8",
        "ce-source": "/billing",
        "ce-type": "com.example.invoice",
        "ce-traceparent": TRACEPARENT,
    }
    task_id = post_event(world, b'{"number": 8}', headers)
    run_to_the_end(world, task_id)
    spans = exporter.get_finished_spans()
    (handler,) = by_name(spans, "handler work")
    assert chain(spans, handler) == [
        "handler work",
        "run traced",
        "ingest",
        f"remote:{REMOTE_SPAN}",
    ]


def test_a_failed_attempt_is_an_error_span(
    sqlite_world: World, exporter: InMemorySpanExporter
) -> None:
    task_id = sqlite_world.app.submit("failing", {"note": "x"})
    run_to_the_end(sqlite_world, task_id)
    assert sqlite_world.app.get(task_id).state is TaskState.DEAD
    (run,) = by_name(exporter.get_finished_spans(), "run failing")
    assert run.parent is None  # submitted outside any trace: a trace of its own
    assert run.status.status_code is StatusCode.ERROR
    assert run.status.description == "ValueError: cannot handle x"
    assert run.attributes is not None and run.attributes["tactician.outcome"] == "failed"
    (event,) = run.events
    assert event.name == "exception" and event.attributes is not None
    assert "cannot handle x" in str(event.attributes["exception.stacktrace"])


def test_a_killed_runner_has_its_run_span_recorded_by_the_worker(
    sqlite_world: World, exporter: InMemorySpanExporter
) -> None:
    world = sqlite_world
    response = world.client.post(
        "/tasks",
        json={"kind": "stalls", "payload": {"seconds": 30}},
        headers={**world.operator, "traceparent": TRACEPARENT},
    )
    assert response.status_code == 201, response.text
    task_id = response.json()["id"]
    run_to_the_end(world, task_id)
    assert world.app.get(task_id).state is TaskState.DEAD
    spans = exporter.get_finished_spans()
    (run,) = by_name(spans, "run stalls")
    assert chain(spans, run) == ["run stalls", "ingest", f"remote:{REMOTE_SPAN}"]
    assert run.attributes is not None and run.attributes["tactician.outcome"] == "timeout"
    assert run.status.status_code is StatusCode.ERROR
    assert run.start_time is not None and run.end_time is not None
    assert 0.4e9 <= run.end_time - run.start_time <= 10e9  # it ran until the timeout killed it


def test_the_http_traceparent_header_parents_json_events_and_api_tasks(
    sqlite_world: World, exporter: InMemorySpanExporter
) -> None:
    world = sqlite_world
    headers = {**world.operator, "traceparent": TRACEPARENT}
    event = world.client.post("/events/shop", json={"type": "order", "id": 3}, headers=headers)
    assert event.status_code == 202, event.text
    posted = world.client.post("/tasks", json={"kind": "traced"}, headers=headers)
    assert posted.status_code == 201, posted.text
    ingests = by_name(exporter.get_finished_spans(), "ingest")
    assert [s.attributes["tactician.source"] for s in ingests if s.attributes] == ["shop", "api"]
    for span, task_id in zip(ingests, [event.json()["tasks"][0], posted.json()["id"]], strict=True):
        assert span.parent is not None and hex_id(span.parent.span_id, 16) == REMOTE_SPAN
        assert span.context is not None and hex_id(span.context.trace_id, 32) == TRACE_ID
        stored = world.app.get(task_id).trace_context
        assert stored == f"00-{TRACE_ID}-{hex_id(span.context.span_id, 16)}-01"


def test_a_malformed_traceparent_starts_a_new_trace_and_never_refuses(
    sqlite_world: World, exporter: InMemorySpanExporter
) -> None:
    bad = "00-not-a-trace-01"
    task_id = post_event(sqlite_world, *structured(bad))
    posted = sqlite_world.client.post(
        "/tasks", json={"kind": "traced"}, headers={**sqlite_world.operator, "traceparent": bad}
    )
    assert posted.status_code == 201, posted.text
    for span in by_name(exporter.get_finished_spans(), "ingest"):
        assert span.parent is None  # a trace of its own
        assert span.context is not None and hex_id(span.context.trace_id, 32) != TRACE_ID
    stored = sqlite_world.app.get(task_id).trace_context
    assert stored is not None and traces.valid_traceparent(stored) == stored
    assert sqlite_world.app.store.dead_letters() == []


# --- tracing off ------------------------------------------------------------------------------


def test_off_makes_no_span_but_keeps_the_incoming_context(world: World) -> None:
    """A processor listens on the provider, but with tracing off none of our code makes a span
    (FastAPI's own telemetry may, once an earlier test made our provider the global one); the
    task still stores the incoming traceparent, for a traced worker to continue."""
    assert not traces.enabled()
    listening = InMemorySpanExporter()
    traces._router.targets = (SimpleSpanProcessor(listening),)  # as if enabled, but off
    try:
        task_id = post_event(world, *structured(TRACEPARENT))
        malformed = post_event(world, *structured("00-zz-zz-01", number=9))
        run_to_the_end(world, task_id)
        run_to_the_end(world, malformed)
    finally:
        traces._router.targets = ()
    assert world.app.get(task_id).state is TaskState.SUCCEEDED
    assert world.app.get(task_id).trace_context == TRACEPARENT
    assert world.app.get(malformed).trace_context is None
    ours = [
        s.name
        for s in listening.get_finished_spans()
        if s.instrumentation_scope.name == "tactician"
    ]
    assert ours == []


# --- configuration ----------------------------------------------------------------------------


def test_a_bad_mode_is_one_line() -> None:
    with pytest.raises(InvalidInput, match="TACTICIAN_TRACES must be off, console or otlp"):
        traces.configure(Settings(traces="jaeger"))
    traces.configure(Settings())  # off: nothing happens
    assert not traces.enabled()


def test_console_exporter(capsys: pytest.CaptureFixture[str]) -> None:
    traces.configure(Settings(traces="console"))
    try:
        assert traces.enabled()
        with traces.span("gate"):
            pass
        traces.flush()
    finally:
        traces.disable()
    assert '"name": "gate"' in capsys.readouterr().out


class Collector(BaseHTTPRequestHandler):
    """A stand-in OpenTelemetry collector: keeps each OTLP/HTTP request it is sent."""

    received: list[ExportTraceServiceRequest] = []  # noqa: RUF012 (one server per test)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        assert self.path == "/v1/traces"
        assert self.headers["Content-Type"] == "application/x-protobuf"
        Collector.received.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@contextlib.contextmanager
def collector() -> Iterator[str]:
    """A stand-in collector on a free port; yields its traces URL."""
    Collector.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    finally:
        server.shutdown()
        server.server_close()


def collected() -> list[tuple[str, str, str, str]]:
    """(name, trace id, span id, parent span id) of every span the collector was sent."""
    return [
        (span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex())
        for request in list(Collector.received)
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]


def test_otlp_exporter_sends_to_the_endpoint() -> None:
    with collector() as endpoint:
        try:
            traces.configure(Settings(traces="otlp", otlp_endpoint=endpoint))
            attributes = {"tactician.source": "t"}
            with traces.ingest_span({"traceparent": TRACEPARENT}, attributes) as made:
                assert made is not None and made.startswith(f"00-{TRACE_ID}-")
            traces.flush()
        finally:
            traces.disable()
    ((name, trace_id, _, parent),) = collected()
    assert (name, trace_id, parent) == ("ingest", TRACE_ID, REMOTE_SPAN)


@pytest.mark.slow
def test_tactician_serve_exports_from_every_process(sqlite_url: str, tmp_path: Path) -> None:
    """`tactician serve` with TACTICIAN_TRACES=otlp: the API and planner in one process, a
    forked worker with its runner; each process that exports has its own exporter, and the
    collector gets one trace from the event to the handler's span."""
    app = Tactician(settings=Settings(db=sqlite_url))
    app.task(traced)
    app.gate.deploy(ROOT, BUNDLE, "traced.yaml")
    token = app.gate.create_token(ROOT, "ops", Role.OPERATOR)
    port = free_port()
    with collector() as endpoint:
        env = {
            **os.environ,
            "TACTICIAN_TRACES": "otlp",
            "TACTICIAN_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds: export soon, not after 5 s
        }
        argv = [TACTICIAN, "serve", "--app", f"{__name__}:served", "--db", sqlite_url]
        argv += ["--workers", "1", "--port", str(port)]
        serve = Proc("serve", argv, env, tmp_path).start()
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=10) as client:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if client.get("/healthz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, serve.log.read_text()[-2000:]
                    time.sleep(0.1)
                body, headers = structured(TRACEPARENT)
                response = client.post(
                    "/events/billing/cloudevents",
                    content=body,
                    headers={**headers, "Authorization": f"Bearer {token}"},
                )
                assert response.status_code == 202, response.text
                (task_id,) = response.json()["tasks"]
            wanted = {"ingest", "run traced", "handler work", "plan"}
            deadline = time.monotonic() + 30
            while not wanted <= {name for name, *_ in collected()}:
                assert time.monotonic() < deadline, (collected(), serve.log.read_text()[-2000:])
                time.sleep(0.1)
            assert app.get(task_id).state is TaskState.SUCCEEDED
        finally:
            serve.stop()
            app.close()
    spans = {name: (trace_id, span_id, parent) for name, trace_id, span_id, parent in collected()}
    assert spans["ingest"] == (TRACE_ID, spans["ingest"][1], REMOTE_SPAN)
    assert spans["run traced"] == (TRACE_ID, spans["run traced"][1], spans["ingest"][1])
    assert spans["handler work"] == (TRACE_ID, spans["handler work"][1], spans["run traced"][1])
