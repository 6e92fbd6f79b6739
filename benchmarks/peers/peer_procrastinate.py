"""Procrastinate on PostgreSQL: W ``procrastinate worker --concurrency 1`` processes.

Each run gets a fresh database ``bench_procrastinate`` (created with the schema applied
before the workers start, dropped afterwards). Workers use Procrastinate's defaults
otherwise: LISTEN/NOTIFY for new jobs, finished jobs kept in the table. The no-op task is
``async`` (the same INCR through redis.asyncio), so it runs on the worker's event loop
rather than in a thread. Enqueue: ``Task.batch_defer`` in batches of 1000 (one query each).
After the run the driver also checks that the job table holds N succeeded no-op jobs.
"""

from __future__ import annotations

import os
import time
from typing import Any

import bench_common as bc
import procrastinate
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

VERSIONS = ("procrastinate", "psycopg", "redis")
DBNAME = "bench_procrastinate"
BATCH = 1000
MAINTENANCE_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
BENCH_DSN = make_conninfo(MAINTENANCE_DSN, dbname=DBNAME)

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=BENCH_DSN))


@app.task(name="bench.noop")
async def noop() -> None:
    await bc.anoop()


@app.task(name="bench.warm")
async def warm() -> None:
    await bc.awarm()


def _admin(statement: sql.Composable) -> None:
    with psycopg.connect(MAINTENANCE_DSN, autocommit=True) as conn:
        conn.execute(statement)


def setup(ctx: Any) -> None:
    cleanup(ctx)
    _admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DBNAME)))
    app.open()
    try:
        app.schema_manager.apply_schema()
    finally:
        app.close()


def cleanup(ctx: Any) -> None:
    _admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DBNAME)))


def worker_commands(ctx: Any) -> list[list[str]]:
    return [
        [
            ctx.bin("procrastinate"),
            "--app",
            "peer_procrastinate.app",
            "--log-level",
            "warning",
            "worker",
            "--concurrency",
            "1",
            "--name",
            f"bench-{i}",
        ]
        for i in range(ctx.workers)
    ]


def connect(ctx: Any) -> None:
    app.open()


def close() -> None:
    app.close()


def _send(task: Any, n: int) -> None:
    for start in range(0, n, BATCH):
        task.batch_defer(*({} for _ in range(min(BATCH, n - start))))


def enqueue(n: int) -> None:
    _send(noop, n)


def enqueue_warm(n: int) -> None:
    _send(warm, n)


def check(ctx: Any) -> str | None:
    """The job table must agree with the counter: N succeeded no-op jobs, nothing else."""
    deadline = time.monotonic() + 10  # a job's status is written just after its INCR
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        with psycopg.connect(BENCH_DSN) as conn:
            rows = conn.execute(
                "SELECT status::text, count(*) FROM procrastinate_jobs"
                " WHERE task_name = 'bench.noop' GROUP BY status"
            ).fetchall()
        counts = {status: int(n) for status, n in rows}
        if counts == {"succeeded": ctx.tasks}:
            return None
        time.sleep(0.1)
    return f"job table disagrees with the counter: {counts}"
