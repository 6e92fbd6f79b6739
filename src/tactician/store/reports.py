"""The KPI report's reads: what ended, fell due, waited, was decided and done by hand in a window.

A mixin of `SqlStore`, read-only. Every query is bounded by the window through an index (the
ones on `finished_at` and `due_at` come with migration 0008; the audit chain's is on `at`) and
counts per bucket in the database, so a report over a busy week reads counts, not tasks.

A bucket is `floor((t - origin) / step)` on a `Grid`: the caller aligns `origin` (to the hour or
the day), and the window cuts the first and the last bucket. Times are the database's clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from tactician.errors import InvalidInput
from tactician.govern.audit import AuditRecord
from tactician.store.mixin import StoreMixin

FINAL = "('succeeded', 'dead', 'cancelled', 'rejected', 'merged', 'expired')"
WITHDRAWN = "('cancelled', 'rejected', 'merged')"
"""Ends a person chose (an operator's cancel, an approver's reject, a merge into another task)."""
ID_SLACK_MS = 1000
"""Ids begin with their creation time in ms (tactician.ids); a range of ids this much wider
than the window is read, then filtered on created_at (a clock step back shifts an id a little)."""


@dataclass(frozen=True)
class Grid:
    """A window [since, until) cut into buckets of `step` seconds counted from `origin`."""

    since: float
    until: float
    origin: float
    step: float

    def __post_init__(self) -> None:
        for name in ("since", "until", "origin", "step"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidInput(f"report window: {name} must be a finite time")
        if self.until <= self.since:
            raise InvalidInput("report window: since must be before until")
        if self.step <= 0 or self.origin > self.since:
            raise InvalidInput("report window: buckets must start at or before the window")

    @property
    def count(self) -> int:
        return max(1, math.ceil((self.until - self.origin) / self.step))

    def index(self, at: float) -> int | None:
        """The bucket of a time, None outside the window."""
        if not self.since <= at < self.until:
            return None
        return min(self.count - 1, math.floor((at - self.origin) / self.step))

    def start(self, i: int) -> float:
        return max(self.since, self.origin + i * self.step)

    def end(self, i: int) -> float:
        return min(self.until, self.origin + (i + 1) * self.step)


class EndedRow(NamedTuple):
    """Tasks that reached a final state in one bucket."""

    bucket: int
    state: str
    tasks: int
    with_deadline: int
    by_deadline: int
    """Of those with a deadline, how many ended at or before it."""


class MissedRow(NamedTuple):
    """Tasks whose deadline fell in one bucket and that had not succeeded (nor been withdrawn)
    by it, by kind and by the state they are in now."""

    bucket: int
    kind: str
    state: str
    tasks: int


class CountRow(NamedTuple):
    bucket: int
    key: str
    records: int


@dataclass(frozen=True)
class QueueCounts:
    """Tasks submitted and not yet started: waiting at the window's start; per bucket, how many
    more joined the queue than left it (left: first started, or ended without ever starting)
    and the most waiting at any moment of it, both less those waiting at the window's start.
    A bucket where none joined or left has no entry."""

    waiting_at_start: int
    change: Mapping[int, int]
    peak: Mapping[int, int]


@dataclass(frozen=True)
class Waits:
    """Wait (first start - release_at) of the tasks that ended in the window having started."""

    count: int
    p50: float | None
    p95: float | None
    """Nearest rank, as the simulator's metrics take it."""


@dataclass(frozen=True)
class Grant:
    """A planning pass's start decisions: its audit record's time and detail (the ranks left
    out): `tasks`, and what ranked them (`policy`, `model`, `scorer`, `fallback`, ...)."""

    at: float
    detail: Mapping[str, Any]


class ReportStore(Protocol):
    """What the KPI report reads (`tactician.observe.report`)."""

    def db_now(self) -> float: ...

    def report_ended(self, grid: Grid) -> list[EndedRow]: ...

    def report_missed(self, grid: Grid, now: float) -> list[MissedRow]: ...

    def report_actions(
        self, grid: Grid, actions: Sequence[str], *, people_only: bool = False
    ) -> list[CountRow]: ...

    def report_queue(self, grid: Grid) -> QueueCounts: ...

    def report_waits(self, grid: Grid) -> Waits: ...

    def report_grants(self, grid: Grid) -> list[Grant]: ...

    def audit_between(
        self, since: float, until: float, actions: Sequence[str]
    ) -> list[AuditRecord]: ...


