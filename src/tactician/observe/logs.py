"""Structured logs: every log line, ours and the libraries', as JSON or as readable text.

`configure_logging` puts structlog's formatter on the root logger, so the standard `logging`
calls all over the code gain a UTC timestamp, level, logger, process, the trace and span ids
of the current OpenTelemetry span when there is one, and whatever the extra processors add (the
running task's id, kind and attempt). JSON is for log shippers; console is for a person at a
terminal.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping, Sequence
from typing import Any, Literal

import structlog
from opentelemetry import trace
from structlog.typing import Processor

Format = Literal["json", "console"]


def configure_logging(
    level: str = "INFO", fmt: Format = "console", extra: Sequence[Processor] = ()
) -> None:
    """Route every `logging` record through structlog's formatter, on stderr."""
    shared: list[Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _process_name,
        add_trace,
        *extra,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _process_name(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    import multiprocessing

    event.setdefault("process", multiprocessing.current_process().name)
    return event


def add_trace(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The current span's trace and span ids (hex, as trace backends show them), so a log line
    leads to its trace: inside a handler, that of the task's run span."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event
