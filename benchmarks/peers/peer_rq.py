"""RQ: W ``rq worker`` processes with ``SimpleWorker`` (the job runs in the worker process,
no fork per job), the fastest stock worker class for a no-op. ``peer_rq_fork`` is the same
with RQ's default ``Worker``, which forks a work horse per job.

Jobs are enqueued with ``result_ttl=0`` (no results kept) through ``Queue.enqueue_many`` in
batches of 1000, each batch one Redis pipeline.
"""

from __future__ import annotations

from typing import Any

import bench_common as bc
from redis import Redis
from rq import Queue

VERSIONS = ("rq", "redis")
QUEUE = "bench"
BATCH = 1000
WORKER_CLASS = "rq.worker.SimpleWorker"
WARM_PARENT = False  # SimpleWorker runs jobs in the worker process itself

_queue: Queue | None = None


def worker_commands(ctx: Any) -> list[list[str]]:
    return [
        [
            ctx.bin("rq"),
            "worker",
            "--url",
            ctx.redis_url,
            "--worker-class",
            WORKER_CLASS,
            "--logging_level",
            "WARNING",
            "--name",
            f"bench-{i}",
            QUEUE,
        ]
        for i in range(ctx.workers)
    ]


def connect(ctx: Any) -> None:
    global _queue
    _queue = Queue(QUEUE, connection=Redis.from_url(ctx.redis_url))


def _send(func: Any, n: int, kwargs: dict[str, Any] | None = None) -> None:
    assert _queue is not None
    for start in range(0, n, BATCH):
        size = min(BATCH, n - start)
        _queue.enqueue_many(
            [Queue.prepare_data(func, kwargs=kwargs, result_ttl=0) for _ in range(size)]
        )


def enqueue(n: int) -> None:
    _send(bc.noop, n)


def enqueue_warm(n: int) -> None:
    _send(bc.warm, n, {"parent": WARM_PARENT})
