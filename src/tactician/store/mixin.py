"""What the store's table mixins use from `SqlStore`: cursors, transactions, clock, helpers.

Here rather than in `store.base`, so that a mixin (and whatever reads through it, like the
observe layer's report) does not depend on the store's whole implementation."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tactician.govern.audit import Entry


class Cursor(Protocol):
    """What both DB-API cursors (sqlite3, psycopg) give us."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


class StoreMixin:
    """The base of the store's mixins (governance, dead letters, drift, counters, reports...):
    `SqlStore` provides these; a mixin only declares that it uses them."""

    dialect: str

    if TYPE_CHECKING:

        def _tx(self) -> AbstractContextManager[Cursor]: ...

        def _read(self) -> AbstractContextManager[Cursor]: ...

        def _now(self, cur: Cursor) -> float: ...

        def _in(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]: ...

        def _audit(
            self, cur: Cursor, entries: Sequence[Entry], now: float | None = None
        ) -> None: ...
