"""Open a store from its URL."""

from __future__ import annotations

from collections.abc import Callable

from tactician.errors import InvalidInput
from tactician.settings import Settings
from tactician.store.base import SqlStore


def open_store(url: str, settings: Settings | None = None) -> SqlStore:
    """sqlite:///path.db (embedded), sqlite:///:memory:, or postgresql://…"""
    settings = settings or Settings(db=url)
    if url.startswith("sqlite:///"):
        from tactician.store.sqlite import SqliteStore

        return SqliteStore(url, settings)
    if url.startswith(("postgresql://", "postgres://")):
        from tactician.store.postgres import PostgresStore

        return PostgresStore(url, settings)
    raise InvalidInput(f"unsupported database URL {url!r}: use sqlite:///path.db or postgresql://…")


def open_store_waiting(
    url: str, settings: Settings | None, stop: Callable[[], bool]
) -> SqlStore | None:
    """`open_store`, for a long-running service: a PostgreSQL server that is not up yet is
    waited for with the reconnect backoff (a planner or worker started before its database, as
    after a machine's reboot) until it answers or `stop()` turns true (then None). A one-shot
    command uses `open_store` and fails at once."""
    if url.startswith(("postgresql://", "postgres://")):
        from tactician.store.postgres import open_waiting

        return open_waiting(url, settings or Settings(db=url), stop)
    return open_store(url, settings)
