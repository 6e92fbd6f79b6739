"""The SQL both adapters share. The adapters supply connections, transactions and dialect.

SQL is written with `?` placeholders; the PostgreSQL adapter turns them into `%s`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict
from importlib import resources
from typing import Any

from tactician.domain import (
    FINAL_STATES,
    Attempt,
    Claim,
    KindSpec,
    NewTask,
    Pool,
    RateLimit,
    RetryPolicy,
    TargetState,
    Task,
    TaskState,
)
from tactician.errors import Conflict, InvalidInput, NotFound, UnknownKind
from tactician.govern.approvals import RuleSpec
from tactician.govern.audit import Entry, canonical_json
from tactician.govern.records import NewApproval
from tactician.govern.roles import SYSTEM, Actor
from tactician.ids import new_ids
from tactician.plan.capacity import Candidate, CapacityView, KindLimits
from tactician.plan.flow import Bucket, after_result, allowed_in_flight
from tactician.settings import Settings
from tactician.store.counters import CountersMixin
from tactician.store.deadletters import DeadLetterMixin
from tactician.store.drift import DriftMixin
from tactician.store.governance import GovernanceMixin
from tactician.store.mixin import Cursor
from tactician.store.protocol import (
    ExpectedRuns,
    Finish,
    HeartbeatReply,
    MetricsSnapshot,
    OutcomeRow,
    Planner,
    PlanReport,
    PoolUsage,
    Provenance,
    Ranker,
    ReadyRow,
    ReapReport,
    ScheduleRow,
    TaskFilter,
)
from tactician.store.reports import ReportsMixin
from tactician.store.site_votes import SiteVotesMixin
from tactician.store.sites import SitesMixin

_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
NO_DUE = 1e15  # the EDF key of a task without a deadline: after every real one
MAX_OUTCOMES = 1_000_000  # finished attempts read at once for training
TASK_COLUMNS = (
    "id, kind, payload, state, created_at, release_at, due_at, weight, estimate, attempt, "
    "tenant, source, idempotency_key, pool, units, concurrency_key, target, tags, run_at, "
    "lease_token, lease_expires_at, worker_id, last_error, last_traceback, cancel_requested, "
    "finished_at, trace_context"
)
INSERT_COLUMNS = (
    "id, kind, payload, state, created_at, release_at, due_at, due_sort, weight, estimate, "
    "max_attempts, tenant, source, idempotency_key, pool, units, concurrency_key, target, tags, "
    "has_deps, rank, schedule, trace_context"
)
ACTIVE = "('leased', 'running')"
_READY_COLUMNS = (
    "id, kind, pool, units, concurrency_key, target, due_sort, created_at, release_at, due_at, "
    "weight, estimate, tenant, attempt, state, payload, "
    "(SELECT coalesce(sum(c.weight), 0) FROM task_deps d JOIN tasks c ON c.id = d.task_id "
    "WHERE d.depends_on = tasks.id AND c.state = 'pending'), tags"
)
"""The columns of a `ReadyRow`, in order (the first seven are a `Candidate`'s)."""
INTERVENTIONS = (
    "override.set",
    "override.cleared",
    "task.held",
    "task.released",
    "task.cancelled",
    "task.retried",
    "task.reprioritized",
    "approval.voted",
    "drift.cleared",
)
"""Audit actions a human takes: the manual interventions the metrics count."""
# States a dependency can end in without succeeding: its dependents die too.
FAILED_UPSTREAM = "('dead', 'cancelled', 'rejected', 'expired')"
FINAL = "(" + ", ".join(f"'{state.value}'" for state in sorted(FINAL_STATES)) + ")"
PURGE_BATCH = 5000
"""Tasks removed per transaction by `purge` (each transaction short, whatever the backlog)."""
PURGED_WITH_THEIR_TASK = (
    "attempts",
    "task_deps",
    "approvals",
    "approval_votes",
    "overrides",
    "decisions",
)
"""The tables whose rows belong to one task (`task_id`) and go with it."""
PURGED_ATTEMPTS = "purged.attempts"
PURGED_DEADLINES = "purged.deadlines"
"""Rows of `metric_counters` that keep what purged tasks added to the attempt and deadline
counters of /metrics (a counter must never go back)."""
_PURGED_BUCKETS = ("count", "retries", "run_s")
_ATTEMPT_SUMS = (
    "SELECT t.kind, a.outcome, count(*), sum(CASE WHEN a.attempt > 1 THEN 1 ELSE 0 END), "
    "sum(CASE WHEN a.outcome = 'succeeded' THEN a.finished_at - a.started_at ELSE 0 END) "
    "FROM attempts a JOIN tasks t ON t.id = a.task_id WHERE 1 = 1"
)


class SqlStore(
    GovernanceMixin,
    DeadLetterMixin,
    DriftMixin,
    ReportsMixin,
    CountersMixin,
    SitesMixin,
    SiteVotesMixin,
):
    """Store logic over a DB-API connection; one instance per process, one thread."""

    dialect = "sql"
    url: str

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings

    # --- what an adapter supplies ---------------------------------------------------------

    def close(self) -> None:
        raise NotImplementedError

    def _tx(self) -> AbstractContextManager[Cursor]:
        """A write transaction; serialised with other writers where the claim needs it."""
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Cursor]:
        """A read-only transaction."""
        return self._tx()

    def _now_sql(self) -> str:
        raise NotImplementedError

    def _in(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        raise NotImplementedError

    def _skip_locked(self) -> str:
        return ""

    def _for_update(self) -> str:
        """Lock the rows a read-then-write transaction reads (SQLite's writers are serial)."""
        return ""

    def _after_plan(self, cur: Cursor) -> None:
        """Wake the workers (NOTIFY on PostgreSQL)."""

    def _after_submit(self, cur: Cursor) -> None:
        """Wake the planner (NOTIFY on PostgreSQL)."""

    def _serialise_planners(self, cur: Cursor) -> None:
        """Make concurrent plan transactions run one after another."""

    def wait_for_work(self, timeout: float) -> None:
        self._sleep(timeout)

    def _sleep(self, seconds: float) -> None:
        raise NotImplementedError

    # --- migrations ------------------------------------------------------------------------

    def _migrations(self) -> Iterator[tuple[int, str]]:
        folder = resources.files("tactician.store") / "migrations" / self.dialect
        for item in sorted(folder.iterdir(), key=lambda p: p.name):
            if item.name.endswith(".sql"):
                yield int(item.name.split("_", 1)[0]), item.read_text()

    def _applied_versions(self, cur: Cursor) -> set[int]:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        cur.execute("SELECT version FROM schema_migrations")
        return {row[0] for row in cur.fetchall()}

    # --- clock -----------------------------------------------------------------------------

    def db_now(self) -> float:
        with self._tx() as cur:
            return self._now(cur)

    def _now(self, cur: Cursor) -> float:
        cur.execute(f"SELECT {self._now_sql()}")
        return float(cur.fetchone()[0])

    # --- kinds and pools -------------------------------------------------------------------

    def register_kinds(self, kinds: Sequence[KindSpec]) -> None:
        with self._tx() as cur:
            now = self._now(cur)
            cur.executemany(
                "INSERT INTO kinds (name, spec, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, "
                "updated_at = excluded.updated_at",
                [(k.name, json.dumps(kind_to_json(k)), now) for k in kinds],
            )

    def kinds(self) -> dict[str, KindSpec]:
        with self._read() as cur:
            cur.execute("SELECT spec FROM kinds")
            specs = [kind_from_json(json.loads(row[0])) for row in cur.fetchall()]
        return {k.name: k for k in specs}

    def set_pool(self, name: str, capacity: int | None) -> None:
        if not name:
            raise InvalidInput("a pool needs a name")
        if capacity is not None and capacity < 0:
            raise InvalidInput(f"pool {name}: capacity must be >= 0")
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO pools (name, capacity) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET capacity = excluded.capacity",
                (name, capacity),
            )

    def pools(self) -> list[PoolUsage]:
        with self._read() as cur:
            cur.execute("SELECT name, capacity FROM pools")
            capacity: dict[str, int | None] = {row[0]: row[1] for row in cur.fetchall()}
            cur.execute(
                "SELECT pool, state, count(*), sum(units) FROM tasks "
                "WHERE state IN ('ready', 'leased', 'running') GROUP BY pool, state"
            )
            counts: dict[str, dict[str, tuple[int, int]]] = {}
            for pool, state, count, units in cur.fetchall():
                counts.setdefault(pool, {})[state] = (int(count), int(units))
        names = sorted(set(capacity) | set(counts))
        out = []
        for name in names:
            by_state = counts.get(name, {})
            used = sum(by_state.get(s, (0, 0))[1] for s in ("leased", "running"))
            out.append(
                PoolUsage(
                    Pool(name, capacity.get(name)),
                    used=used,
                    ready=by_state.get("ready", (0, 0))[0],
                    leased=by_state.get("leased", (0, 0))[0],
                    running=by_state.get("running", (0, 0))[0],
                )
            )
        return out

    def metrics_snapshot(self) -> MetricsSnapshot:
        with self._read() as cur:
            now = self._now(cur)
            # One scan of the tasks for the counts, the oldest ready task and the units in use.
            cur.execute(
                "SELECT state, pool, count(*), sum(units), min(release_at) FROM tasks "
                "GROUP BY state, pool"
            )
            tasks: dict[tuple[str, str], int] = {}
            oldest: dict[str, float] = {}
            used: dict[str, int] = {}
            for state, pool, n, units, first in cur.fetchall():
                tasks[(state, pool)] = int(n)
                if state == "ready":
                    oldest[pool] = max(0.0, now - float(first))
                elif state in ("leased", "running"):
                    used[pool] = used.get(pool, 0) + int(units)
            cur.execute("SELECT name, capacity FROM pools")
            capacity = {name: None if cap is None else int(cap) for name, cap in cur.fetchall()}
            cur.execute(f"{_ATTEMPT_SUMS} GROUP BY t.kind, a.outcome")
            sums: dict[tuple[str, str], list[float]] = {}  # count, retries, run seconds
            for kind, outcome, n, again, seconds in cur.fetchall():
                sums[(kind, outcome)] = [float(n), float(again or 0), float(seconds or 0.0)]
            # What `purge` removed, kept so that these counters never go back.
            cur.execute(
                "SELECT name, labels, bucket, value FROM metric_counters WHERE name IN (?, ?)",
                (PURGED_ATTEMPTS, PURGED_DEADLINES),
            )
            purged = [(n, json.loads(labels), b, v) for n, labels, b, v in cur.fetchall()]
            for _, labels, bucket, value in (p for p in purged if p[0] == PURGED_ATTEMPTS):
                totals = sums.setdefault((labels["kind"], labels["outcome"]), [0.0, 0.0, 0.0])
                totals[_PURGED_BUCKETS.index(bucket)] += value
            attempts = {key: int(n) for key, (n, _, _) in sums.items()}
            retries = sum(int(again) for _, again, _ in sums.values())
            run = {
                kind: (int(n), seconds)
                for (kind, outcome), (n, _, seconds) in sums.items()
                if outcome == "succeeded"
            }
            cur.execute("SELECT count(*), min(requested_at) FROM approvals WHERE state = 'pending'")
            pending, asked = cur.fetchone()
            cur.execute("SELECT count(*) FROM dead_letters")
            letters = int(cur.fetchone()[0])
            clause, params = self._in("action", list(INTERVENTIONS))
            cur.execute(
                f"SELECT action, count(*) FROM audit_log WHERE {clause} AND actor <> 'tactician' "
                "AND actor NOT LIKE ? GROUP BY action",
                [*params, "source:%"],
            )
            interventions = {action: int(n) for action, n in cur.fetchall()}
            cur.execute("SELECT count(*) FROM audit_log WHERE action = 'access.refused'")
            refused = int(cur.fetchone()[0])
            cur.execute(
                "SELECT subject, count(*) FROM audit_log WHERE action = 'drift.detected' "
                "GROUP BY subject"
            )
            drifts = {str(signal): int(n) for signal, n in cur.fetchall()}
            cur.execute("SELECT count(*) FROM drift_fallback")
            fallback = int(cur.fetchone()[0]) > 0
            cur.execute(
                "SELECT pool, sum(CASE WHEN state = 'succeeded' AND finished_at <= due_at "
                "THEN 1 ELSE 0 END), count(*) FROM tasks WHERE due_at IS NOT NULL "
                "AND state IN ('succeeded', 'dead', 'expired') GROUP BY pool"
            )
            deadlines: dict[tuple[str, str], int] = {}
            for pool, met, ended in cur.fetchall():
                deadlines[(pool, "met")] = int(met or 0)
                deadlines[(pool, "missed")] = int(ended) - int(met or 0)
            for _, labels, bucket, value in (p for p in purged if p[0] == PURGED_DEADLINES):
                key = (labels["pool"], bucket)
                deadlines[key] = deadlines.get(key, 0) + int(value)
        return MetricsSnapshot(
            tasks=tasks,
            oldest_ready_age_s=oldest,
            attempts=attempts,
            retries=retries,
            run_seconds=run,
            approvals_pending=int(pending),
            oldest_approval_age_s=0.0 if asked is None else max(0.0, now - float(asked)),
            dead_letters=letters,
            interventions=interventions,
            refused=refused,
            drifts=drifts,
            fallback=fallback,
            deadlines=deadlines,
            units_used=used,
            capacity=capacity,
        )

    def targets(self) -> list[TargetState]:
        with self._read() as cur:
            return list(self._targets(cur).values())

    def _targets(self, cur: Cursor) -> dict[str, TargetState]:
        cur.execute(
            "SELECT target, breaker, consecutive_failures, opened_at, concurrency_limit, "
            "latency_floor FROM targets"
        )
        return {row[0]: TargetState(*row) for row in cur.fetchall()}

    # --- submitting --------------------------------------------------------------------------

    def submit(
        self,
        tasks: Sequence[NewTask],
        kinds: Mapping[str, KindSpec],
        *,
        actor: Actor = SYSTEM,
        approvals: Mapping[int, NewApproval] | None = None,
    ) -> list[str]:
        """Commit every task, or none. Same idempotency key → the id of the existing task.

        `approvals` maps a task's index to the approval a rule asks for: that task waits in
        awaiting_approval (holding no capacity) until it is answered."""
        approvals = approvals or {}
        if not tasks:
            return []
        for task in tasks:
            if task.kind not in kinds:
                raise UnknownKind(f"unknown kind {task.kind!r}")
        with self._tx() as cur:
            now = self._now(cur)
            # Sorted: ids of one batch share their millisecond, and the random rest would
            # otherwise run the batch out of order among tasks of equal deadline.
            ids = new_ids(len(tasks), now)  # increasing: batch order is submission order
            keyed: dict[str, int] = {}
            rows = []
            deps: list[tuple[str, str]] = []
            in_batch = set(ids)
            wanted_deps = {d for t in tasks for d in t.depends_on} - in_batch
            if wanted_deps:
                self._check_exist(cur, wanted_deps)
            for i, (task_id, task) in enumerate(zip(ids, tasks, strict=True)):
                if task.idempotency_key is not None:
                    if task.idempotency_key in keyed:  # twice in one batch: one task
                        ids[i] = ids[keyed[task.idempotency_key]]
                        continue
                    keyed[task.idempotency_key] = i
                row = _task_row(task_id, task, kinds[task.kind], now)
                if i in approvals:
                    row = (*row[:3], "awaiting_approval", *row[4:])
                rows.append(row)
                deps.extend((task_id, d) for d in task.depends_on)
            self._insert_tasks(cur, rows)
            if keyed:
                # Existing tasks with these keys win; map every key to its task's id.
                clause, params = self._in("idempotency_key", list(keyed))
                cur.execute(f"SELECT idempotency_key, id FROM tasks WHERE {clause}", params)
                existing = dict(cur.fetchall())
                for key, index in keyed.items():
                    ids[index] = existing[key]
                for i, task in enumerate(tasks):
                    if task.idempotency_key is not None:
                        ids[i] = existing[task.idempotency_key]
                created = set(ids)
                deps = [d for d in deps if d[0] in created]
            if deps:
                cur.executemany(
                    "INSERT INTO task_deps (task_id, depends_on) VALUES (?, ?) "
                    "ON CONFLICT DO NOTHING",
                    deps,
                )
            kept = set(ids)  # a row whose idempotency key existed already was not inserted
            inserted = [row[0] for row in rows if row[0] in kept]
            fresh = set(inserted)
            opened = {ids[i]: a for i, a in approvals.items() if ids[i] in fresh}
            entries = self._open_approvals(cur, opened, now) if opened else []
            if inserted:
                entries.insert(0, _batch_entry(actor, "task.submitted", inserted, {}))
            self._audit(cur, entries, now)
            self._after_submit(cur)
        return ids

    def _insert_tasks(self, cur: Cursor, rows: Sequence[tuple[Any, ...]]) -> None:
        cur.executemany(
            f"INSERT INTO tasks ({INSERT_COLUMNS}) VALUES "
            f"({', '.join('?' * len(INSERT_COLUMNS.split(',')))}) ON CONFLICT DO NOTHING",
            rows,
        )

    def _check_exist(self, cur: Cursor, task_ids: set[str]) -> None:
        clause, params = self._in("id", sorted(task_ids))
        # Share-locked (PostgreSQL): a purge cannot take a parent away under a new dependent.
        lock = " FOR KEY SHARE" if self.dialect == "postgres" else ""
        cur.execute(f"SELECT id FROM tasks WHERE {clause}{lock}", params)
        missing = task_ids - {row[0] for row in cur.fetchall()}
        if missing:
            raise InvalidInput(f"depends_on names unknown task {sorted(missing)[0]}")

    # --- reading -------------------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        with self._read() as cur:
            return self._get(cur, task_id)

    def _get(self, cur: Cursor, task_id: str, *, for_update: bool = False) -> Task:
        lock = self._for_update() if for_update else ""
        cur.execute(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?{lock}", (task_id,))
        row = cur.fetchone()
        if row is None:
            raise NotFound(f"no task has id {task_id!r}")
        cur.execute("SELECT depends_on FROM task_deps WHERE task_id = ?", (task_id,))
        deps = tuple(sorted(r[0] for r in cur.fetchall()))
        return task_from_row(row, deps)

    def list_tasks(self, query: TaskFilter) -> list[Task]:
        where, params = ["1 = 1"], []
        if query.state is not None:
            if query.state not in TaskState.__members__.values():
                raise InvalidInput(f"unknown state {query.state!r}")
            # A literal (checked against the enum above), so partial indexes on state apply.
            where.append(f"state = '{TaskState(query.state).value}'")
        for column in ("kind", "source"):
            value = getattr(query, column)
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if query.after_id is not None:
            where.append("id > ?")
            params.append(query.after_id)
        if not 1 <= query.limit <= 10_000:
            raise InvalidInput("limit must be between 1 and 10000")
        with self._read() as cur:
            cur.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE {' AND '.join(where)} "
                f"ORDER BY id LIMIT {int(query.limit)}",
                params,
            )
            rows = cur.fetchall()
            deps: dict[str, list[str]] = {}
            if rows:
                clause, params = self._in("task_id", [row[0] for row in rows])
                cur.execute(f"SELECT task_id, depends_on FROM task_deps WHERE {clause}", params)
                for task_id, upstream in cur.fetchall():
                    deps.setdefault(task_id, []).append(upstream)
        return [task_from_row(row, tuple(sorted(deps.get(row[0], ())))) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._read() as cur:
            cur.execute("SELECT state, count(*) FROM tasks GROUP BY state")
            return {state: int(n) for state, n in cur.fetchall()}

    def count_state(self, state: str) -> int:
        with self._read() as cur:
            cur.execute("SELECT count(*) FROM tasks WHERE state = ?", (state,))
            return int(cur.fetchone()[0])

    def unstarted_from(self, source: str, limit: int) -> int:
        """The source's tasks not started yet, counted up to `limit`: a bus source's
        backpressure. Cheap however long the backlog: a partial index (0007), and a bound."""
        with self._read() as cur:
            cur.execute(
                "SELECT count(*) FROM (SELECT 1 FROM tasks WHERE source = ? AND state IN "
                "('pending', 'awaiting_approval', 'ready', 'leased', 'retry_wait', 'deferred', "
                "'held') LIMIT ?) AS counted",
                (source, limit),
            )
            return int(cur.fetchone()[0])

    def attempts(self, task_id: str) -> list[Attempt]:
        with self._read() as cur:
            cur.execute(
                "SELECT task_id, attempt, token, worker_id, started_at, finished_at, outcome, "
                "error FROM attempts WHERE task_id = ? ORDER BY token",
                (task_id,),
            )
            return [Attempt(*row) for row in cur.fetchall()]

    def outcomes(self, since: float | None = None, limit: int = 100_000) -> list[OutcomeRow]:
        """The latest `limit` finished attempts (finished at or after `since`), oldest first.

        Succeeded, failed and timed-out attempts only: a lost attempt's run time is unknown
        and a cancelled one was stopped by an operator.
        """
        if not 1 <= limit <= MAX_OUTCOMES:
            raise InvalidInput(f"limit must be between 1 and {MAX_OUTCOMES}")
        where, params = "", []
        if since is not None:
            if not math.isfinite(since):
                raise InvalidInput(f"since must be a finite time, got {since}")
            where, params = " AND a.finished_at >= ?", [float(since)]
        with self._read() as cur:
            cur.execute(
                "SELECT t.id, t.kind, t.payload, t.created_at, t.release_at, t.due_at, "
                "t.weight, t.estimate, t.pool, t.units, t.tenant, a.attempt, a.started_at, "
                "a.finished_at, a.outcome FROM attempts a JOIN tasks t ON t.id = a.task_id "
                "WHERE a.outcome IN ('succeeded', 'failed', 'timeout') "
                f"AND a.started_at IS NOT NULL{where} "
                f"ORDER BY a.finished_at DESC, a.task_id DESC, a.token DESC LIMIT {int(limit)}",
                params,
            )
            rows = cur.fetchall()
        rows.reverse()
        return [_outcome_row(row) for row in rows]

    # --- operators -------------------------------------------------------------------------

    def cancel(self, task_id: str, actor: Actor = SYSTEM, reason: str = "") -> Task:
        """Cancel now, or ask the worker running it to stop (it is killed within a heartbeat)."""
        with self._tx() as cur:
            task = self._get(cur, task_id, for_update=True)
            if task.state.is_final:
                raise Conflict(f"task {task_id} is already {task.state}")
            now = self._now(cur)
            if task.state is TaskState.RUNNING:
                cur.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = ?", (task_id,))
            else:
                cur.execute(
                    "UPDATE tasks SET state = 'cancelled', finished_at = ?, "
                    "lease_expires_at = NULL WHERE id = ?",
                    (now, task_id),
                )
            detail = {"from": task.state.value, "reason": reason}
            entries = [_batch_entry(actor, "task.cancelled", [task_id], detail)]
            if task.state is TaskState.AWAITING_APPROVAL:
                entries += self._withdraw_approvals(cur, [task_id], actor, now)
            self._audit(cur, entries, now)
            return self._get(cur, task_id)

    def purge(self, before: float, actor: Actor = SYSTEM, *, dry_run: bool = False) -> int:
        """Remove the tasks that ended (succeeded, dead, cancelled, rejected, merged, expired)
        before `before`, with their attempts, dependencies, approvals, overrides and shadow
        decisions; the audit chain keeps everything it recorded. A task that an unfinished one
        depends on stays. Works in transactions of PURGE_BATCH tasks, each audited
        (`tasks.purged`); returns how many went (with `dry_run`: would go, nothing changed)."""
        # A task goes only with every task that depends on it gone too (or going): a retried
        # dependent must still see what its parent did.
        where = (
            f"state IN {FINAL} AND finished_at < ? AND NOT EXISTS (SELECT 1 FROM task_deps d "
            "JOIN tasks c ON c.id = d.task_id WHERE d.depends_on = tasks.id AND NOT "
            f"(c.state IN {FINAL} AND c.finished_at < ?))"
        )
        if dry_run:
            with self._read() as cur:
                cur.execute(f"SELECT count(*) FROM tasks WHERE {where}", (before, before))
                return int(cur.fetchone()[0])
        total = 0
        while True:
            with self._tx() as cur:
                now = self._now(cur)
                # Locked (PostgreSQL): a retry committed meanwhile waits, or is skipped here.
                cur.execute(
                    f"SELECT id FROM tasks WHERE {where} LIMIT {PURGE_BATCH}{self._skip_locked()}",
                    (before, before),
                )
                found = [row[0] for row in cur.fetchall()]
                ids: list[str] = []
                if found:  # counted first: the counts read the task rows
                    self._add_counters(cur, self._purged_counts(cur, found), now)
                    clause, params = self._in("id", found)
                    cur.execute(
                        f"DELETE FROM tasks WHERE {clause} AND state IN {FINAL} RETURNING id",
                        params,
                    )
                    ids = [row[0] for row in cur.fetchall()]
                    if len(ids) != len(found):  # cannot happen while the rows are locked
                        raise Conflict("tasks changed while they were purged: purge again")
                if ids:
                    clause, params = self._in("task_id", ids)
                    for table in PURGED_WITH_THEIR_TASK:
                        cur.execute(f"DELETE FROM {table} WHERE {clause}", params)
                    clause, params = self._in("depends_on", ids)
                    cur.execute(f"DELETE FROM task_deps WHERE {clause}", params)
                if ids or not total:  # a purge that found nothing is recorded once too
                    detail: dict[str, Any] = {"before": before, "count": len(ids)}
                    if actor.bootstrap:
                        detail["bootstrap"] = True
                    self._audit(cur, [Entry(actor.name, "tasks.purged", "-", detail)], now)
            total += len(ids)
            if len(found) < PURGE_BATCH:
                return total

    def _purged_counts(self, cur: Cursor, ids: Sequence[str]) -> list[tuple[str, str, str, float]]:
        """The metric counters these tasks add (their attempts, their deadlines met or
        missed), as rows of `metric_counters`, for `metrics_snapshot` to keep counting."""
        rows: list[tuple[str, str, str, float]] = []
        clause, params = self._in("a.task_id", ids)
        cur.execute(f"{_ATTEMPT_SUMS} AND {clause} GROUP BY t.kind, a.outcome", params)
        for kind, outcome, n, again, seconds in cur.fetchall():
            labels = canonical_json({"kind": kind, "outcome": outcome})
            for bucket, value in zip(_PURGED_BUCKETS, (n, again or 0, seconds or 0.0), strict=True):
                rows.append((PURGED_ATTEMPTS, labels, bucket, float(value)))
        clause, params = self._in("id", ids)
        cur.execute(
            "SELECT pool, sum(CASE WHEN state = 'succeeded' AND finished_at <= due_at THEN 1 "
            f"ELSE 0 END), count(*) FROM tasks WHERE {clause} AND due_at IS NOT NULL "
            "AND state IN ('succeeded', 'dead', 'expired') GROUP BY pool",
            params,
        )
        for pool, met, ended in cur.fetchall():
            labels = canonical_json({"pool": pool})
            rows.append((PURGED_DEADLINES, labels, "met", float(met or 0)))
            rows.append((PURGED_DEADLINES, labels, "missed", float(int(ended) - int(met or 0))))
        return rows

    def cancel_waiting(self, key_prefix: str, actor: Actor = SYSTEM, reason: str = "") -> list[str]:
        """Cancel every task not started yet whose idempotency key starts with `key_prefix`
        (a resolved alert's remediation); returns their ids."""
        if not key_prefix:
            raise InvalidInput("a key prefix is needed")
        pattern = key_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                "UPDATE tasks SET state = 'cancelled', finished_at = ?, last_error = ? "
                "WHERE idempotency_key LIKE ? ESCAPE '\\' AND state IN ('pending', 'ready', "
                "'retry_wait', 'awaiting_approval', 'held') RETURNING id",
                (now, f"cancelled: {reason}" if reason else "cancelled", pattern),
            )
            ids = sorted(row[0] for row in cur.fetchall())
            if ids:
                detail = {"reason": reason, "key_prefix": key_prefix}
                entries = [_batch_entry(actor, "task.cancelled", ids, detail)]
                entries += self._withdraw_approvals(cur, ids, actor, now)
                self._audit(cur, entries, now)
            return ids

    def retry(self, task_id: str, actor: Actor = SYSTEM) -> Task:
        """Give a dead or cancelled task one more attempt. A task cancelled before its approval
        came asks for it again (the same rule, `actor` asking): a retry never skips approvers."""
        with self._tx() as cur:
            task = self._get(cur, task_id, for_update=True)
            if task.state not in (TaskState.DEAD, TaskState.CANCELLED):
                raise Conflict(f"task {task_id} is {task.state}; only dead or cancelled retry")
            now = self._now(cur)
            cur.execute(
                "SELECT rule, policy_version FROM approvals WHERE task_id = ? AND state IN "
                "('pending', 'withdrawn')",
                (task_id,),
            )
            unanswered = cur.fetchone()
            entries = [_batch_entry(actor, "task.retried", [task_id], {"from": task.state.value})]
            if unanswered is not None:
                for table in ("approval_votes", "approvals"):
                    cur.execute(f"DELETE FROM {table} WHERE task_id = ?", (task_id,))
                rule = RuleSpec.from_json(json.loads(unanswered[0]))
                asked = {task_id: NewApproval(rule, unanswered[1], actor.name)}
                entries += self._open_approvals(cur, asked, now)
            # Back to pending when it must still wait for its release time or dependencies:
            # promote() decides, so a retried task never runs before its dependencies succeed.
            cur.execute(
                "UPDATE tasks SET state = CASE WHEN ? THEN 'awaiting_approval' WHEN has_deps = 1 "
                "OR release_at > ? THEN 'pending' ELSE 'ready' END, max_attempts = attempt + 1, "
                "finished_at = NULL, cancel_requested = 0, run_at = NULL WHERE id = ?",
                (unanswered is not None, now, task_id),
            )
            self._audit(cur, entries, now)
            self._after_submit(cur)
            return self._get(cur, task_id)

    def waiting(self, limit: int) -> list[ReadyRow]:
        with self._read() as cur:
            cur.execute(
                f"SELECT {_READY_COLUMNS} FROM tasks "
                "WHERE state IN ('pending', 'ready', 'retry_wait', 'leased') "
                f"ORDER BY due_sort, id LIMIT {int(limit)}"
            )
            return [ReadyRow(*row) for row in cur.fetchall()]

    def merge(self, primary: str, others: Sequence[str], actor: Actor = SYSTEM) -> Task:
        folded = sorted(set(others) - {primary})
        if not folded:
            raise InvalidInput("nothing to merge: name tasks other than the primary")
        waiting = (TaskState.PENDING, TaskState.READY)
        with self._tx() as cur:
            head = self._get(cur, primary, for_update=True)
            if head.state not in waiting:
                raise Conflict(f"task {primary} is {head.state}: only a waiting task takes merges")
            payloads = []
            for task_id in folded:
                task = self._get(cur, task_id, for_update=True)
                if task.state not in waiting:
                    raise Conflict(f"task {task_id} is {task.state}: it cannot be merged")
                if task.kind != head.kind:
                    raise Conflict(f"task {task_id} is a {task.kind}, not a {head.kind}")
                cur.execute("SELECT 1 FROM task_deps WHERE depends_on = ? LIMIT 1", (task_id,))
                if cur.fetchone() is not None:
                    raise Conflict(f"task {task_id} has tasks waiting for it: it cannot merge")
                payloads.append(task.payload)
            payload = dict(head.payload)
            earlier = payload.get("merged", [])
            if not isinstance(earlier, list):
                raise Conflict(f"task {primary}'s payload has a 'merged' field of its own")
            payload["merged"] = [*earlier, *payloads]
            now = self._now(cur)
            clause, params = self._in("id", folded)
            cur.execute(
                "UPDATE tasks SET state = 'merged', finished_at = ?, last_error = ? "
                f"WHERE {clause}",
                [now, f"merged into {primary}", *params],
            )
            cur.execute(
                "UPDATE tasks SET payload = ? WHERE id = ?", (_ENCODER.encode(payload), primary)
            )
            detail = {"into": primary}
            self._audit(cur, [_batch_entry(actor, "task.merged", folded, detail)], now)
            return self._get(cur, primary)

    def reprioritize(
        self,
        task_id: str,
        *,
        weight: float | None = None,
        due_at: float | None = None,
        clear_due: bool = False,
        actor: Actor = SYSTEM,
        reason: str = "",
    ) -> Task:
        if weight is not None and not (weight > 0 and math.isfinite(weight)):
            raise InvalidInput(f"weight must be a positive number, got {weight}")
        if due_at is not None and not math.isfinite(due_at):
            raise InvalidInput(f"due_at must be a finite time, got {due_at}")
        if weight is None and due_at is None and not clear_due:
            raise InvalidInput("nothing to change: give a weight, a deadline or clear it")
        with self._tx() as cur:
            task = self._get(cur, task_id, for_update=True)
            if task.state.is_final:
                raise Conflict(f"task {task_id} is already {task.state}")
            new_weight = task.weight if weight is None else weight
            new_due = None if clear_due else (task.due_at if due_at is None else due_at)
            cur.execute(
                "UPDATE tasks SET weight = ?, due_at = ?, due_sort = ? WHERE id = ?",
                (new_weight, new_due, NO_DUE if new_due is None else new_due, task_id),
            )
            detail = {
                "weight": [task.weight, new_weight],
                "due_at": [task.due_at, new_due],
                "reason": reason,
            }
            self._audit(cur, [_batch_entry(actor, "task.reprioritized", [task_id], detail)])
            self._after_submit(cur)
            return self._get(cur, task_id)

    # --- the planner -----------------------------------------------------------------------

    def try_lead(self, holder: str, ttl: float) -> bool:
        """Become (or stay) the one active planner for `ttl` seconds."""
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                "INSERT INTO leader (name, holder, expires_at) VALUES ('planner', ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires_at = excluded.expires_at "
                "WHERE leader.holder = excluded.holder OR leader.expires_at < ?",
                (holder, now + ttl, now),
            )
            return cur.rowcount == 1

    def resign(self, holder: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM leader WHERE name = 'planner' AND holder = ?", (holder,))

    def promote(self) -> int:
        """Pending and retry_wait tasks whose time has come become ready."""
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                "UPDATE tasks SET state = 'ready' WHERE state = 'retry_wait' AND run_at <= ?",
                (now,),
            )
            moved = cur.rowcount
            while True:  # a dead task's dependents die, and theirs, transitively
                cur.execute(
                    "UPDATE tasks SET state = 'dead', finished_at = ?, last_error = "
                    "'dependency ' || (SELECT d.depends_on FROM task_deps d JOIN tasks u "
                    f"ON u.id = d.depends_on WHERE d.task_id = tasks.id AND u.state IN "
                    f"{FAILED_UPSTREAM} LIMIT 1) || ' did not succeed' "
                    "WHERE state = 'pending' AND has_deps = 1 AND EXISTS (SELECT 1 FROM "
                    "task_deps d JOIN tasks u ON u.id = d.depends_on WHERE d.task_id = tasks.id "
                    f"AND u.state IN {FAILED_UPSTREAM})",
                    (now,),
                )
                if cur.rowcount <= 0:
                    break
                moved += cur.rowcount
            cur.execute(
                "UPDATE tasks SET state = 'ready' WHERE state = 'pending' AND release_at <= ? "
                "AND (has_deps = 0 OR NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks u "
                "ON u.id = d.depends_on WHERE d.task_id = tasks.id AND u.state <> 'succeeded'))",
                (now,),
            )
            return moved + cur.rowcount

    def reap(self) -> ReapReport:
        """Take back leases whose holder stopped heartbeating (the one reaper of leases)."""
        with self._tx() as cur:
            now = self._now(cur)
            # Locked (skipping rows a finish or heartbeat is writing right now), so that a
            # result committed while we reap is not turned back into a lost attempt.
            cur.execute(
                "SELECT id, attempt, max_attempts, cancel_requested, lease_token, worker_id, "
                "started_at FROM tasks WHERE state = 'running' AND lease_expires_at < ?"
                f"{self._skip_locked()}",
                (now,),
            )
            expired = cur.fetchall()
            returned = dead = cancelled = 0
            for task_id, attempt, max_attempts, cancel, token, worker, started in expired:
                error = f"lease expired: worker {worker} stopped heartbeating"
                if cancel:
                    state, cancelled = "cancelled", cancelled + 1
                elif attempt >= max_attempts:
                    state, dead = "dead", dead + 1
                    error += f" (attempt {attempt} of {max_attempts})"
                else:
                    state, returned = "ready", returned + 1
                cur.execute(
                    "UPDATE tasks SET state = ?, lease_expires_at = NULL, last_error = ?, "
                    "finished_at = ? WHERE id = ? AND lease_token = ?",
                    (state, error, None if state == "ready" else now, task_id, token),
                )
                cur.execute(
                    "INSERT INTO attempts (task_id, attempt, token, worker_id, started_at, "
                    "finished_at, outcome, error) VALUES (?, ?, ?, ?, ?, ?, 'lost', ?) "
                    "ON CONFLICT DO NOTHING",
                    (task_id, attempt, token, worker, started, now, error),
                )
            cur.execute(
                "UPDATE tasks SET state = 'ready', lease_expires_at = NULL "
                "WHERE state = 'leased' AND lease_expires_at < ?",
                (now,),
            )
            undispatched = cur.rowcount
            if expired:
                ids = [row[0] for row in expired]
                detail = {"returned": returned, "dead": dead, "cancelled": cancelled}
                self._audit(cur, [_batch_entry(SYSTEM, "task.lease_expired", ids, detail)], now)
            if returned or undispatched:
                self._after_submit(cur)
        return ReapReport(returned, dead, cancelled, max(0, undispatched))

    def plan(
        self,
        planner: Planner,
        kinds: Mapping[str, KindSpec],
        ranker: Ranker | None = None,
        provenance: Provenance | None = None,
        expected: ExpectedRuns | None = None,
    ) -> PlanReport:
        """Grant capacity to the ready tasks the planner picks, in one transaction.

        The ready tasks are read earliest deadline first (up to the batch size); a `ranker`
        then orders them, and its ranks become the order in which workers claim them. With
        `expected` (and a ranker), the first task of a full pool gets an EASY reservation from
        the running tasks' expected ends, and each grant keeps its expected run."""
        with self._tx() as cur:
            self._serialise_planners(cur)
            now = self._now(cur)
            cur.execute("SELECT count(*) FROM tasks WHERE state = 'leased'")
            room = self.settings.dispatch_ahead - int(cur.fetchone()[0])
            if room <= 0:
                return PlanReport()
            limit = min(self.settings.plan_batch, 4 * room)

            def read(skip: str) -> str:
                return (
                    f"SELECT {_READY_COLUMNS} FROM tasks WHERE state = 'ready'{skip} "
                    f"ORDER BY due_sort, id LIMIT {limit}"
                )

            cur.execute(read(""))
            rows = [ReadyRow(*row) for row in cur.fetchall()]
            if not rows:
                return PlanReport()
            candidates = [Candidate(*row[:7]) for row in rows]
            reserve = ranker is not None and expected is not None
            view, targets, shared = self._capacity_view(cur, candidates, kinds, now, reserve)
            if len(rows) == limit and not any(_could_start(c, view) for c in candidates):
                # The whole batch waits for full pools or busy keys: read past them (a longer
                # scan, paid only when the head of the queue is stuck like this).
                skip, params = self._dead_ends(cur, kinds)
                cur.execute(read(skip), params)
                rows = [ReadyRow(*row) for row in cur.fetchall()]
                if not rows:
                    return PlanReport()
                candidates = [Candidate(*row[:7]) for row in rows]
                view, targets, shared = self._capacity_view(cur, candidates, kinds, now, reserve)
            if ranker is not None:
                ranks = ranker(rows, view, now)
                runs = expected(rows) if expected is not None else None
                candidates = _reranked(candidates, ranks, runs)
            plan = planner(candidates, view, now, room)
            if plan.starts:
                expires = now + self.settings.dispatch_timeout
                for chunk in _chunks(plan.starts, 2000):  # one statement per chunk
                    values = ", ".join(["(?, ?, CAST(? AS DOUBLE PRECISION))"] * len(chunk))
                    cur.execute(
                        f"WITH v (id, rank, expected) AS (VALUES {values}) UPDATE tasks SET "
                        "state = 'leased', rank = v.rank, lease_expires_at = ?, "
                        "expected_s = v.expected "
                        "FROM v WHERE tasks.id = v.id AND tasks.state = 'ready'",
                        [*(x for c in chunk for x in (c.id, c.rank, c.expected)), expires],
                    )
                ids = [c.id for c in plan.starts]
                made = provenance(ids) if provenance is not None else {}
                detail = {**made, "ranks": [c.rank for c in plan.starts]}
                self._audit(cur, [_batch_entry(SYSTEM, "task.granted", ids, detail)], now)
                probes = {c.target for c in plan.starts} & {
                    t for t, s in targets.items() if s.breaker == "open"
                }
                if probes:
                    clause, params = self._in("target", sorted(probes))
                    cur.execute(f"UPDATE targets SET breaker = 'half_open' WHERE {clause}", params)
                self._after_plan(cur)
            if plan.buckets:
                cur.executemany(
                    "INSERT INTO rate_buckets (key, tokens, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET tokens = excluded.tokens, "
                    "updated_at = excluded.updated_at",
                    [(shared.get(k, k), b.tokens, b.updated_at) for k, b in plan.buckets.items()],
                )
        started = tuple(c.id for c in plan.starts)
        return PlanReport(len(candidates), len(plan.starts), plan.blocked, plan.wake_in, started)

    def _dead_ends(self, cur: Cursor, kinds: Mapping[str, KindSpec]) -> tuple[str, list[Any]]:
        """A condition that leaves out of a pass the ready tasks that cannot start whatever
        the order: those of a pool with no unit free, and those whose concurrency key is busy
        (looked up only when a kind has a key). Read when a whole batch is stuck: without it,
        a batch filled by one full pool's (or one key's) backlog, earliest due first, would
        keep every other pool's tasks waiting behind it."""
        cur.execute("SELECT name, capacity FROM pools WHERE capacity IS NOT NULL")
        capacity = {str(name): int(cap) for name, cap in cur.fetchall()}
        condition = ""
        if any(kind.concurrency_key is not None for kind in kinds.values()):
            condition = (
                " AND (concurrency_key IS NULL OR concurrency_key NOT IN (SELECT "
                f"concurrency_key FROM tasks WHERE state IN {ACTIVE} AND concurrency_key IS "
                "NOT NULL))"
            )
        if not capacity:
            return condition, []
        cur.execute(f"SELECT pool, sum(units) FROM tasks WHERE state IN {ACTIVE} GROUP BY pool")
        used = {str(pool): int(units) for pool, units in cur.fetchall()}
        full = sorted(p for p, cap in capacity.items() if used.get(p, 0) >= cap)
        if not full:
            return condition, []
        clause, params = self._in("pool", full)
        return f" AND NOT ({clause}){condition}", params

    def _capacity_view(
        self,
        cur: Cursor,
        candidates: list[Candidate],
        kinds: Mapping[str, KindSpec],
        now: float,
        reserve: bool = False,
    ) -> tuple[CapacityView, dict[str, TargetState], dict[str, str]]:
        """What is in use, read only for the pools, keys and targets that can block someone;
        and the kinds' buckets that are a global rate shared with edge sites (the planner's
        key → the shared bucket's key, where what it takes goes back). With `reserve`, also
        when the tasks holding each bounded pool's units are expected to end: when each started
        (now, if granted but not claimed yet) plus the run expected at its grant; unknown (a
        grant made without one) sorts last."""
        cur.execute("SELECT name, capacity FROM pools")
        capacity = {row[0]: row[1] for row in cur.fetchall()}
        bounded = sorted({c.pool for c in candidates if capacity.get(c.pool) is not None})
        used: dict[str, int] = {}
        ends: dict[str, list[tuple[float, int]]] = {}
        if bounded and reserve:
            clause, params = self._in("pool", bounded)
            cur.execute(
                "SELECT pool, units, CASE WHEN state = 'running' THEN started_at ELSE ? END "
                f"+ expected_s FROM tasks WHERE state IN {ACTIVE} AND {clause}",
                [now, *params],
            )
            for pool, units, end in cur.fetchall():
                used[pool] = used.get(pool, 0) + int(units)
                ends.setdefault(pool, []).append((math.inf if end is None else end, int(units)))
            for found in ends.values():
                found.sort()
        elif bounded:
            clause, params = self._in("pool", bounded)
            cur.execute(
                f"SELECT pool, sum(units) FROM tasks WHERE state IN {ACTIVE} AND {clause} "
                "GROUP BY pool",
                params,
            )
            used = {row[0]: int(row[1]) for row in cur.fetchall()}
        keys = sorted({c.concurrency_key for c in candidates if c.concurrency_key is not None})
        busy: set[str] = set()
        if keys:
            clause, params = self._in("concurrency_key", keys)
            cur.execute(
                f"SELECT concurrency_key FROM tasks WHERE state IN {ACTIVE} AND {clause}", params
            )
            busy = {row[0] for row in cur.fetchall()}
        targets = self._targets(cur)
        cooldown = {k.target: k.breaker_cooldown for k in kinds.values()}
        ceiling: dict[str, int] = {}
        for k in kinds.values():
            if k.max_concurrency is not None:
                ceiling[k.target] = min(k.max_concurrency, ceiling.get(k.target, k.max_concurrency))
        allowed = {
            t: allowed_in_flight(targets.get(t), now, cooldown.get(t, 30.0))
            for t in targets.keys() | ceiling.keys()
        }
        for t, most in ceiling.items():  # a hard ceiling; adaptive with no result yet: at it
            now_allowed = allowed[t]
            allowed[t] = most if now_allowed is None else min(now_allowed, most)
        limited = sorted(t for t, n in allowed.items() if n is not None)
        in_flight: dict[str, int] = {}
        if limited:
            clause, params = self._in("target", limited)
            cur.execute(
                f"SELECT target, count(*) FROM tasks WHERE state IN {ACTIVE} AND {clause} "
                "GROUP BY target",
                params,
            )
            in_flight = {row[0]: int(row[1]) for row in cur.fetchall()}
        limits = {
            k.name: KindLimits(k.rate.per_second, k.rate.burst)
            for k in kinds.values()
            if k.rate is not None
        }
        buckets: dict[str, Bucket] = {}
        shared: dict[str, str] = {}
        if limits:
            cur.execute("SELECT key, tokens, updated_at FROM rate_buckets")
            buckets = {row[0]: Bucket(row[1], row[2]) for row in cur.fetchall()}
            shared = self._shared_rates(cur, limits, buckets, now)
        view = CapacityView(capacity, used, busy, in_flight, allowed, buckets, limits)
        view.reserve, view.running_ends = reserve, ends
        return view, targets, shared

    # --- schedules ------------------------------------------------------------------------

    def save_schedule(self, name: str, spec: Mapping[str, Any], paused: bool) -> None:
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                "INSERT INTO schedules (name, spec, paused, last_tick, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, "
                "paused = excluded.paused",
                (name, json.dumps(spec), int(paused), now, now),
            )

    def schedules(self) -> list[ScheduleRow]:
        with self._read() as cur:
            cur.execute(
                "SELECT name, spec, paused, last_tick, buffered_tick FROM schedules ORDER BY name"
            )
            return [
                ScheduleRow(row[0], json.loads(row[1]), bool(row[2]), row[3], row[4])
                for row in cur.fetchall()
            ]

    def set_schedule_paused(self, name: str, paused: bool) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE schedules SET paused = ? WHERE name = ?", (int(paused), name))
            if cur.rowcount != 1:
                raise NotFound(f"no schedule is named {name!r}")

    def delete_schedule(self, name: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM schedules WHERE name = ?", (name,))
            if cur.rowcount != 1:
                raise NotFound(f"no schedule is named {name!r}")

    def schedule_unfinished(self, name: str) -> list[str]:
        """Ids of this schedule's tasks that have not reached a final state."""
        with self._read() as cur:
            cur.execute(
                "SELECT id FROM tasks WHERE schedule = ? AND state IN "
                "('pending', 'awaiting_approval', 'ready', 'leased', 'running', 'retry_wait', "
                "'deferred', 'held') ORDER BY id",
                (name,),
            )
            return [row[0] for row in cur.fetchall()]

    def advance_schedule(self, name: str, last_tick: float, buffered_tick: float | None) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE schedules SET last_tick = ?, buffered_tick = ? WHERE name = ?",
                (last_tick, buffered_tick, name),
            )
            if cur.rowcount != 1:
                raise NotFound(f"no schedule is named {name!r}")

    # --- workers ---------------------------------------------------------------------------

    def register_worker(self, worker_id: str, host: str, pid: int, kinds: Sequence[str]) -> None:
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                "INSERT INTO workers (id, host, pid, kinds, started_at, seen_at) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
                (worker_id, host, pid, json.dumps(sorted(kinds)), now, now),
            )

    def claim(self, worker_id: str, kinds: Sequence[str], limit: int) -> list[Claim]:
        """Take up to `limit` granted tasks of these kinds; each gets a new fencing token."""
        with self._tx() as cur:
            return self._claim(cur, self._now(cur), worker_id, kinds, limit)

    def trace_contexts(self, task_ids: Sequence[str]) -> dict[str, str]:
        """The stored traceparent of each of these tasks that has one."""
        if not task_ids:
            return {}
        clause, params = self._in("id", list(task_ids))
        with self._read() as cur:
            cur.execute(
                f"SELECT id, trace_context FROM tasks WHERE {clause} AND trace_context IS NOT NULL",
                params,
            )
            return {row[0]: row[1] for row in cur.fetchall()}

    def finish_and_claim(
        self,
        worker_id: str,
        finishes: Sequence[Finish],
        kinds: Mapping[str, KindSpec],
        claim_kinds: Sequence[str],
        limit: int,
    ) -> tuple[list[bool], list[Claim]]:
        """`finish` then `claim` in one transaction: a worker's loop costs one commit."""
        if not finishes and not self._has_granted(claim_kinds):
            return [], []  # an idle poll reads (no write lock, no commit) and goes back to wait
        with self._tx() as cur:
            now = self._now(cur)
            accepted = self._finish(cur, now, worker_id, finishes, kinds) if finishes else []
            claims = self._claim(cur, now, worker_id, claim_kinds, limit) if limit > 0 else []
            return accepted, claims

    def _has_granted(self, kinds: Sequence[str]) -> bool:
        clause, params = self._in("kind", list(kinds))
        with self._read() as cur:
            cur.execute(f"SELECT 1 FROM tasks WHERE state = 'leased' AND {clause} LIMIT 1", params)
            return cur.fetchone() is not None

    def _claim(
        self, cur: Cursor, now: float, worker_id: str, kinds: Sequence[str], limit: int
    ) -> list[Claim]:
        clause, params = self._in("kind", list(kinds))
        cur.execute(
            "UPDATE tasks SET state = 'running', worker_id = ?, "
            "lease_token = lease_token + 1, attempt = attempt + 1, started_at = ?, "
            "lease_expires_at = ? WHERE id IN (SELECT id FROM tasks WHERE state = 'leased' "
            f"AND {clause} ORDER BY rank, id LIMIT {int(limit)}{self._skip_locked()}) "
            "RETURNING id, kind, payload, lease_token, attempt, rank, trace_context",
            [worker_id, now, now + self.settings.lease_seconds, *params],
        )
        rows = cur.fetchall()
        # RETURNING keeps no order: hand the batch over in the planner's order.
        rows.sort(key=lambda row: (row[5], row[0]))
        return [Claim._make((*row[:5], row[6])) for row in rows]

    def heartbeat(self, worker_id: str) -> HeartbeatReply:
        """Extend this worker's leases; say which it still holds and which to cancel."""
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                "UPDATE tasks SET lease_expires_at = ? WHERE state = 'running' AND worker_id = ?",
                (now + self.settings.lease_seconds, worker_id),
            )
            cur.execute(
                "SELECT id, lease_token, cancel_requested FROM tasks "
                "WHERE state = 'running' AND worker_id = ?",
                (worker_id,),
            )
            rows = cur.fetchall()
            cur.execute("UPDATE workers SET seen_at = ? WHERE id = ?", (now, worker_id))
        return HeartbeatReply(
            {row[0]: int(row[1]) for row in rows}, frozenset(row[0] for row in rows if row[2])
        )

    def finish(
        self, worker_id: str, finishes: Sequence[Finish], kinds: Mapping[str, KindSpec]
    ) -> list[bool]:
        """Record results. A result whose lease token is stale is refused (fencing)."""
        if not finishes:
            return []
        with self._tx() as cur:
            return self._finish(cur, self._now(cur), worker_id, finishes, kinds)

    def _finish(
        self,
        cur: Cursor,
        now: float,
        worker_id: str,
        finishes: Sequence[Finish],
        kinds: Mapping[str, KindSpec],
    ) -> list[bool]:
        fenced = self.settings.fencing
        guard = " AND tasks.lease_token = v.token AND tasks.state = 'running'" if fenced else ""
        accepted: set[tuple[str, int]] = set()
        wins = [f.result for f in finishes if f.result.ok]
        for chunk in _chunks(wins, 400):
            values = ", ".join(["(?, ?)"] * len(chunk))
            cur.execute(
                f"WITH v (id, token) AS (VALUES {values}) UPDATE tasks SET "
                "state = 'succeeded', finished_at = ?, lease_expires_at = NULL, "
                "last_error = NULL, last_traceback = NULL "
                f"FROM v WHERE tasks.id = v.id{guard} RETURNING tasks.id",
                [*(x for r in chunk for x in (r.task_id, r.token)), now],
            )
            ok_ids = {row[0] for row in cur.fetchall()}
            accepted.update((r.task_id, r.token) for r in chunk if r.task_id in ok_ids)
        ended: dict[str, list[str]] = {"succeeded": [i for i, _ in sorted(accepted)]}
        for f in finishes:
            state = None if f.result.ok else self._record_failure(cur, f, now, fenced)
            if state is not None:
                accepted.add((f.result.task_id, f.result.token))
                ended.setdefault(state, []).append(f.result.task_id)
        outcomes = [f for f in finishes if (f.result.task_id, f.result.token) in accepted]
        # A conflict only comes from a late result accepted without fencing: what the
        # worker reports replaces the reaper's 'lost'.
        cur.executemany(
            "INSERT INTO attempts (task_id, attempt, token, worker_id, started_at, "
            "finished_at, outcome, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (task_id, token) DO UPDATE SET worker_id = excluded.worker_id, "
            "finished_at = excluded.finished_at, outcome = excluded.outcome, "
            "error = excluded.error",
            [
                (
                    f.result.task_id,
                    f.attempt,
                    f.result.token,
                    worker_id,
                    f.result.started_at,
                    now,
                    _outcome(f.result),
                    f.result.error,
                )
                for f in outcomes
            ],
        )
        self._update_targets(cur, outcomes, kinds, now)
        if outcomes:
            worker = Actor(worker_id, SYSTEM.role)
            ids = [f.result.task_id for f in outcomes]
            detail = {state: ids for state, ids in ended.items() if ids}
            self._audit(cur, [_batch_entry(worker, "task.finished", ids, detail)], now)
        if any(not f.result.ok for f in outcomes):
            self._after_submit(cur)
        return [(f.result.task_id, f.result.token) in accepted for f in finishes]

    def _record_failure(self, cur: Cursor, finish: Finish, now: float, fenced: bool) -> str | None:
        """The state a failed attempt leaves its task in; None when the result is refused."""
        r = finish.result
        if r.cancelled:
            state, run_at = "cancelled", None
        elif finish.retry_delay is None:
            state, run_at = "dead", None
        else:
            state, run_at = "retry_wait", now + finish.retry_delay
        guard = " AND lease_token = ? AND state = 'running'" if fenced else ""
        cur.execute(
            "UPDATE tasks SET state = ?, run_at = ?, last_error = ?, last_traceback = ?, "
            f"lease_expires_at = NULL, finished_at = ? WHERE id = ?{guard}",
            [
                state,
                run_at,
                r.error,
                r.traceback,
                None if state == "retry_wait" else now,
                r.task_id,
                *([r.token] if fenced else []),
            ],
        )
        if cur.rowcount != 1:
            return None
        if state == "retry_wait":  # an operator asked to cancel: no retry
            cur.execute(
                "UPDATE tasks SET state = 'cancelled', run_at = NULL, finished_at = ? "
                "WHERE id = ? AND cancel_requested = 1",
                (now, r.task_id),
            )
            if cur.rowcount == 1:
                return "cancelled"
        return state

    def _update_targets(
        self, cur: Cursor, outcomes: Sequence[Finish], kinds: Mapping[str, KindSpec], now: float
    ) -> None:
        by_target: dict[str, list[tuple[KindSpec, Finish]]] = {}
        for f in outcomes:
            kind = kinds.get(f.kind)
            if kind is None or f.result.cancelled:
                continue
            if kind.breaker_threshold <= 0 and kind.max_concurrency is None:
                continue
            by_target.setdefault(kind.target, []).append((kind, f))
        if not by_target:
            return
        states = self._targets(cur)
        for target, items in by_target.items():
            state = states.get(target, TargetState(target))
            if state == TargetState(target) and all(
                f.result.ok and k.max_concurrency is None for k, f in items
            ):
                continue  # healthy and not adaptive: successes change nothing
            ceiling = min(
                (float(k.max_concurrency) for k, _ in items if k.max_concurrency is not None),
                default=math.inf,
            )
            limit_before = ceiling if state.limit is None else state.limit
            for kind, f in items:
                state = after_result(
                    state,
                    ok=f.result.ok,
                    overloaded=f.result.overloaded,
                    latency=f.result.duration,
                    now=now,
                    threshold=kind.breaker_threshold,
                    max_concurrency=kind.max_concurrency,
                )
            cur.execute(
                "INSERT INTO targets (target, breaker, consecutive_failures, opened_at, "
                "concurrency_limit, latency_floor) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (target) DO UPDATE SET breaker = excluded.breaker, "
                "consecutive_failures = excluded.consecutive_failures, "
                "opened_at = excluded.opened_at, concurrency_limit = excluded.concurrency_limit, "
                "latency_floor = excluded.latency_floor",
                dataclasses.astuple(state),
            )
            if state.breaker == "open" or (state.limit is not None and state.limit < limit_before):
                # Take back the grants no worker has claimed yet: the planner grants them again
                # within the new limits, so a burst granted before the failures cannot all run.
                cur.execute(
                    "UPDATE tasks SET state = 'ready', lease_expires_at = NULL "
                    "WHERE state = 'leased' AND target = ?",
                    (target,),
                )


