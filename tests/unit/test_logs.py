"""Structured logs: every `logging` call becomes one JSON object (or one readable line) with
time, level, logger, process, the running task's id, kind and attempt, and the current span's
trace and span ids."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from tactician.observe.logs import configure_logging
from tactician.run.context import TaskContext, add_task, set_current


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    set_current(None)


def test_json_lines_carry_the_task(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json", [add_task])
    log = logging.getLogger("tactician.worker")
    log.info("started %d runners", 2)
    set_current(TaskContext("t-1", "deliver", 3, 7))
    log.warning("attempt failed: %s", "timeout")
    log.debug("not shown at INFO")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["event"] for line in lines] == ["started 2 runners", "attempt failed: timeout"]
    first, second = lines
    assert first["level"] == "info" and first["logger"] == "tactician.worker"
    assert "task_id" not in first and first["timestamp"].endswith("Z")
    assert (second["task_id"], second["kind"], second["attempt"]) == ("t-1", "deliver", 3)
    assert second["level"] == "warning" and second["process"]


def test_console_lines_are_readable(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "console", [add_task])
    set_current(TaskContext("t-2", "notify", 1, 1))
    logging.getLogger("tactician.planner").error("lease lost")
    (line,) = capsys.readouterr().err.splitlines()
    assert "lease lost" in line and "error" in line and "task_id=t-2" in line


def test_lines_inside_a_span_carry_its_trace(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json", [add_task])
    tracer = TracerProvider().get_tracer("tests")
    log = logging.getLogger("tactician.worker")
    with tracer.start_as_current_span("run deliver") as span:
        set_current(TaskContext("t-3", "deliver", 2, 5))
        log.info("inside")
    set_current(None)
    log.info("outside")
    inside, outside = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert inside["task_id"] == "t-3"
    assert "trace_id" not in outside and "span_id" not in outside
