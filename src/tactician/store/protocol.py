"""The storage port: what the services above need from a database, and nothing more.

Every method is one transaction. Times that matter for correctness (leases, retry times) come
from the database's clock, so workers with skewed clocks cannot extend or steal a lease.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from tactician.domain import Attempt, Claim, KindSpec, NewTask, Pool, Result, TargetState, Task
from tactician.govern.audit import AuditRecord, Entry
from tactician.govern.records import (
    ApprovalRow,
    DecisionRow,
    Deployment,
    Fallback,
    NewApproval,
    OutcomeOfTask,
    Override,
    TokenRow,
)
from tactician.govern.roles import Actor, Role
from tactician.plan.capacity import Candidate, CapacityView, Plan
from tactician.settings import Settings

Planner = Callable[[list[Candidate], CapacityView, float, int], Plan]


class ReadyRow(NamedTuple):
    """A waiting task as a scorer needs it (a tuple: thousands are read per planning pass)."""

    id: str
    kind: str
    pool: str
    units: int
    concurrency_key: str | None
    target: str
    due_sort: float
    created_at: float
    release_at: float
    due_at: float | None
    weight: float
    estimate: float | None
    tenant: str
    attempt: int
    state: str
    payload: str
    """The task's payload as JSON text: its top-level scalars are the task's features."""
    dependents: float = 0.0
    """The weight of the unfinished tasks that depend on this one."""
    tags: str = "[]"
    """The task's tags as a JSON list."""


Ranker = Callable[[Sequence[ReadyRow], CapacityView, float], Sequence[float]]
"""Ranks a planning pass's ready tasks (lower starts first): the decision service's scorer."""


ExpectedRuns = Callable[[Sequence[ReadyRow]], Sequence[float]]
"""Each ranked task's expected run in seconds (in the order given): with it, a planning pass
makes EASY reservations (plan.capacity) and keeps each grant's expected run."""
Provenance = Callable[[Sequence[str]], Mapping[str, Any]]
"""Given the tasks a pass started, what decided them (policy, model, scorer, experiment arm):
kept in the audit record of the pass."""


@dataclass(frozen=True)
class Finish:
    """A worker's result, with the retry decision it took from the kind's policy."""

    result: Result
    kind: str
    attempt: int
    retry_delay: float | None
    """Seconds until the next attempt; None when the task is dead (ignored on success)."""


@dataclass(frozen=True)
class HeartbeatReply:
    held: Mapping[str, int]
    """Task id → lease token for every task this worker still holds."""
    cancel: frozenset[str]
    """Tasks an operator asked to cancel."""


@dataclass(frozen=True)
class ReapReport:
    returned: int = 0  # running tasks whose worker vanished, back to ready
    dead: int = 0  # ... out of attempts
    cancelled: int = 0  # ... with a cancel request
    undispatched: int = 0  # granted capacity no worker took, back to ready


@dataclass(frozen=True)
class PlanReport:
    considered: int = 0
    started: int = 0
    blocked: Mapping[str, str] = field(default_factory=dict)
    wake_in: float | None = None  # when a rate-limited task could start
    started_ids: tuple[str, ...] = ()
    """The tasks this pass granted capacity to (the plan span links to their traces)."""


@dataclass(frozen=True)
class MetricsSnapshot:
    """What the metrics endpoint reads from the database at each scrape (so every process's
    work is counted once, however many workers there are)."""

    tasks: Mapping[tuple[str, str], int]
    """(state, pool) → tasks now in that state (final states included: totals so far)."""
    oldest_ready_age_s: Mapping[str, float]
    """pool → seconds the oldest ready task has been startable."""
    attempts: Mapping[tuple[str, str], int]
    """(kind, outcome) → finished attempts so far."""
    retries: int
    """Attempts after the first, so far."""
    run_seconds: Mapping[str, tuple[int, float]]
    """kind → (succeeded attempts, their total run time)."""
    approvals_pending: int
    oldest_approval_age_s: float
    dead_letters: int
    interventions: Mapping[str, int]
    """Audit action → count, for the actions a human takes (overrides, votes, holds...)."""
    refused: int
    """Mutations refused by role."""
    drifts: Mapping[str, int] = field(default_factory=dict)
    """Drift signal (duration_error:<kind>, miss_rate, feature:<name>) → detections so far."""
    fallback: bool = False
    """The drift fallback is engaged."""
    deadlines: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """(pool, met | missed) → tasks with a deadline that succeeded by it, or did not (succeeded
    late, dead or expired)."""
    units_used: Mapping[str, int] = field(default_factory=dict)
    """pool → units held by leased and running tasks."""
    capacity: Mapping[str, int | None] = field(default_factory=dict)
    """pool → its declared capacity (None: unbounded)."""


