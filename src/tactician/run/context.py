"""What a handler may ask about the task it is running."""

from __future__ import annotations

from collections.abc import MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskContext:
    task_id: str
    kind: str
    attempt: int
    token: int


_current: ContextVar[TaskContext | None] = ContextVar("tactician_task", default=None)


def current_task() -> TaskContext:
    """The task this handler runs for (only inside a handler)."""
    context = _current.get()
    if context is None:
        raise RuntimeError("current_task() is only available inside a task handler")
    return context


def set_current(context: TaskContext | None) -> None:
    _current.set(context)


def add_task(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A log processor: the running task's id, kind and attempt on every line logged in it."""
    context = _current.get()
    if context is not None:
        event.setdefault("task_id", context.task_id)
        event.setdefault("kind", context.kind)
        event.setdefault("attempt", context.attempt)
    return event
