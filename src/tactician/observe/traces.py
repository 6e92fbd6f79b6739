"""OpenTelemetry traces: one trace from an incoming event to the handler that runs its task.

The spans:

- `ingest` (server): an HTTP event, a CloudEvent or `POST /tasks`. Its parent is the request's
  W3C `traceparent` header, or a CloudEvent's own distributed-tracing attribute (structured, or
  `ce-traceparent` in binary mode). A malformed one is ignored: the span starts a new trace.
- `gate`: the submit's authorisation and approval rules.
- `plan`: a planner pass that started tasks, a new trace with links to the started tasks' own
  traces (one pass serves many traces); its child `decide` is the ranking.
- `run <kind>` (consumer): one attempt, a child of the context stored with the task, with the
  task id, kind, attempt and outcome, and an error status on failure. It is the current span
  while the handler runs, so the handler's own spans (and log lines) belong to it.

Off by default (`TACTICIAN_TRACES=off|console|otlp`). Off, nothing here makes a span or parses
a context: hot paths test `enabled()` first. The tracer provider is made once per process, with
one span processor of ours that forwards to this process's exporters; a forked child that
configures (`tactician serve`'s workers) makes exporters of its own, since an exporter's
connections must not be shared across a fork. Runner processes export nothing themselves: their
finished spans travel back to their worker with the results (`SpanBatch`), and the worker exports
them. A runner killed mid-attempt (timeout, cancel) loses its unsent spans; the worker then
records the attempt's `run` span itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tactician.domain import NewTask
from tactician.errors import InvalidInput
from tactician.settings import Settings
from tactician.store.protocol import (
    ExpectedRuns,
    Planner,
    PlanReport,
    Provenance,
    Ranker,
    Store,
)

MODES = ("off", "console", "otlp")
SCOPE = "tactician"
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_PROPAGATOR = TraceContextTextMapPropagator()
_NOTHING: AbstractContextManager[None] = contextlib.nullcontext()


class SpanRecord(NamedTuple):
    """A finished span as plain values: what crosses the pipe from a runner to its worker."""

    name: str
    trace_id: int
    span_id: int
    flags: int
    trace_state: tuple[tuple[str, str], ...]
    parent: tuple[int, int, bool, int] | None  # trace id, span id, remote, flags
    kind: int
    start: int | None
    end: int | None
    attributes: dict[str, Any]
    events: tuple[tuple[str, dict[str, Any], int], ...]
    links: tuple[tuple[int, int, int, dict[str, Any]], ...]
    status: tuple[int, str | None]
    scope: tuple[str, str | None]


class SpanBatch(NamedTuple):
    """A runner's finished spans, sent to its worker before the results they belong to."""

    records: list[SpanRecord]


class _Router(SpanProcessor):
    """The provider's one processor: it forwards to this process's targets, which are swapped
    whole (never mutated), so a fork or a test can change them under a live provider."""

    def __init__(self) -> None:
        self.targets: tuple[SpanProcessor, ...] = ()

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        for target in self.targets:
            target.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        for target in self.targets:
            target.on_end(span)

    def shutdown(self) -> None:
        for target in self.targets:
            target.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all([target.force_flush(timeout_millis) for target in self.targets])


class _Collector(SpanProcessor):
    """In a runner: keeps finished spans until they are sent to the worker."""

    def __init__(self) -> None:
        self.records: list[SpanRecord] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.records.append(_record(span))


_on = False
_pid = 0
_mode = ""  # what enabled tracing here: "console:", "otlp:<endpoint>", or "custom"
_provider: TracerProvider | None = None
_router = _Router()
_collector: _Collector | None = None


def enabled() -> bool:
    """True when this process traces (the one check hot paths pay when it does not)."""
    return _on


def _tracer() -> trace.Tracer:
    assert _provider is not None
    return _provider.get_tracer(SCOPE)


def enable(*processors: SpanProcessor, mode: str = "custom") -> None:
    """Trace in this process, sending finished spans to `processors` (e.g. a batch processor
    over an exporter; tests pass an in-memory one). Our provider becomes the global one unless
    the process set its own, so the handlers' spans join the same traces."""
    global _on, _pid, _mode, _provider
    if _provider is None:
        _provider = TracerProvider(resource=Resource.create({"service.name": SCOPE}))
        _provider.add_span_processor(_router)
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            trace.set_tracer_provider(_provider)
    _router.targets = tuple(processors)
    _on, _pid, _mode = True, os.getpid(), mode


def disable() -> None:
    """Stop tracing in this process; the processors export what they hold and shut down."""
    global _on
    if _on:
        _router.shutdown()
    _router.targets = ()
    _on = False


def flush() -> None:
    """Export what waits in the batch processors (a process about to end calls this)."""
    if _on:
        _router.force_flush()