def _could_start(candidate: Candidate, view: CapacityView) -> bool:
    """Whether capacity and concurrency keys leave `candidate` any chance in this pass."""
    cap = view.pool_capacity.get(candidate.pool)
    if cap is not None and view.pool_used.get(candidate.pool, 0) + candidate.units > cap:
        return False
    return candidate.concurrency_key is None or candidate.concurrency_key not in view.busy_keys


def _batch_entry(
    actor: Actor, action: str, task_ids: Sequence[str], detail: Mapping[str, Any]
) -> Entry:
    """One record for a transaction's tasks: its subject is the task, or the first of them."""
    subject = task_ids[0] if len(task_ids) == 1 else f"{task_ids[0]} +{len(task_ids) - 1}"
    extra = {"bootstrap": True} if actor.bootstrap else {}
    return Entry(actor.name, action, subject, {**detail, **extra, "tasks": list(task_ids)})


def _reranked(
    candidates: list[Candidate],
    ranks: Sequence[float],
    expected: Sequence[float] | None = None,
) -> list[Candidate]:
    """Candidates in rank order, ties by deadline (as read), with ranks made strictly
    increasing so that workers claim in exactly this order, and with their `expected` runs if
    given. A rank of +inf keeps the task waiting this pass (deferred by the decision service)."""
    order = sorted(
        (k for k in range(len(candidates)) if ranks[k] != math.inf), key=lambda k: (ranks[k], k)
    )
    result = []
    previous = -math.inf
    for k in order:
        rank = max(float(ranks[k]), math.nextafter(previous, math.inf))
        if expected is None:
            result.append(candidates[k]._replace(rank=rank))
        else:
            result.append(candidates[k]._replace(rank=rank, expected=float(expected[k])))
        previous = rank
    return result


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _outcome(result: Any) -> str:
    if result.ok:
        return "succeeded"
    if result.cancelled:
        return "cancelled"
    return "timeout" if result.timed_out else "failed"


