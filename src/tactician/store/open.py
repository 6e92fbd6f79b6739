"""Open a store from its URL."""

from __future__ import annotations

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