def configure(settings: Settings) -> None:
    """Tracing as `settings.traces` says, once per process. Off leaves things as they are (a
    test or an embedding program may have enabled tracing with its own exporter)."""
    mode = settings.traces.strip().lower()
    if mode not in MODES:
        raise InvalidInput(
            f"TACTICIAN_TRACES must be off, console or otlp, not {settings.traces!r}"
        )
    if mode == "off":
        return
    key = f"{mode}:{settings.otlp_endpoint if mode == 'otlp' else ''}"
    if _on and _pid == os.getpid() and _mode == key:
        return
    enable(BatchSpanProcessor(_exporter(mode, settings.otlp_endpoint)), mode=key)


def _exporter(mode: str, endpoint: str) -> SpanExporter:
    if mode == "console":
        return ConsoleSpanExporter(out=sys.stdout)  # stdout as it is now, not at import
    # Imported here: it brings protobuf and requests, which a process that does not export
    # to a collector has no use for.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint or None)


# --- contexts ------------------------------------------------------------------------------


def valid_traceparent(value: object) -> str | None:
    """`value` if it is a well-formed W3C traceparent, else None: a malformed one is ignored."""
    if not isinstance(value, str) or len(value) != 55:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None or match[1] == "ff" or not int(match[2], 16) or not int(match[3], 16):
        return None
    return value


def carrier(headers: Mapping[str, str]) -> dict[str, str]:
    """The W3C trace context headers of a request (`headers` with lower-case names)."""
    return {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}


def current_traceparent() -> str | None:
    """The traceparent of the current span (None when off or outside any span)."""
    if not _on:
        return None
    out: dict[str, str] = {}
    _PROPAGATOR.inject(out)
    return out.get("traceparent")


def _span_context(traceparent: str | None) -> SpanContext | None:
    if not traceparent:
        return None
    context = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent}))
    span_context = context.get_span_context()
    return span_context if span_context.is_valid else None


def continued(tasks: Sequence[NewTask]) -> Sequence[NewTask]:
    """Tasks submitted inside a traced span (a handler's follow-up work, a traced caller of the
    Python API) continue that trace, unless they carry a context of their own."""
    here = current_traceparent()
    if here is None or all(t.trace_context for t in tasks):
        return tasks
    return [t if t.trace_context else replace(t, trace_context=here) for t in tasks]


# --- spans ---------------------------------------------------------------------------------


@contextlib.contextmanager
def ingest_span(incoming: Mapping[str, str], attributes: Mapping[str, Any]) -> Iterator[str | None]:
    """The `ingest` server span, a child of the incoming trace context; yields the traceparent
    the tasks it makes continue. Off: no span, and the incoming traceparent if well formed."""
    if not _on:
        yield valid_traceparent(incoming.get("traceparent"))
        return
    with _tracer().start_as_current_span(
        "ingest", _PROPAGATOR.extract(incoming), SpanKind.SERVER, dict(attributes)
    ):
        yield current_traceparent()


def span(name: str, attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Any]:
    """An internal span around a step (the gate's work), or nothing when off."""
    if not _on:
        return _NOTHING
    return _tracer().start_as_current_span(name, attributes=dict(attributes or {}))


def annotate(**attributes: Any) -> None:
    """Attributes on the current span, when there is one."""
    if _on:
        trace.get_current_span().set_attributes(
            {f"tactician.{k}": v for k, v in attributes.items()}
        )