def _task_row(task_id: str, task: NewTask, kind: KindSpec, now: float) -> tuple[Any, ...]:
    # Numbers as floats: PostgreSQL's bulk insert sends each column as one typed array.
    release_at = now if task.release_at is None else float(task.release_at)
    due_at = None if task.due_at is None else float(task.due_at)
    estimate = None if task.estimate is None else float(task.estimate)
    if due_at is not None and due_at < release_at:
        raise InvalidInput("due_at is before release_at")
    resources = dict(task.resources or {kind.pool: kind.units})
    if len(resources) != 1:
        raise InvalidInput("a task uses units of exactly one pool (several are not supported yet)")
    ((pool, units),) = resources.items()
    try:
        payload = _ENCODER.encode(task.payload)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"payload is not JSON: {exc}") from None
    state = "pending" if (release_at > now or task.depends_on) else "ready"
    due_sort = NO_DUE if due_at is None else due_at
    return (
        task_id,
        task.kind,
        payload,
        state,
        now,
        release_at,
        due_at,
        due_sort,
        float(task.weight),
        estimate,
        kind.retry.max_attempts,
        task.tenant,
        task.source,
        task.idempotency_key,
        pool,
        units,
        kind.concurrency_value(task.payload),
        kind.target,
        _ENCODER.encode(list(task.tags)) if task.tags else "[]",
        1 if task.depends_on else 0,
        due_sort,
        task.schedule,
        task.trace_context,
    )


