"""PostgreSQL for several schedulers and workers on several machines.

Claims use FOR UPDATE SKIP LOCKED; LISTEN/NOTIFY wakes planners and workers; a session-level
advisory lock elects the one active planner, and every plan transaction also takes a
transaction-level advisory lock, so two planners can never grant the same capacity twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg

from tactician.errors import StoreUnavailable
from tactician.settings import Settings
from tactician.store.base import INSERT_COLUMNS, Cursor, SqlStore

# Advisory lock keys, each paired with the schema's hash: deployments in different schemas of
# one database (a benchmark beside production, say) never wait on each other.
LEADER_LOCK = 0x7AC7_1C1A  # held by the active planner
PLAN_LOCK = 0x7AC7_1C1B  # taken by every plan transaction
MIGRATE_LOCK = 0x7AC7_1C1C
AUDIT_LOCK = 0x7AC7_1C1D  # taken by every transaction that appends to the audit chain


def _lock(key: int) -> str:
    return f"{key}, hashtext(current_schema())"


CHANNEL_PLANNER = "tactician_planner"  # something became ready
CHANNEL_WORKERS = "tactician_workers"  # capacity was granted


# The PostgreSQL types of INSERT_COLUMNS, in order.
# fmt: off
_INSERT_TYPES = (
    "text", "text", "text", "text", "float8", "float8", "float8", "float8", "float8", "float8",
    "int4", "text", "text", "text", "text", "int4", "text", "text", "text", "int4", "float8",
    "text",
)
# fmt: on


class _Cursor:
    """A psycopg cursor that takes the `?` placeholders the shared SQL is written with."""

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._cur.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> Any:
        return self._cur.executemany(sql.replace("?", "%s"), params)

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    def fetchone(self) -> Any:
        return self._cur.fetchone()


def _connect(url: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreUnavailable(f"cannot connect to {url}: {reason}") from None


class PostgresStore(SqlStore):
    dialect = "postgres"

    def __init__(self, url: str, settings: Settings) -> None:
        super().__init__(url, settings)
        self.conn = _connect(url)
        self._lead_conn: psycopg.Connection[Any] | None = None
        self._listen_conn: psycopg.Connection[Any] | None = None
        self._leading = False
        self._migrate()

    def close(self) -> None:
        self._release_lead()
        for conn in (self.conn, self._listen_conn):
            if conn is not None:
                conn.close()

    def _migrate(self) -> None:
        with self._tx() as cur:
            cur.execute(f"SELECT pg_advisory_xact_lock({_lock(MIGRATE_LOCK)})")
            applied = self._applied_versions(cur)
            for version, script in self._migrations():
                if version in applied:
                    continue
                cur.execute(script)
                cur.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                )

    @contextmanager
    def _tx(self) -> Iterator[Cursor]:
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                yield _Cursor(cur)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"database unavailable: {exc}") from None

    def _insert_tasks(self, cur: Cursor, rows: Sequence[tuple[Any, ...]]) -> None:
        """One INSERT … SELECT FROM unnest(arrays): one statement, however many rows."""
        if not rows:
            return
        columns = list(zip(*rows, strict=True))
        casts = ", ".join(f"?::{t}[]" for t in _INSERT_TYPES)
        cur.execute(
            f"INSERT INTO tasks ({INSERT_COLUMNS}) SELECT * FROM unnest({casts}) "
            "ON CONFLICT DO NOTHING",
            [list(column) for column in columns],
        )

    def _now_sql(self) -> str:
        return "extract(epoch from clock_timestamp())::float8"

    def _in(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        return f"{column} = ANY(?)", [list(values)]

    def _skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED"

    def _for_update(self) -> str:
        return " FOR UPDATE"

    def _after_plan(self, cur: Cursor) -> None:
        cur.execute(f"NOTIFY {CHANNEL_WORKERS}")

    def _after_submit(self, cur: Cursor) -> None:
        cur.execute(f"NOTIFY {CHANNEL_PLANNER}")

    def _serialise_planners(self, cur: Cursor) -> None:
        cur.execute(f"SELECT pg_advisory_xact_lock({_lock(PLAN_LOCK)})")

    def _serialise_audit(self, cur: Cursor) -> None:
        cur.execute(f"SELECT pg_advisory_xact_lock({_lock(AUDIT_LOCK)})")

    def try_lead(self, holder: str, ttl: float) -> bool:
        """Hold the leader advisory lock on a connection of its own; it dies with the process."""
        if self._lead_conn is None or self._lead_conn.closed:
            self._lead_conn = _connect(self.url)
            self._leading = False
        if not self._leading:
            row = self._lead_conn.execute(
                f"SELECT pg_try_advisory_lock({_lock(LEADER_LOCK)})"
            ).fetchone()
            self._leading = bool(row and row[0])
        if not self._leading:
            return False
        with self._tx() as cur:  # the row only shows who leads; the lock decides
            now = self._now(cur)
            cur.execute(
                "INSERT INTO leader (name, holder, expires_at) VALUES ('planner', ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires_at = excluded.expires_at",
                (holder, now + ttl),
            )
        return True

    def resign(self, holder: str) -> None:
        super().resign(holder)
        self._release_lead()

    def _release_lead(self) -> None:
        """Unlock before closing: the server frees a closed session's locks only later, and a
        standby asking at once would still find the lock held."""
        if self._lead_conn is None:
            return
        if self._leading:
            with suppress(psycopg.Error):  # a broken connection has lost the lock already
                self._lead_conn.execute(f"SELECT pg_advisory_unlock({_lock(LEADER_LOCK)})")
        self._lead_conn.close()
        self._lead_conn = None
        self._leading = False

    def listen(self, channel: str) -> None:
        if self._listen_conn is None:
            self._listen_conn = _connect(self.url)
        self._listen_conn.execute(f"LISTEN {channel}")

    def wait_for_work(self, timeout: float) -> None:
        if self._listen_conn is None:
            time.sleep(timeout)
            return
        for _ in self._listen_conn.notifies(timeout=timeout, stop_after=1):
            pass

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)
