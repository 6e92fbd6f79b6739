"""Frozen values that every layer shares. Rows become these at the store's edge."""

from __future__ import annotations

import dataclasses
import enum
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from tactician.errors import InvalidInput

JSON = dict[str, Any]


class TaskState(enum.StrEnum):
    PENDING = "pending"  # waiting for release_at or dependencies
    AWAITING_APPROVAL = "awaiting_approval"
    READY = "ready"  # eligible; waits for the planner to give it capacity
    LEASED = "leased"  # the planner reserved capacity; waits for a worker to claim it
    RUNNING = "running"  # a worker holds the lease and runs it
    RETRY_WAIT = "retry_wait"
    SUCCEEDED = "succeeded"
    DEAD = "dead"  # out of attempts, non-retryable error, or a dependency died
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    DEFERRED = "deferred"
    MERGED = "merged"
    HELD = "held"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.DEAD,
        TaskState.CANCELLED,
        TaskState.REJECTED,
        TaskState.MERGED,
        TaskState.EXPIRED,
    }
)
ACTIVE_STATES = frozenset({TaskState.LEASED, TaskState.RUNNING})

ExecutorKind = Literal["python", "http", "shell"]


@dataclass(frozen=True)
class RetryPolicy:
    """How failures are retried: exponential backoff with full jitter."""

    max_attempts: int = 4
    """Attempts in all, the first included. 1 means never retry."""
    initial_delay: float = 1.0
    """Upper bound of the first backoff, in seconds."""
    multiplier: float = 2.0
    max_delay: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidInput("retries must be 0 or more")
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise InvalidInput("backoff delays must be >= 0 and the multiplier >= 1")

    def next_delay(self, attempt: int, *, retryable: bool, rng: random.Random) -> float | None:
        """Seconds to wait before the next attempt, or None when the task is dead.

        `attempt` is the number of the attempt that just failed (1 for the first). Full jitter:
        uniform in [0, min(max_delay, initial_delay * multiplier ** (attempt - 1))].
        """
        if not retryable or attempt >= self.max_attempts:
            return None
        cap = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        return rng.uniform(0.0, cap)


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_PER |= {"h": 3600.0, "hour": 3600.0}


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: `per_second` tokens flow in, at most `burst` are held."""

    per_second: float
    burst: float

    @classmethod
    def parse(cls, text: str, burst: float | None = None) -> RateLimit:
        match = _RATE.match(text)
        if not match or float(match.group(1)) <= 0:
            raise InvalidInput(f"rate {text!r} is not like '10/s', '100/m' or '5/h'")
        per_second = float(match.group(1)) / _PER[match.group(2)]
        return cls(per_second, burst if burst is not None else 1.0)


@dataclass(frozen=True)
class KindSpec:
    """A registered task kind and its defaults."""

    name: str
    executor: ExecutorKind = "python"
    pool: str = "default"
    units: int = 1
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float = 300.0
    concurrency_key: str | None = None
    """A template over the payload, e.g. '{customer}': at most one running task per value."""
    rate: RateLimit | None = None
    url: str | None = None
    """HTTP executor: the payload is POSTed here as JSON; 2xx is success."""
    command: tuple[str, ...] | None = None
    """Shell executor: argv; the payload arrives as JSON on stdin; exit 0 is success."""
    max_concurrency: int | None = None
    """Adaptive concurrency ceiling for this kind's target (None: not adaptive)."""
    breaker_threshold: int = 5
    """Consecutive failures that open the target's circuit breaker (0: no breaker)."""
    breaker_cooldown: float = 30.0
    """Seconds an open breaker waits before letting one probe through."""

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 200:
            raise InvalidInput("a kind needs a name of 1 to 200 characters")
        if self.timeout <= 0:
            raise InvalidInput(f"kind {self.name}: timeout must be > 0")
        if self.units < 1:
            raise InvalidInput(f"kind {self.name}: units must be >= 1")
        if self.executor == "http" and not self.url:
            raise InvalidInput(f"kind {self.name}: an http executor needs a url")
        if self.executor == "shell" and not self.command:
            raise InvalidInput(f"kind {self.name}: a shell executor needs a command")

    @property
    def target(self) -> str:
        """What a circuit breaker and the adaptive limit watch: one per downstream."""
        if self.executor == "http" and self.url:
            scheme, _, rest = self.url.partition("://")
            return f"{scheme}://{rest.split('/', 1)[0]}"
        return f"{self.executor}:{self.name}"

    def concurrency_value(self, payload: Mapping[str, Any]) -> str | None:
        if self.concurrency_key is None:
            return None
        try:
            return f"{self.name}:{self.concurrency_key.format_map(payload)}"
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise InvalidInput(
                f"kind {self.name}: concurrency key {self.concurrency_key!r} "
                f"needs payload field {exc}"
            ) from None