def _outcome_row(row: Sequence[Any]) -> OutcomeRow:
    payload = json.loads(row[2])
    return OutcomeRow(
        task_id=row[0],
        kind=row[1],
        payload=payload if isinstance(payload, dict) else {},
        created_at=float(row[3]),
        release_at=float(row[4]),
        due_at=None if row[5] is None else float(row[5]),
        weight=float(row[6]),
        estimate=None if row[7] is None else float(row[7]),
        pool=row[8],
        units=int(row[9]),
        tenant=row[10],
        attempt=int(row[11]),
        started_at=float(row[12]),
        finished_at=float(row[13]),
        outcome=row[14],
    )


def task_from_row(row: Sequence[Any], deps: tuple[str, ...] = ()) -> Task:
    return Task(
        id=row[0],
        kind=row[1],
        payload=json.loads(row[2]),
        state=TaskState(row[3]),
        created_at=row[4],
        release_at=row[5],
        due_at=row[6],
        weight=row[7],
        estimate=row[8],
        attempt=row[9],
        tenant=row[10],
        source=row[11],
        idempotency_key=row[12],
        pool=row[13],
        units=row[14],
        concurrency_key=row[15],
        target=row[16],
        tags=tuple(json.loads(row[17])),
        run_at=row[18],
        lease_token=row[19],
        lease_expires_at=row[20],
        worker_id=row[21],
        last_error=row[22],
        last_traceback=row[23],
        cancel_requested=bool(row[24]),
        finished_at=row[25],
        trace_context=row[26],
        depends_on=deps,
    )


def kind_to_json(kind: KindSpec) -> dict[str, Any]:
    data = asdict(kind)
    data["command"] = list(kind.command) if kind.command else None
    return data


def kind_from_json(data: dict[str, Any]) -> KindSpec:
    data = dict(data)
    data["retry"] = RetryPolicy(**data["retry"])
    data["rate"] = RateLimit(**data["rate"]) if data.get("rate") else None
    data["command"] = tuple(data["command"]) if data.get("command") else None
    return KindSpec(**data)
