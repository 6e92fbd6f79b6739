"""PostgreSQL for several schedulers and workers on several machines.

Claims use FOR UPDATE SKIP LOCKED; LISTEN/NOTIFY wakes planners and workers; a session-level
advisory lock elects the one active planner, and every plan transaction also takes a
transaction-level advisory lock, so two planners can never grant the same capacity twice.

A lost connection (a server restart, a network cut, a terminated session) is an outage: it is
logged once, the store reconnects with exponential backoff (capped and jittered), and one line
says when the database is back. The store never re-runs a transaction whose body reached the
server: only one whose BEGIN failed on a dead connection is retried, at once, on a new one.
The services decide what else is safe to do again (see `reconnect`). The leader's lock lives
in its session: a lost connection is a lost lock, and a planner asks again before it plans.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from tactician.errors import StoreUnavailable
from tactician.settings import Settings, redact_url
from tactician.store.base import INSERT_COLUMNS, SqlStore
from tactician.store.mixin import Cursor

# Advisory lock keys, each paired with the schema's hash: deployments in different schemas of
# one database (a benchmark beside production, say) never wait on each other.
LEADER_LOCK = 0x7AC7_1C1A  # held by the active planner
PLAN_LOCK = 0x7AC7_1C1B  # taken by every plan transaction
MIGRATE_LOCK = 0x7AC7_1C1C
AUDIT_LOCK = 0x7AC7_1C1D  # taken by every transaction that appends to the audit chain


def _lock(key: int) -> str:
    return f"{key}, hashtext(current_schema())"


log = logging.getLogger("tactician.store")

CONNECT_TIMEOUT_S = 5
RECONNECT_FIRST_S = 0.1
"""The wait before the second attempt to reconnect (the first is at once); it doubles at each
failed attempt, up to RECONNECT_MAX_S, and each wait is a random 50-100 % of it, so that a fleet
of workers does not knock on a restarting server in step."""
RECONNECT_MAX_S = 5.0
# The client notices a dead server or network on an idle connection (a worker waiting for a
# NOTIFY) within about idle + count * interval seconds, not the kernel's two hours.
_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}
# On the leader's session the server probes the planner too: when a planner's machine vanishes
# without closing its connection, the server ends the session, and so frees the lock, in ~4 s.
# (A killed process closes its connection: the lock is free at once.)
_LEADER_SESSION = (
    "SET tcp_keepalives_idle = 2",
    "SET tcp_keepalives_interval = 1",
    "SET tcp_keepalives_count = 2",
)


CHANNEL_PLANNER = "tactician_planner"  # something became ready
CHANNEL_WORKERS = "tactician_workers"  # capacity was granted


# The PostgreSQL types of INSERT_COLUMNS, in order.
# fmt: off
_INSERT_TYPES = (
    "text", "text", "text", "text", "float8", "float8", "float8", "float8", "float8", "float8",
    "int4", "text", "text", "text", "text", "int4", "text", "text", "text", "int4", "float8",
    "text", "text",
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
        given = conninfo_to_dict(url)  # what the URL sets, it keeps
        defaults = {"connect_timeout": CONNECT_TIMEOUT_S, **_KEEPALIVES}
        extra = {k: v for k, v in defaults.items() if k not in given}
        return psycopg.connect(url, autocommit=True, **extra)
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot connect to {redact_url(url)}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _broken(conn: psycopg.Connection[Any] | None) -> bool:
    return conn is None or conn.closed or conn.broken


class _Outage:
    """The database stopped answering: when, why, and when to try to reconnect next."""

    def __init__(self, reason: str) -> None:
        self.began = time.monotonic()
        self.reason = reason
        self.attempts = 0
        self.delay = RECONNECT_FIRST_S
        self.next_at = self.began  # the first attempt at once: the server may be back already

    def failed(self, reason: str, rng: random.Random) -> None:
        self.attempts += 1
        self.reason = reason
        self.next_at = time.monotonic() + self.delay * rng.uniform(0.5, 1.0)
        self.delay = min(RECONNECT_MAX_S, self.delay * 2)


_MISCONFIGURED = (
    "does not exist",
    "authentication failed",
    "no pg_hba.conf entry",
    "not permitted to log in",
)
"""What a server that is up says to a URL or credentials that are wrong."""
WAIT_REMINDER_S = 60.0


def open_waiting(url: str, settings: Settings, stop: Callable[[], bool]) -> PostgresStore | None:
    """A store for a service started before its database is up: tries at once, then with the
    reconnect backoff, logging one line when it starts waiting, a reminder every minute, and
    one line when the server answers. None if `stop()` turns true meanwhile. A server that
    answers and refuses (no such database or role, a wrong password) is a setting to fix, not
    an outage: that error is raised at once."""
    outage: _Outage | None = None
    rng = random.Random()
    reminded = time.monotonic()
    while True:
        try:
            store = PostgresStore(url, settings)
        except StoreUnavailable as exc:
            if any(words in str(exc) for words in _MISCONFIGURED):
                raise
            if outage is not None and time.monotonic() - reminded >= WAIT_REMINDER_S:
                reminded = time.monotonic()
                log.warning(
                    "still waiting for the database after %.0fs (%d failed attempts): %s",
                    reminded - outage.began,
                    outage.attempts,
                    exc,
                )
            if outage is None:
                outage = _Outage(str(exc))
                log.warning(
                    "%s: waiting for the database, trying again with backoff "
                    "(%.1fs doubling to %.0fs)",
                    exc,
                    RECONNECT_FIRST_S,
                    RECONNECT_MAX_S,
                )
            outage.failed(str(exc), rng)
            while (left := outage.next_at - time.monotonic()) > 0:
                if stop():
                    return None
                time.sleep(min(left, 0.1))
            continue
        if outage is not None:
            log.warning(
                "database reachable after %.1fs (%d failed attempts)",
                time.monotonic() - outage.began,
                outage.attempts,
            )
        return store


class PostgresStore(SqlStore):
    dialect = "postgres"

    def __init__(self, url: str, settings: Settings) -> None:
        super().__init__(url, settings)
        self.conn = _connect(url)
        self._lead_conn: psycopg.Connection[Any] | None = None
        self._listen_conn: psycopg.Connection[Any] | None = None
        self._channels: list[str] = []
        self._listen_retry_at = 0.0
        self._leading = False
        self._outage: _Outage | None = None
        self._rng = random.Random()
        try:
            self._migrate()
        except BaseException:
            self.close()  # a store that failed to start leaves no connection behind
            raise

    def close(self) -> None:
        self._release_lead()
        for conn in (self.conn, self._listen_conn):
            if conn is not None:
                with suppress(psycopg.Error):
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
        for attempt in (1, 2):
            conn = self._live()
            begun = False
            try:
                with conn.transaction(), conn.cursor() as cur:
                    begun = True
                    yield _Cursor(cur)
                return
            except psycopg.Error as exc:
                if not _broken(conn):  # a deadlock, a serialisation failure: the caller decides
                    if isinstance(exc, psycopg.OperationalError):
                        raise StoreUnavailable(f"database unavailable: {exc}") from None
                    raise
                error = self._lost(conn, exc)
                # Only a BEGIN that failed is tried again: nothing of the body reached the
                # server. A body that was cut off may or may not have committed.
                if begun or attempt == 2:
                    raise error from None

    # --- the connection, lost and found again ---------------------------------------------

    def _live(self) -> psycopg.Connection[Any]:
        """The main connection. A broken one is replaced, by one attempt when the backoff
        allows it; otherwise StoreUnavailable at once (an API request or a CLI command fails
        fast, and works again once the server is back). The services wait in `reconnect`."""
        if self._outage is None and not _broken(self.conn):
            return self.conn
        outage = self._outage or self._begin_outage("connection closed")
        if time.monotonic() < outage.next_at:
            raise StoreUnavailable(f"database unavailable ({outage.reason}); reconnecting")
        try:
            conn = _connect(self.url)
            try:
                if self._channels:
                    self._open_listen()
            except StoreUnavailable:
                conn.close()
                raise
        except StoreUnavailable as exc:
            outage.failed(str(exc), self._rng)
            log.debug("reconnect attempt %d failed: %s", outage.attempts, exc)
            raise
        with suppress(psycopg.Error):
            self.conn.close()
        self.conn = conn
        self._outage = None
        log.warning(
            "database connection back after %.1fs (%d failed attempts)%s",
            time.monotonic() - outage.began,
            outage.attempts,
            f"; LISTEN {', '.join(self._channels)} issued again" if self._channels else "",
        )
        return conn

    def _begin_outage(self, reason: str) -> _Outage:
        if self._outage is not None:
            return self._outage
        self._outage = _Outage(reason)
        log.warning(
            "database connection lost (%s): reconnecting with backoff (%.1fs doubling to %.0fs)",
            reason,
            RECONNECT_FIRST_S,
            RECONNECT_MAX_S,
        )
        return self._outage

    def _lost(self, conn: psycopg.Connection[Any], exc: psycopg.Error) -> StoreUnavailable:
        reason = _reason(exc)
        self._begin_outage(reason)
        with suppress(psycopg.Error):
            conn.close()
        return StoreUnavailable(f"database unavailable: {reason}")

    def reconnect(self, within: float = math.inf) -> bool:
        """Wait up to `within` seconds for the database; True once the connection works.

        For the long-running services, after a StoreUnavailable. What they do again is theirs
        to decide, and only what is safe: the planner re-runs its pass (promote, reap and plan
        read the state afresh, and schedules fire under idempotency keys) after asking again
        whether it leads; a worker sends its results again (fenced by lease token: a result
        that was already recorded, or whose lease was lost, changes nothing) and claims anew,
        adopting the claims whose commit it never heard of."""
        deadline = time.monotonic() + within
        while True:
            try:
                self._live()
                return True
            except StoreUnavailable:
                pass
            assert self._outage is not None
            now = time.monotonic()
            if self._outage.next_at >= deadline:
                time.sleep(max(0.0, deadline - now))
                return False
            time.sleep(max(0.0, self._outage.next_at - now))

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
        if self._leading and self._lead_conn is not None:
            # A leader grants only while its session holds the lock: one that lost it with its
            # connection stops here, before it has noticed (a standby may lead already).
            cur.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = ? AND classid = ? AND objid = hashtext(current_schema())::oid "
                "AND objsubid = 2",
                (self._lead_conn.info.backend_pid, LEADER_LOCK),
            )
            if not cur.fetchone()[0]:
                self._drop_lead()
                raise StoreUnavailable("the leader lock was lost with its connection")

    def _serialise_audit(self, cur: Cursor) -> None:
        cur.execute(f"SELECT pg_advisory_xact_lock({_lock(AUDIT_LOCK)})")

    def try_lead(self, holder: str, ttl: float) -> bool:
        """Hold the leader advisory lock on a connection of its own; it dies with the process.

        A leader checks its session at every call: a lost connection is a lost lock."""
        if self._leading and not self._session_alive():
            log.warning("planner %s lost the leader lock with its connection", holder)
        if not self._leading:
            self._leading = self._take_lead()
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

    def _session_alive(self) -> bool:
        conn = self._lead_conn
        if conn is not None:
            with suppress(psycopg.Error):
                conn.execute("SELECT 1")
                return True
        self._drop_lead()
        return False

    def _take_lead(self) -> bool:
        fresh = _broken(self._lead_conn)
        if fresh:
            self._drop_lead()
            self._live()  # during an outage: wait for the backoff, as every caller does
            try:
                self._lead_conn = _connect(self.url)
            except StoreUnavailable as exc:
                self._begin_outage(str(exc))
                raise
        conn = self._lead_conn
        assert conn is not None
        try:
            for statement in _LEADER_SESSION if fresh else ():
                conn.execute(statement)
            row = conn.execute(f"SELECT pg_try_advisory_lock({_lock(LEADER_LOCK)})").fetchone()
        except psycopg.Error as exc:
            self._drop_lead()
            raise self._lost(conn, exc) from None
        return bool(row and row[0])

    def _drop_lead(self) -> None:
        """Forget a leader session that is gone (its lock went with it)."""
        if self._lead_conn is not None:
            with suppress(psycopg.Error):
                self._lead_conn.close()
        self._lead_conn = None
        self._leading = False

    def resign(self, holder: str) -> None:
        self._release_lead()  # first: the lock matters, the row only shows who led
        super().resign(holder)

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
        """LISTEN on a connection of its own; issued again on every new connection."""
        if channel not in self._channels:
            self._channels.append(channel)
        if _broken(self._listen_conn):
            self._open_listen()
        else:
            assert self._listen_conn is not None
            self._listen_conn.execute(f"LISTEN {channel}")

    def _open_listen(self) -> None:
        if self._listen_conn is not None:
            with suppress(psycopg.Error):
                self._listen_conn.close()
            self._listen_conn = None
        conn = _connect(self.url)
        try:
            for channel in self._channels:
                conn.execute(f"LISTEN {channel}")
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable(f"database unavailable: {_reason(exc)}") from None
        self._listen_conn = conn

    def wait_for_work(self, timeout: float) -> None:
        """Wait for a NOTIFY on the channels listened to, or `timeout` seconds. Wake-ups missed
        while the listening connection was down cost at most a poll interval: loops poll."""
        if not self._channels:
            time.sleep(timeout)
            return
        if _broken(self._listen_conn):
            # Reopened with the main connection after an outage; here when it died alone.
            if self._outage is None and time.monotonic() >= self._listen_retry_at:
                try:
                    self._open_listen()
                except StoreUnavailable:
                    self._listen_retry_at = time.monotonic() + RECONNECT_MAX_S
            if _broken(self._listen_conn):
                time.sleep(timeout)
                return
        assert self._listen_conn is not None
        try:
            for _ in self._listen_conn.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error:
            with suppress(psycopg.Error):
                self._listen_conn.close()
            self._listen_conn = None  # the next transaction tells whether the server is gone

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)