# First start: the earliest recorded attempt (attempts are written as they end), else the one
# running now. A task that never started has neither.
_FIRST_START = (
    "coalesce((SELECT min(a.started_at) FROM attempts a WHERE a.task_id = t.id), t.started_at)"
)
# `action || ''` keeps SQLite on the index on `at`: with the one on (action, seq) it would read
# every record of those actions ever written, not the window's.
_ACTION = "action || ''"


class ReportsMixin(StoreMixin):
    def _bucket(self, column: str) -> str:
        """SQL for the bucket of `column` (its two parameters: origin, step). The value is at or
        after the origin, so SQLite's truncating cast is a floor; PostgreSQL's cast rounds."""
        if self.dialect == "postgres":
            return f"floor(({column} - ?) / ?)::bigint"
        return f"CAST(({column} - ?) / ? AS INTEGER)"

    def report_ended(self, grid: Grid) -> list[EndedRow]:
        """Tasks that ended in the window, per bucket and final state (index on finished_at)."""
        with self._read() as cur:
            cur.execute(
                f"SELECT {self._bucket('finished_at')}, state, count(*), "
                "sum(CASE WHEN due_at IS NOT NULL THEN 1 ELSE 0 END), "
                "sum(CASE WHEN due_at IS NOT NULL AND finished_at <= due_at THEN 1 ELSE 0 END) "
                f"FROM tasks WHERE finished_at >= ? AND finished_at < ? AND state IN {FINAL} "
                "GROUP BY 1, 2",
                (grid.origin, grid.step, grid.since, grid.until),
            )
            rows = cur.fetchall()
        return [EndedRow(int(b), s, int(n), int(d or 0), int(k or 0)) for b, s, n, d, k in rows]

    def report_missed(self, grid: Grid, now: float) -> list[MissedRow]:
        """Deadlines that fell in the window (up to `now`) and were missed: the task had not
        succeeded by then and was not withdrawn before it (index on due_at)."""
        until = min(grid.until, now)
        if until <= grid.since:
            return []
        with self._read() as cur:
            cur.execute(
                f"SELECT {self._bucket('due_at')}, kind, state, count(*) FROM tasks "
                "WHERE due_at >= ? AND due_at < ? AND NOT (finished_at IS NOT NULL AND "
                f"finished_at <= due_at AND state IN ('succeeded', {WITHDRAWN[1:-1]})) "
                "GROUP BY 1, 2, 3",
                (grid.origin, grid.step, grid.since, until),
            )
            return [MissedRow(int(b), k, s, int(n)) for b, k, s, n in cur.fetchall()]

    def report_actions(
        self, grid: Grid, actions: Sequence[str], *, people_only: bool = False
    ) -> list[CountRow]:
        """Audit records of `actions` per bucket and action (index on at). `people_only` leaves
        out the engine's own records and those of ingestion sources, as `metrics_snapshot`
        does when it counts manual interventions."""
        if not actions:
            return []
        clause, params = self._in(_ACTION, list(actions))
        people = " AND actor <> 'tactician' AND actor NOT LIKE ?" if people_only else ""
        with self._read() as cur:
            cur.execute(
                f"SELECT {self._bucket('at')}, action, count(*) FROM audit_log "
                f"WHERE at >= ? AND at < ? AND {clause}{people} GROUP BY 1, 2",
                [grid.origin, grid.step, grid.since, grid.until, *params]
                + (["source:%"] if people_only else []),
            )
            return [CountRow(int(b), a, int(n)) for b, a, n in cur.fetchall()]

    def report_queue(self, grid: Grid) -> QueueCounts:
        """Who waited in the window, from the tasks that can have: those created in it (by id),
        those that ended since its start (index on finished_at) and those not ended yet (the
        partial index of each waiting or running state). No other task can have waited then."""
        low = f"{max(0, math.floor(grid.since * 1000) - ID_SLACK_MS):012x}"
        high = f"{math.floor(grid.until * 1000) + ID_SLACK_MS:012x}"
        # Three disjoint parts (no de-duplication): created in the window; created before it
        # and ended since its start; created before it and not ended.
        not_ended = " AND t.created_at < ? AND (t.finished_at IS NULL OR t.finished_at < ?)"
        states = (
            "'pending'",
            "'awaiting_approval'",
            "'ready'",
            "('leased', 'running')",
            "'retry_wait'",
            "'held'",
        )
        parts = [
            "WHERE t.id >= ? AND t.id < ? AND t.created_at >= ? AND t.created_at < ?",
            "WHERE t.finished_at >= ? AND t.created_at < ?",
            *(f"WHERE t.state {'IN' if v[0] == '(' else '='} {v}{not_ended}" for v in states),
        ]
        select = f"SELECT t.created_at, coalesce({_FIRST_START}, t.finished_at) FROM tasks t "
        waited = (
            "WITH w (joined_at, left_at) AS MATERIALIZED ("
            + " UNION ALL ".join(select + part for part in parts)
            + ") "
        )
        head = [low, high, grid.since, grid.until, grid.since, grid.since]
        head += [grid.since, grid.since] * len(states)
        # Joining and leaving in time order; their running sum, highest in each bucket, is the
        # peak (a task leaving at the moment another joins is counted out first).
        moves = (
            "SELECT joined_at AS at, 1 AS move FROM w WHERE joined_at >= ? UNION ALL "
            "SELECT left_at, -1 FROM w WHERE left_at >= ? AND left_at < ?"
        )
        running = (
            f"SELECT {self._bucket('at')} AS bucket, move, sum(move) OVER (ORDER BY at, move "
            f"ROWS UNBOUNDED PRECEDING) AS depth FROM ({moves}) m"
        )
        with self._read() as cur:
            cur.execute(
                f"{waited}SELECT -1, count(*), 0 FROM w WHERE joined_at < ? AND "
                "(left_at IS NULL OR left_at >= ?) "
                f"UNION ALL SELECT bucket, sum(move), max(depth) FROM ({running}) r GROUP BY 1",
                [
                    *head,
                    *(grid.since, grid.since),
                    *(grid.origin, grid.step, grid.since, grid.since, grid.until),
                ],
            )
            rows = cur.fetchall()
        waiting = sum(int(n) for bucket, n, _ in rows if bucket == -1)
        change = {int(b): int(n) for b, n, _ in rows if b != -1}
        peak = {int(b): int(p) for b, _, p in rows if b != -1}
        return QueueCounts(waiting, change, peak)

    def report_waits(self, grid: Grid) -> Waits:
        """p50 and p95 of the wait, ranked in the database in one pass (two rows come back)."""
        waits = (
            f"SELECT {_FIRST_START} - t.release_at AS wait FROM tasks t WHERE "
            f"t.finished_at >= ? AND t.finished_at < ? AND t.state IN {FINAL}"
        )
        ranked = (
            "SELECT wait, row_number() OVER (ORDER BY wait) AS nth, count(*) OVER () AS n "
            f"FROM ({waits}) s WHERE wait IS NOT NULL"
        )
        with self._read() as cur:
            # Nearest rank: ceil(n p / 100) in integers.
            cur.execute(
                f"SELECT nth, n, wait FROM ({ranked}) r WHERE nth = (n * 50 + 99) / 100 "
                "OR nth = (n * 95 + 99) / 100",
                (grid.since, grid.until),
            )
            rows = cur.fetchall()
        if not rows:
            return Waits(0, None, None)
        count = int(rows[0][1])
        at = {int(nth): max(0.0, float(wait)) for nth, _, wait in rows}
        return Waits(count, at[(count * 50 + 99) // 100], at[(count * 95 + 99) // 100])

    def report_grants(self, grid: Grid) -> list[Grant]:
        """The window's `task.granted` records, in chain order, without their ranks."""
        if self.dialect == "postgres":
            detail = "(detail::jsonb - 'ranks')::text"
        else:
            detail = "json_remove(detail, '$.ranks')"
        with self._read() as cur:
            cur.execute(
                f"SELECT at, {detail} FROM audit_log WHERE at >= ? AND at < ? "
                f"AND {_ACTION} = 'task.granted' ORDER BY seq",
                (grid.since, grid.until),
            )
            rows = cur.fetchall()
        grants = []
        for at, text in rows:
            value = json.loads(text)
            grants.append(Grant(float(at), value if isinstance(value, dict) else {}))
        return grants

    def audit_between(
        self, since: float, until: float, actions: Sequence[str]
    ) -> list[AuditRecord]:
        """Records of `actions` written in [since, until), in chain order. For the rare actions
        it is used for (overrides, drift), by the index on (action, seq) where there is one:
        `since` may be long ago (when the task of a recent start was created)."""
        if not actions:
            return []
        clause, params = self._in("action", list(actions))
        with self._read() as cur:
            cur.execute(
                "SELECT seq, at, actor, action, subject, detail, prev_hash, hash FROM audit_log "
                f"WHERE at >= ? AND at < ? AND {clause} ORDER BY seq",
                [since, until, *params],
            )
            return [AuditRecord(*row) for row in cur.fetchall()]