@dataclass(frozen=True)
class PoolUsage:
    pool: Pool
    used: int
    ready: int
    leased: int
    running: int


@dataclass(frozen=True)
class ScheduleRow:
    name: str
    spec: dict[str, Any]
    paused: bool
    last_tick: float | None
    buffered_tick: float | None


@dataclass(frozen=True)
class TaskFilter:
    state: str | None = None
    kind: str | None = None
    source: str | None = None
    limit: int = 100
    after_id: str | None = None


@dataclass(frozen=True)
class OutcomeRow:
    """One finished attempt of a task: what was known when it was submitted, and what happened.

    The training data of the predictors. `started_at` is the worker's clock and `finished_at`
    the database's, so a duration carries their skew (small next to most tasks' run times).
    """

    task_id: str
    kind: str
    payload: dict[str, Any]
    created_at: float
    release_at: float
    due_at: float | None
    weight: float
    estimate: float | None
    pool: str
    units: int
    tenant: str
    attempt: int
    """1 for the first attempt."""
    started_at: float
    finished_at: float
    outcome: str
    """succeeded | failed | timeout (lost and cancelled attempts are not outcomes)."""

    @property
    def failed(self) -> bool:
        return self.outcome != "succeeded"


@dataclass(frozen=True)
class DeadLetter:
    """An event refused at ingestion, kept as it was received (kept here, not in
    `tactician.ingest`, because this port sits below the services in the layers)."""

    id: str
    source: str
    received_at: float
    reason: str
    body: str
    """The raw body as text: bytes that are not UTF-8 appear as \\xNN escapes."""
    headers: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "received_at": self.received_at,
            "reason": self.reason,
            "body": self.body,
            "headers": dict(self.headers),
        }


class DeadLetterStore(Protocol):
    """Events refused at ingestion; keeping one also appends its audit record."""

    def remember_signature(self, source: str, signature: str, window_s: float) -> bool: ...

    def forget_signature(self, signature: str) -> None: ...

    def dead_letter(
        self,
        source: str,
        reason: str,
        body: bytes | str,
        headers: Mapping[str, str],
        *,
        actor: Actor = ...,
    ) -> str: ...

    def dead_letters(self, limit: int = 100, after_id: str | None = None) -> list[DeadLetter]:
        """Newest first; `after_id` is the last id of the previous page."""
        ...


