"""The sums of what each process counted in memory (`tactician.observe.counters`).

A mixin of `SqlStore`. A flush adds a process's deltas in one transaction, upserting each row
(name, labels, bucket) in key order, so concurrent flushes of several processes add up and never
deadlock. `dispatch_delays` is read at a worker's flush: how long each task it claimed had been
ready when it was claimed, from the task's row, with the database's clock on both ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tactician.store.mixin import Cursor, StoreMixin

if TYPE_CHECKING:
    pass

CHUNK = 500
"""Task ids per lookup statement."""


class CountersMixin(StoreMixin):
    def add_counters(self, rows: Sequence[tuple[str, str, str, float]]) -> None:
        """Add (name, labels, bucket, delta) rows to the running sums, in one transaction."""
        if not rows:
            return
        with self._tx() as cur:
            self._add_counters(cur, rows, self._now(cur))

    def _add_counters(
        self, cur: Cursor, rows: Sequence[tuple[str, str, str, float]], now: float
    ) -> None:
        """`add_counters` inside the caller's transaction (in key order: no deadlock)."""
        cur.executemany(
            "INSERT INTO metric_counters (name, labels, bucket, value, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name, labels, bucket) DO UPDATE SET "
            "value = metric_counters.value + excluded.value, "
            "updated_at = excluded.updated_at",
            [
                (name, labels, bucket, float(value), now)
                for name, labels, bucket, value in sorted(rows)
            ],
        )

    def counter_values(self) -> list[tuple[str, str, str, float]]:
        """Every (name, labels, bucket, sum) row, in key order."""
        with self._read() as cur:
            cur.execute(
                "SELECT name, labels, bucket, value FROM metric_counters "
                "ORDER BY name, labels, bucket"
            )
            return [(row[0], row[1], row[2], float(row[3])) for row in cur.fetchall()]

    def dispatch_delays(self, claims: Sequence[tuple[str, int]]) -> list[float]:
        """Seconds each (task id, attempt) claimed had been ready before its claim.

        Ready since: for a first attempt, its release time, its last dependency's end or its
        approval, whichever came last; for a later one, the end of the attempt before it when
        that one was lost (its lease expired), else its retry time. Claimed at: the task's
        claim time (the database's clock), or, once the task has moved on to a later attempt,
        the attempt's recorded start (the worker's clock). A claim whose ready time is no longer
        known is left out: a retry that failed again, or was retried by an operator, before this
        lookup overwrote its retry time. A hold is not seen: its wait counts as dispatch
        latency."""
        wanted: dict[str, set[int]] = {}
        for task_id, attempt in claims:
            wanted.setdefault(task_id, set()).add(attempt)
        delays: list[float] = []
        ids = sorted(wanted)
        with self._read() as cur:
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                clause, params = self._in("t.id", chunk)
                cur.execute(
                    "SELECT t.id, t.attempt, t.state, t.started_at, t.release_at, t.run_at, "
                    "CASE WHEN t.has_deps = 1 THEN (SELECT max(u.finished_at) FROM task_deps d "
                    "JOIN tasks u ON u.id = d.depends_on WHERE d.task_id = t.id) END, "
                    "(SELECT a.resolved_at FROM approvals a WHERE a.task_id = t.id) "
                    f"FROM tasks t WHERE {clause}",
                    params,
                )
                tasks = cur.fetchall()
                clause, params = self._in("task_id", chunk)
                cur.execute(
                    "SELECT task_id, attempt, outcome, started_at, finished_at FROM attempts "
                    f"WHERE {clause}",
                    params,
                )
                ended: dict[tuple[str, int], tuple[str, float | None, float]] = {}
                for task_id, attempt, outcome, started, finished in cur.fetchall():
                    began = None if started is None else float(started)
                    ended[(task_id, int(attempt))] = (outcome, began, float(finished))
                for task_id, current, state, claimed_at, release, run_at, deps, approved in tasks:
                    for attempt in sorted(wanted[task_id]):
                        if attempt == current and claimed_at is not None:
                            started = float(claimed_at)
                        else:
                            record = ended.get((task_id, attempt))
                            if record is None or record[1] is None:
                                continue
                            started = record[1]
                        if attempt == 1:
                            ready = max(
                                float(release),
                                -math.inf if deps is None else float(deps),
                                -math.inf if approved is None else float(approved),
                            )
                        else:
                            before = ended.get((task_id, attempt - 1))
                            if before is None:
                                continue
                            if before[0] == "lost":
                                ready = before[2]
                            elif (
                                attempt == current
                                and run_at is not None
                                and state in ("running", "succeeded")
                            ):
                                ready = max(float(run_at), before[2])
                            else:
                                continue
                        delays.append(max(0.0, started - ready))
        return delays
