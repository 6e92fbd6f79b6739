"""Celery, Redis broker, prefork pool: one worker process with ``--concurrency W`` children.

Results are ignored (no result backend). The worker prefetches up to 64 messages per child
(``--prefetch-multiplier 64``) and runs without gossip, mingle and heartbeat, the usual
settings for throughput. Enqueue: ``apply_async`` in a loop on one held producer (Celery has
no bulk publish; ``group`` publishes one message per task the same way).
"""

from __future__ import annotations

import os
from typing import Any

import bench_common as bc
from celery import Celery

VERSIONS = ("celery", "kombu", "billiard", "redis")
PREFETCH = 64

app = Celery("peer_celery", broker=os.environ.get("BENCH_REDIS_URL", bc.DEFAULT_REDIS_URL))
app.conf.update(
    task_ignore_result=True,
    worker_prefetch_multiplier=PREFETCH,
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
    split = os.environ.get("XSPLIT") == "1"
    return [
        [
            ctx.bin("celery"),
            "-A",
            "peer_celery",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "1" if split else str(ctx.workers),
            "--prefetch-multiplier",
            os.environ.get("XPF", str(PREFETCH)),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
            "--hostname",
            f"bench{i}@%h",
        ]
        for i in range(ctx.workers if split else 1)
    ]


def _send(task: Any, n: int) -> None:
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            task.apply_async(producer=producer)


def enqueue(n: int) -> None:
    _send(noop, n)


def enqueue_warm(n: int) -> None:
    _send(warm, n)
