"""The PostgreSQL outbox: rows other applications insert in their own transactions.

The table (migration 0007) lives in Tactician's own database, so that taking a row and
committing its task are one transaction: `fetch` opens a transaction on the store's own
connection and claims the source's oldest rows with FOR UPDATE SKIP LOCKED (several ingest
processes share the work); the runner then commits the tasks and dead letters through the store
on that same connection (they become savepoints of this transaction); `ack` deletes the rows and
commits. A crash anywhere before that commit rolls all of it back and the rows are claimed
again, so each row becomes exactly one task (or one dead letter), never two.

An insert wakes the source through NOTIFY (a statement trigger, channel `tactician_outbox`, the
source's name as payload), heard on a connection of its own; without one it looks again every
`poll_interval` seconds, so a missed notification only delays a row.

    INSERT INTO outbox (source, body) VALUES ('orders', '{"order": 42}');
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg

from tactician.govern.sources import SourceSpec
from tactician.ingest.sources.base import Message, SourceUnavailable

log = logging.getLogger("tactician.ingest")
CHANNEL = "tactician_outbox"
DEFAULT_POLL_S = 1.0


class OutboxSource:
    def __init__(self, spec: SourceSpec, conn: psycopg.Connection[Any], url: str) -> None:
        """`conn`: the store's connection (autocommit), which commits the tasks too; `url`:
        its database, for the connection that listens."""
        self.name = spec.name
        self.conn = conn
        self.poll_interval = spec.poll_interval or DEFAULT_POLL_S
        self._tx: AbstractContextManager[psycopg.Transaction] | None = None
        self._listen: psycopg.Connection[Any] | None = None
        try:
            self._listen = psycopg.connect(url, autocommit=True, connect_timeout=5)
            self._listen.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            raise SourceUnavailable(f"outbox: cannot listen: {_line(exc)}") from None

    def fetch(self, limit: int, timeout: float) -> list[Message]:
        try:
            claimed = self._claim(limit)
            if claimed or timeout <= 0:
                return claimed
            self._wait(min(timeout, self.poll_interval))
            return self._claim(limit)
        except psycopg.Error as exc:
            self._rollback()
            raise SourceUnavailable(f"outbox: {_line(exc)}") from None

    def _claim(self, limit: int) -> list[Message]:
        if self._tx is not None:
            raise RuntimeError("outbox: the previous batch was neither acked nor released")
        tx = self.conn.transaction()
        tx.__enter__()
        try:
            rows = self.conn.execute(
                "SELECT id, body, headers FROM outbox WHERE source = %s ORDER BY id "
                "LIMIT %s FOR UPDATE SKIP LOCKED",
                (self.name, limit),
            ).fetchall()
        except BaseException as exc:
            tx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if not rows:
            tx.__exit__(None, None, None)
            return []
        self._tx = tx  # held open: the runner commits the tasks inside it, then `ack` ends it
        return [
            Message(str(row_id), body.encode(), _headers(headers), row_id)
            for row_id, body, headers in rows
        ]

    def _wait(self, seconds: float) -> None:
        assert self._listen is not None
        for notice in self._listen.notifies(timeout=seconds):
            if notice.payload == self.name:
                break

    def ack(self, messages: Sequence[Message]) -> None:
        if self._tx is None:
            return
        try:
            self.conn.execute(
                "DELETE FROM outbox WHERE id = ANY(%s)", ([m.handle for m in messages],)
            )
            tx, self._tx = self._tx, None
            tx.__exit__(None, None, None)  # commits the tasks, the dead letters, the deletes
        except psycopg.Error as exc:
            self._rollback()
            raise SourceUnavailable(f"outbox: {_line(exc)}") from None

    def release(self, messages: Sequence[Message]) -> None:
        self._rollback()

    def _rollback(self) -> None:
        tx, self._tx = self._tx, None
        if tx is not None:
            try:
                tx.__exit__(psycopg.Rollback, psycopg.Rollback(), None)
            except psycopg.Error as exc:  # a broken connection has rolled back already
                log.debug("outbox %s: rollback: %s", self.name, _line(exc))

    def pause(self, seconds: float) -> None:
        if self._listen is not None:
            for _ in self._listen.notifies(timeout=seconds):
                pass  # sleeps, and empties the queue of notifications meanwhile

    def close(self) -> None:
        self._rollback()
        listen, self._listen = self._listen, None
        if listen is not None:
            listen.close()


def _headers(value: Any) -> dict[str, str]:
    if isinstance(value, str):  # a driver that does not decode JSONB
        value = json.loads(value)
    if not isinstance(value, dict):
        return {}
    return {str(k).lower(): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
