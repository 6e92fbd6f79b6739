"""Huey with Redis storage: ``huey_consumer peer_huey_redis.huey -w W -k process``.

``RedisHuey`` with its default blocking dequeue (BRPOP, no polling), ``results=False``, no
periodic-task scheduler (``-n``). Enqueue: calling the task in a loop; Huey has no bulk
enqueue.
"""

from __future__ import annotations

import os
from typing import Any

import bench_common as bc
from huey import RedisHuey

VERSIONS = ("huey", "redis")

huey = RedisHuey(
    "bench",
    url=os.environ.get("BENCH_REDIS_URL", bc.DEFAULT_REDIS_URL),
    results=False,
)


@huey.task()
def noop() -> None:
    bc.noop()


@huey.task()
def warm() -> None:
    bc.warm()


def consumer_command(ctx: Any, instance: str, *extra: str) -> list[str]:
    return [
        ctx.bin("huey_consumer"),
        instance,
        "--workers",
        str(ctx.workers),
        "--worker-type",
        "process",
        "--no-periodic",
        "--quiet",
        *extra,
    ]


def worker_commands(ctx: Any) -> list[list[str]]:
    return [consumer_command(ctx, "peer_huey_redis.huey")]


def enqueue(n: int) -> None:
    for _ in range(n):
        noop()


def enqueue_warm(n: int) -> None:
    for _ in range(n):
        warm()
