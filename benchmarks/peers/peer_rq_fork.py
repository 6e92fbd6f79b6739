"""RQ with its default ``Worker`` class: a forked work horse per job (see ``peer_rq``)."""

from __future__ import annotations

from typing import Any

import peer_rq
from peer_rq import VERSIONS, connect, enqueue

__all__ = ["VERSIONS", "connect", "enqueue", "enqueue_warm", "worker_commands"]

peer_rq.WORKER_CLASS = "rq.worker.Worker"
peer_rq.WARM_PARENT = True  # the job runs in a fresh child: count its parent, the worker


def worker_commands(ctx: Any) -> list[list[str]]:
    return peer_rq.worker_commands(ctx)


def enqueue_warm(n: int) -> None:
    peer_rq.enqueue_warm(n)