class GovernanceStore(Protocol):
    """The gate's tables; every change also appends its audit record, in one transaction."""

    def audit(self, *entries: Entry) -> None: ...

    def audit_records(
        self, since: float | None = None, after_seq: int = 0, actions: Sequence[str] = ()
    ) -> Iterator[AuditRecord]: ...

    def audit_head(self) -> tuple[int, str]: ...

    def create_token(
        self,
        token_id: str,
        name: str,
        role: Role,
        groups: Sequence[str],
        digest: str,
        actor: Actor,
        site: str | None = None,
    ) -> None: ...

    def token_by_hash(self, digest: str) -> TokenRow | None: ...

    def tokens(self) -> list[TokenRow]: ...

    def revoke_token(self, name: str, actor: Actor) -> None: ...

    def deploy_policy(
        self,
        version: str,
        name: str,
        text: str,
        actor: Actor,
        *,
        slot: str = "live",
        share: float | None = None,
        split_by: str | None = None,
        reason: str | None = None,
    ) -> Deployment: ...

    def clear_policy_slot(
        self, slot: str, actor: Actor, reason: str | None = None
    ) -> Deployment: ...

    def rollback_policy(self, actor: Actor, reason: str | None = None) -> Deployment: ...

    def deployments(self, slot: str | None = None, limit: int = 100) -> list[Deployment]: ...

    def deployed(self) -> dict[str, tuple[Deployment, str]]: ...

    def policy_text(self, version: str) -> str: ...

    def require_approval(self, gated: Mapping[str, NewApproval], why: Mapping[str, str]) -> int: ...

    def approvals(self, state: str | None = "pending", limit: int = 1000) -> list[ApprovalRow]: ...

    def approval(self, task_id: str) -> ApprovalRow: ...

    def vote(
        self,
        task_id: str,
        actor: Actor,
        verdict: str,
        reason: str,
        edits: Mapping[str, Any] | None = None,
        now: float | None = None,
        via: str | None = None,
    ) -> ApprovalRow: ...

    def due_approvals(self, now: float, limit: int = 1000) -> list[ApprovalRow]: ...

    def escalate_approval(self, task_id: str, steps: Sequence[int], now: float) -> None: ...

    def expire_approval(self, task_id: str, now: float) -> ApprovalRow | None: ...

    def resolve_offline(
        self, task_id: str, actor: Actor, offline_s: float, now: float
    ) -> ApprovalRow | None:
        """Resolve a pending approval as its rule's offline fallback says (an edge site that
        cannot reach the centre); None if the rule holds or it was answered meanwhile."""
        ...

    def set_override(
        self,
        task_id: str,
        what: str,
        value: float | None,
        actor: Actor,
        reason: str,
        expires_at: float | None = None,
    ) -> Override: ...

    def clear_override(self, task_id: str, what: str, actor: Actor, reason: str) -> None: ...

    def overrides(self) -> list[Override]: ...

    def hold(self, task_id: str, actor: Actor, reason: str, until: float | None = None) -> Task: ...

    def release(self, task_id: str, actor: Actor, reason: str) -> Task: ...

    def expire_overrides(self, now: float) -> int: ...

    def record_decisions(self, rows: Sequence[DecisionRow]) -> None: ...

    def recorded_decisions(self, version: str, since: float | None = None) -> list[DecisionRow]: ...

    def finished_since(self, since: float) -> list[OutcomeOfTask]: ...


class DriftStore(Protocol):
    """The drift fallback's state; engaging and clearing each append their audit record."""

    def fallback(self) -> Fallback | None: ...

    def engage_fallback(
        self, signal: str, reason: str, policy: str, detail: Mapping[str, Any]
    ) -> Fallback | None:
        """None when it was engaged already."""
        ...

    def clear_fallback(self, actor: Actor, reason: str) -> Fallback: ...


class CountersStore(Protocol):
    """The sums of what processes counted in memory (`tactician.observe.counters`)."""

    def add_counters(self, rows: Sequence[tuple[str, str, str, float]]) -> None:
        """Add (name, labels, bucket, delta) rows to the sums, in one transaction."""
        ...

    def counter_values(self) -> list[tuple[str, str, str, float]]: ...

    def dispatch_delays(self, claims: Sequence[tuple[str, int]]) -> list[float]:
        """Seconds each claimed (task id, attempt) had been ready (where still known)."""
        ...


