"""Dramatiq, Redis broker: ``dramatiq peer_dramatiq --processes W --threads 1``.

Default middleware. Each worker process prefetches up to 64 messages
(``dramatiq_queue_prefetch=64``; the default is 2 x threads) and polls an empty queue at most
every 100 ms (``dramatiq_worker_timeout=100``; default 1000). Enqueue: ``send()`` in a loop,
Dramatiq has no bulk enqueue (``group`` sends one message at a time too).
"""

from __future__ import annotations

import os
from typing import Any

import bench_common as bc
import dramatiq
from dramatiq.brokers.redis import RedisBroker

VERSIONS = ("dramatiq", "redis")
PREFETCH = 64

broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", bc.DEFAULT_REDIS_URL))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench_noop", max_retries=0)
def noop() -> None:
    bc.noop()


@dramatiq.actor(actor_name="bench_warm", max_retries=0)
def warm() -> None:
    bc.warm()


def worker_env(ctx: Any) -> dict[str, str]:
    return {"dramatiq_queue_prefetch": str(PREFETCH), "dramatiq_worker_timeout": "100"}


def worker_commands(ctx: Any) -> list[list[str]]:
    return [
        [
            ctx.bin("dramatiq"),
            "peer_dramatiq",
            "--processes",
            str(ctx.workers),
            "--threads",
            "1",
        ]
    ]


def enqueue(n: int) -> None:
    for _ in range(n):
        noop.send()


def enqueue_warm(n: int) -> None:
    for _ in range(n):
        warm.send()
