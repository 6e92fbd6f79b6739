"""Tactician: an AI-driven task scheduler that runs work durably and keeps humans in charge.

from tactician import Tactician

app = Tactician(db="sqlite:///tactician.db")

@app.task(pool="drivers", retries=5, timeout=30, concurrency_key="{customer}", rate="10/s")
def deliver(order_id: str, customer: str) -> None: ...

task_id = app.submit("deliver", {"order_id": "A1", "customer": "c7"}, idempotency_key="A1")
"""

from tactician.app import Tactician
from tactician.domain import KindSpec, NewTask, RetryPolicy, Task, TaskState
from tactician.errors import (
    Conflict,
    HandlerError,
    InvalidInput,
    LeaseLost,
    NotFound,
    StoreUnavailable,
    TacticianError,
    TargetOverloaded,
    UnknownKind,
)
from tactician.run.context import TaskContext, current_task
from tactician.run.worker import WorkerOptions
from tactician.settings import Settings

__all__ = [
    "Conflict",
    "HandlerError",
    "InvalidInput",
    "KindSpec",
    "LeaseLost",
    "NewTask",
    "NotFound",
    "RetryPolicy",
    "Settings",
    "StoreUnavailable",
    "Tactician",
    "TacticianError",
    "TargetOverloaded",
    "Task",
    "TaskContext",
    "TaskState",
    "UnknownKind",
    "WorkerOptions",
    "current_task",
]
