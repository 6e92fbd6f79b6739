"""Huey with SQLite storage: ``huey_consumer peer_huey_sqlite.huey -w W -k process``.

``SqliteHuey`` on a file in the run's temporary directory, Huey's defaults (WAL journal),
``results=False``, no periodic-task scheduler (``-n``). SQLite storage is polled: the
consumer's idle polling delay starts at 10 ms and backs off to at most 500 ms
(``-d 0.01 -m 0.5``; defaults 0.1 s and 10 s). Enqueue: calling the task in a loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bench_common as bc
from huey import SqliteHuey
from peer_huey_redis import consumer_command

VERSIONS = ("huey",)

huey = SqliteHuey(
    "bench",
    filename=str(Path(os.environ.get("BENCH_WORKDIR", ".")) / "huey.db"),
    results=False,
)


@huey.task()
def noop() -> None:
    bc.noop()


@huey.task()
def warm() -> None:
    bc.warm()


def worker_commands(ctx: Any) -> list[list[str]]:
    return [consumer_command(ctx, "peer_huey_sqlite.huey", "--delay", "0.01", "--max-delay", "0.5")]


def enqueue(n: int) -> None:
    for _ in range(n):
        noop()


def enqueue_warm(n: int) -> None:
    for _ in range(n):
        warm()