@dataclass(frozen=True)
class NewTask:
    """A task as submitted, before the store gives it an id and a state."""

    kind: str
    payload: JSON = field(default_factory=dict)
    due_at: float | None = None
    release_at: float | None = None
    weight: float = 1.0
    estimate: float | None = None
    idempotency_key: str | None = None
    depends_on: tuple[str, ...] = ()
    tenant: str = "default"
    source: str = "api"
    tags: tuple[str, ...] = ()
    resources: Mapping[str, int] | None = None
    schedule: str | None = None
    trace_context: str | None = None
    """The W3C traceparent the task's run continues (its ingest span's, or the incoming one)."""

    def __post_init__(self) -> None:
        if self.estimate is not None and (self.estimate < 0 or math.isnan(self.estimate)):
            raise InvalidInput(f"estimate must be >= 0, got {self.estimate}")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise InvalidInput(f"weight must be a finite number >= 0, got {self.weight}")
        if (
            self.due_at is not None
            and self.release_at is not None
            and self.due_at < self.release_at
        ):
            raise InvalidInput("due_at is before release_at")
        if not isinstance(self.payload, dict):
            raise InvalidInput("payload must be a JSON object")
        for pool, units in (self.resources or {}).items():
            if not isinstance(units, int) or units < 1:
                raise InvalidInput(f"resources: {pool} needs a whole number of units >= 1")


@dataclass(frozen=True)
class Task:
    id: str
    kind: str
    payload: JSON
    state: TaskState
    created_at: float
    release_at: float
    due_at: float | None
    weight: float
    estimate: float | None
    attempt: int
    tenant: str
    source: str
    idempotency_key: str | None
    pool: str
    units: int
    concurrency_key: str | None
    target: str
    depends_on: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    run_at: float | None = None
    lease_token: int = 0
    lease_expires_at: float | None = None
    worker_id: str | None = None
    last_error: str | None = None
    last_traceback: str | None = None
    cancel_requested: bool = False
    finished_at: float | None = None
    trace_context: str | None = None

    def evolve(self, **changes: Any) -> Task:
        return dataclasses.replace(self, **changes)


class Claim(NamedTuple):
    """A task a worker now holds, with the fencing token its results must carry.

    A tuple, not a Task: claims are the hot path, and the payload stays JSON text until the
    runner process decodes it."""

    task_id: str
    kind: str
    payload: str
    token: int
    attempt: int
    trace_context: str | None = None
    """The traceparent the run span continues (None: a trace of its own, when traced)."""


@dataclass(frozen=True)
class Result:
    """What one attempt came to, reported by a worker."""

    task_id: str
    token: int
    ok: bool
    started_at: float
    duration: float
    error: str | None = None
    traceback: str | None = None
    retryable: bool = True
    overloaded: bool = False
    timed_out: bool = False
    cancelled: bool = False


@dataclass(frozen=True)
class Attempt:
    task_id: str
    attempt: int
    token: int
    worker_id: str
    started_at: float
    finished_at: float
    outcome: str  # succeeded | failed | timeout | lost | cancelled
    error: str | None


@dataclass(frozen=True)
class Pool:
    name: str
    capacity: int | None  # None: unbounded


@dataclass(frozen=True)
class TargetState:
    """A downstream's circuit breaker and adaptive concurrency limit."""

    target: str
    breaker: Literal["closed", "open", "half_open"] = "closed"
    consecutive_failures: int = 0
    opened_at: float | None = None
    limit: float | None = None  # adaptive concurrency limit; None when not adaptive
    latency_floor: float | None = None  # lowest latency seen recently (seconds)
