"""Celery, Redis broker, prefork pool: W worker processes, each ``--pool prefork -c 1``.

Of the layouts with two executing processes, that one measured fastest here (see README.md):
2 x ``-c 1`` beat 1 x ``-c 2``, and Celery's default prefetch multiplier (4) beat 64.
Results are ignored (no result backend); gossip, mingle and heartbeat are off, the usual
settings for throughput. Enqueue: ``apply_async`` in a loop on one held producer (Celery has
no bulk publish; ``group`` publishes one message per task the same way).
"""

from __future__ import annotations

import os
from typing import Any

import bench_common as bc
from celery import Celery

VERSIONS = ("celery", "kombu", "billiard", "redis")

app = Celery("peer_celery", broker=os.environ.get("BENCH_REDIS_URL", bc.DEFAULT_REDIS_URL))
app.conf.update(
    task_ignore_result=True,
    worker_disable_rate_limits=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop() -> None:
    bc.noop()


@app.task(name="bench.warm")
def warm() -> None:
    bc.warm()


def worker_commands(ctx: Any) -> list[list[str]]:
    return [
        [
            ctx.bin("celery"),
            "-A",
            "peer_celery",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
            "--hostname",
            f"bench{i}@%h",
        ]
        for i in range(ctx.workers)
    ]


def _send(task: Any, n: int) -> None:
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            task.apply_async(producer=producer)


def enqueue(n: int) -> None:
    _send(noop, n)


def enqueue_warm(n: int) -> None:
    _send(warm, n)
