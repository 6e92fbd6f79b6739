"""The embedded default: one SQLite file in WAL mode; BEGIN IMMEDIATE serialises writers."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tactician.clock import SYSTEM_CLOCK
from tactician.errors import InvalidInput, StoreUnavailable
from tactician.settings import Settings
from tactician.store.base import SqlStore
from tactician.store.mixin import Cursor

BUSY_TIMEOUT_S = 30.0
SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")
_LOCKING_STORES: weakref.WeakSet[SqliteStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child (a worker's runner) shares the open file description of each store's
    lock file, and flock belongs to that description: a child that kept it would hold its
    parent's write lock after the parent died inside a transaction. Take a new one."""
    for store in list(_LOCKING_STORES):
        store._reopen_lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def sqlite_path(url: str) -> str:
    if not url.startswith("sqlite:///"):
        raise InvalidInput(f"not a SQLite URL (sqlite:///path.db): {url}")
    return url.removeprefix("sqlite:///") or ":memory:"


class SqliteStore(SqlStore):
    dialect = "sqlite"

    def __init__(self, url: str, settings: Settings) -> None:
        super().__init__(url, settings)
        path = sqlite_path(url)
        synchronous = settings.sqlite_synchronous.upper()
        if synchronous not in SYNCHRONOUS_LEVELS:
            raise InvalidInput(
                f"TACTICIAN_SQLITE_SYNCHRONOUS must be one of {', '.join(SYNCHRONOUS_LEVELS)}"
            )
        if path != ":memory:" and not Path(path).parent.exists():
            raise StoreUnavailable(f"cannot open {url}: folder {Path(path).parent} does not exist")
        # Writers queue on an flock of their own: the kernel wakes the next one the moment the
        # lock is free, where SQLite's busy handler would sleep 1-100 ms between retries.
        self._lock_path = f"{path}-lock"
        self._lock_fd = (
            os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644) if path != ":memory:" else None
        )
        if self._lock_fd is not None:
            _LOCKING_STORES.add(self)
        try:
            self.conn = sqlite3.connect(
                path, isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False
            )
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute(f"PRAGMA synchronous = {synchronous}")
            self.conn.execute("PRAGMA cache_size = -65536")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {url}: {exc}") from None

    def close(self) -> None:
        self.conn.close()
        _LOCKING_STORES.discard(self)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _reopen_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the parent's lock, if it holds one, stays the parent's
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)

    def _migrate(self) -> None:
        with self._tx() as cur:
            applied = self._applied_versions(cur)
            for version, script in self._migrations():
                if version in applied:
                    continue
                for statement in script.split(";\n"):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                )

    @contextmanager
    def _tx(self) -> Iterator[Cursor]:
        if self._lock_fd is None:
            yield from self._transaction("BEGIN IMMEDIATE")
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield from self._transaction("BEGIN IMMEDIATE")
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        yield from self._transaction("BEGIN")

    def _transaction(self, begin: str) -> Iterator[Cursor]:
        cur = self.conn.cursor()
        try:
            cur.execute(begin)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"database busy or unavailable: {exc}") from None
        try:
            yield cur
        except BaseException:
            self.conn.rollback()
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    def db_now(self) -> float:
        """The clock, read without the write lock (SQLite's clock is this machine's)."""
        with self._read() as cur:
            return self._now(cur)

    def _now(self, cur: Cursor) -> float:
        """This machine's clock, as SQLite's own would be (it has no server), to the
        microsecond: `julianday('now')` keeps milliseconds, and a global rate lent by the
        millisecond was seen to overshoot its exact envelope by rate x 1 ms."""
        return SYSTEM_CLOCK.now()

    def _in(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        if not values:
            return "1 = 0", []
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)