class Store(GovernanceStore, DeadLetterStore, DriftStore, CountersStore, Protocol):
    url: str
    settings: Settings

    def close(self) -> None: ...

    def db_now(self) -> float: ...

    # kinds and pools
    def register_kinds(self, kinds: Sequence[KindSpec]) -> None: ...

    def kinds(self) -> dict[str, KindSpec]: ...

    def set_pool(self, name: str, capacity: int | None) -> None: ...

    def pools(self) -> list[PoolUsage]: ...

    def targets(self) -> list[TargetState]: ...

    # submitting and reading
    def submit(
        self,
        tasks: Sequence[NewTask],
        kinds: Mapping[str, KindSpec],
        *,
        actor: Actor = ...,
        approvals: Mapping[int, NewApproval] | None = None,
    ) -> list[str]: ...

    def get(self, task_id: str) -> Task: ...

    def list_tasks(self, query: TaskFilter) -> list[Task]: ...

    def counts(self) -> dict[str, int]: ...

    def metrics_snapshot(self) -> MetricsSnapshot: ...

    def attempts(self, task_id: str) -> list[Attempt]: ...

    def outcomes(self, since: float | None = None, limit: int = 100_000) -> list[OutcomeRow]:
        """The latest `limit` finished attempts (finished at or after `since`), oldest first."""
        ...

    # operators
    def cancel(self, task_id: str, actor: Actor = ..., reason: str = "") -> Task: ...

    def retry(self, task_id: str, actor: Actor = ...) -> Task: ...

    def purge(self, before: float, actor: Actor = ..., *, dry_run: bool = False) -> int:
        """Remove the tasks that ended before `before` (the audit chain keeps their story)."""
        ...

    def cancel_waiting(
        self, key_prefix: str, actor: Actor = ..., reason: str = ""
    ) -> list[str]: ...

    # the planner
    def try_lead(self, holder: str, ttl: float) -> bool: ...

    def resign(self, holder: str) -> None: ...

    def promote(self) -> int: ...

    def reap(self) -> ReapReport: ...

    def plan(
        self,
        planner: Planner,
        kinds: Mapping[str, KindSpec],
        ranker: Ranker | None = None,
        provenance: Provenance | None = None,
        expected: ExpectedRuns | None = None,
    ) -> PlanReport: ...

    def waiting(self, limit: int) -> list[ReadyRow]:
        """Tasks not yet started (pending, ready, retry_wait, leased), earliest due first."""
        ...

    def merge(self, primary: str, others: Sequence[str], actor: Actor = ...) -> Task:
        """Fold `others` into `primary` (all of one kind, none started, none that another task
        depends on): they end `merged`, and the primary's payload gains their payloads under
        "merged", so one run handles them all."""
        ...

    def reprioritize(
        self,
        task_id: str,
        *,
        weight: float | None = None,
        due_at: float | None = None,
        clear_due: bool = False,
        actor: Actor = ...,
        reason: str = "",
    ) -> Task:
        """Change a waiting or running task's weight or deadline; the next planning pass
        ranks it anew (and is woken for it)."""
        ...

    # schedules
    def save_schedule(self, name: str, spec: Mapping[str, Any], paused: bool) -> None: ...

    def schedules(self) -> list[ScheduleRow]: ...

    def set_schedule_paused(self, name: str, paused: bool) -> None: ...

    def delete_schedule(self, name: str) -> None: ...

    def schedule_unfinished(self, name: str) -> list[str]: ...

    def advance_schedule(
        self, name: str, last_tick: float, buffered_tick: float | None
    ) -> None: ...

    # workers
    def register_worker(
        self, worker_id: str, host: str, pid: int, kinds: Sequence[str]
    ) -> None: ...

    def claim(self, worker_id: str, kinds: Sequence[str], limit: int) -> list[Claim]: ...

    def trace_contexts(self, task_ids: Sequence[str]) -> dict[str, str]:
        """The stored traceparent of each of these tasks that has one."""
        ...

    def finish_and_claim(
        self,
        worker_id: str,
        finishes: Sequence[Finish],
        kinds: Mapping[str, KindSpec],
        claim_kinds: Sequence[str],
        limit: int,
    ) -> tuple[list[bool], list[Claim]]: ...

    def heartbeat(self, worker_id: str) -> HeartbeatReply: ...

    def finish(
        self, worker_id: str, finishes: Sequence[Finish], kinds: Mapping[str, KindSpec]
    ) -> list[bool]: ...

    def wait_for_work(self, timeout: float) -> None:
        """Block until something may have changed (NOTIFY), or timeout."""
        ...
