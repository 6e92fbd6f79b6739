"""Fixtures shared by the integration tests: stores on a real database (SQLite and PostgreSQL
through the `db_url` parameter), closed at the end of each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tactician.domain import KindSpec
from tactician.store.base import SqlStore
from tests.integration.driving import Opener, stores_on

JOB = KindSpec("job", pool="p")


@pytest.fixture
def opener(db_url: str) -> Iterator[Opener]:
    yield from stores_on(db_url)


@pytest.fixture
def job_store(opener: Opener) -> SqlStore:
    """A store with one kind, `job`, in a pool `p` of 1 unit."""
    store = opener()
    store.register_kinds([JOB])
    store.set_pool("p", 1)
    return store
