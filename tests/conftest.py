"""Shared fixtures: real SQLite files and real PostgreSQL databases, one fresh database a test.

PostgreSQL databases are cloned from a migrated template (CREATE DATABASE … TEMPLATE …), as
procrastinate does. Without a reachable server the PostgreSQL tests skip with the reason, except
in CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

PG_ADMIN_URL = os.environ.get("TACTICIAN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
# One template per pytest session, so that two sessions on one server do not collide.
TEMPLATE = f"tactician_tpl_{uuid.uuid4().hex[:10]}"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _pg_url(database: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"no PostgreSQL: {reason}")


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated template database, made once per session and dropped after it."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
    except Exception as exc:  # any failure to reach the server means: no PostgreSQL here
        _unavailable(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
    from tactician.settings import Settings
    from tactician.store.postgres import PostgresStore

    PostgresStore(_pg_url(TEMPLATE), Settings()).close()
    yield TEMPLATE
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh migrated PostgreSQL database for one test."""
    import psycopg

    name = f"tactician_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {pg_template}")
    yield _pg_url(name)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def sqlite_url(tmp_path: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path}/tactician.db"  # type: ignore[operator]


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))