@contextlib.contextmanager
def run_span(task_id: str, kind: str, attempt: int, trace_context: str | None) -> Iterator[Span]:
    """The `run <kind>` span of one attempt, current while the handler runs; its parent is the
    context stored with the task (none: a trace of its own)."""
    parent = (
        Context() if trace_context is None else _PROPAGATOR.extract({"traceparent": trace_context})
    )
    with _tracer().start_as_current_span(
        f"run {kind}",
        parent,
        SpanKind.CONSUMER,
        {"tactician.task_id": task_id, "tactician.kind": kind, "tactician.attempt": attempt},
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        yield current


def end_run(current: Span, *, ok: bool, error: str | None, stack: str | None) -> None:
    """The attempt's outcome on its run span; a failure is an error status with the message."""
    if ok:
        current.set_attribute("tactician.outcome", "succeeded")
        return
    current.set_attribute("tactician.outcome", "failed")
    _fail(current, error, stack)


def _fail(current: Span, error: str | None, stack: str | None) -> None:
    message = error or "failed"
    attributes = {"exception.type": message.split(":", 1)[0], "exception.message": message}
    if stack:
        attributes["exception.stacktrace"] = stack
    current.add_event("exception", attributes)
    current.set_status(Status(StatusCode.ERROR, message))


def lost_run(
    task_id: str,
    kind: str,
    attempt: int,
    trace_context: str | None,
    *,
    started_at: float,
    duration: float,
    outcome: str,
    error: str,
) -> None:
    """The run span of an attempt whose runner was killed (timeout, cancel, crash): recorded
    by the worker, since the runner's own spans died with it."""
    parent = (
        Context() if trace_context is None else _PROPAGATOR.extract({"traceparent": trace_context})
    )
    current = _tracer().start_span(
        f"run {kind}",
        parent,
        SpanKind.CONSUMER,
        {
            "tactician.task_id": task_id,
            "tactician.kind": kind,
            "tactician.attempt": attempt,
            "tactician.outcome": outcome,
        },
        start_time=int(started_at * 1e9),
    )
    _fail(current, error, None)
    current.end(end_time=int((started_at + duration) * 1e9))


class _TimedRanker:
    """A ranker whose calls are timed: each becomes a `decide` span of the pass."""

    def __init__(self, ranker: Ranker) -> None:
        self.ranker = ranker
        self.calls: list[tuple[int, int]] = []

    def __call__(self, *args: Any) -> Sequence[float]:
        start = time.time_ns()
        try:
            return self.ranker(*args)
        finally:
            self.calls.append((start, time.time_ns()))


def traced_plan(
    store: Store,
    planner: Planner,
    kinds: Mapping[str, Any],
    ranker: Ranker | None,
    provenance: Provenance | None,
    expected: ExpectedRuns | None = None,
) -> PlanReport:
    """`store.plan`, and when it started tasks a `plan` span linked to their traces, with the
    ranking as its `decide` child. The spans are made after the pass, with its times, so a pass
    that starts nothing leaves none."""
    timed = None if ranker is None else _TimedRanker(ranker)
    start = time.time_ns()
    report = store.plan(planner, kinds, timed, provenance, expected)
    end = time.time_ns()
    if not report.started_ids:
        return report
    contexts = store.trace_contexts(report.started_ids)
    links = []
    for task_id in report.started_ids:
        linked = _span_context(contexts.get(task_id))
        if linked is not None:
            links.append(Link(linked, {"tactician.task_id": task_id}))
    tracer = _tracer()
    attributes = {"tactician.started": report.started, "tactician.considered": report.considered}
    plan = tracer.start_span(
        "plan", Context(), links=links, attributes=attributes, start_time=start
    )
    inside = trace.set_span_in_context(plan)
    for began, ended in timed.calls if timed is not None else ():
        tracer.start_span("decide", inside, start_time=began).end(end_time=ended)
    plan.end(end_time=end)
    return report


# --- runner processes ------------------------------------------------------------------------


def in_runner() -> None:
    """In a forked runner: finished spans wait in memory for `take_spans`, to go to the worker
    (the exporters inherited from the worker are not used here)."""
    global _collector
    _collector = _Collector()
    _router.targets = (_collector,)


def take_spans() -> SpanBatch | None:
    """The spans finished since the last call, if any (in a runner)."""
    if _collector is None or not _collector.records:
        return None
    records, _collector.records = _collector.records, []
    return SpanBatch(records)


def emit(batch: SpanBatch) -> None:
    """Export a runner's spans from its worker, as if they had ended here."""
    if not _on or _provider is None:
        return
    resource = _provider.resource
    for record in batch.records:
        _router.on_end(_readable(record, resource))


def _record(span: ReadableSpan) -> SpanRecord:
    context = span.get_span_context()
    assert context is not None
    parent = span.parent
    scope = span.instrumentation_scope
    return SpanRecord(
        span.name,
        context.trace_id,
        context.span_id,
        int(context.trace_flags),
        tuple(context.trace_state.items()),
        None
        if parent is None
        else (parent.trace_id, parent.span_id, parent.is_remote, int(parent.trace_flags)),
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        tuple((e.name, dict(e.attributes or {}), e.timestamp) for e in span.events),
        tuple(
            (
                link.context.trace_id,
                link.context.span_id,
                int(link.context.trace_flags),
                dict(link.attributes or {}),
            )
            for link in span.links
        ),
        (span.status.status_code.value, span.status.description),
        (scope.name, scope.version) if scope is not None else (SCOPE, None),
    )


def _readable(record: SpanRecord, resource: Resource) -> ReadableSpan:
    parent = record.parent
    code = StatusCode(record.status[0])
    return ReadableSpan(
        name=record.name,
        context=SpanContext(
            record.trace_id,
            record.span_id,
            is_remote=False,
            trace_flags=TraceFlags(record.flags),
            trace_state=TraceState(list(record.trace_state)),
        ),
        parent=None
        if parent is None
        else SpanContext(
            parent[0], parent[1], is_remote=parent[2], trace_flags=TraceFlags(parent[3])
        ),
        resource=resource,
        attributes=record.attributes,
        events=tuple(
            Event(name, attributes, timestamp) for name, attributes, timestamp in record.events
        ),
        links=tuple(
            Link(
                SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags)), attrs
            )
            for trace_id, span_id, flags, attrs in record.links
        ),
        kind=SpanKind(record.kind),
        # A description belongs to an error status only (the SDK warns otherwise).
        status=Status(code, record.status[1] if code is StatusCode.ERROR else None),
        start_time=record.start,
        end_time=record.end,
        instrumentation_scope=InstrumentationScope(*record.scope),
    )


__all__ = [
    "SpanBatch",
    "annotate",
    "carrier",
    "configure",
    "continued",
    "current_traceparent",
    "disable",
    "emit",
    "enable",
    "enabled",
    "end_run",
    "flush",
    "in_runner",
    "ingest_span",
    "lost_run",
    "run_span",
    "span",
    "take_spans",
    "traced_plan",
    "valid_traceparent",
]
