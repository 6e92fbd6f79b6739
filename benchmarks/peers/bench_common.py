"""The task bodies every peer runs, identical for all of them.

Imported inside the peers' venvs (by their workers and by ``driver.py``); needs ``redis``.

* ``noop``: the measured task. One Redis ``INCR`` on ``COUNTER``, which is how the driver
  counts completions; nothing else.
* ``warm``: the warm-up task. Records which worker process ran it and sleeps briefly, so
  that warm-up tasks spread over all worker processes and the driver can see each is up.
"""

from __future__ import annotations

import os
import time
from typing import Any

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
COUNTER = "bench:done"
WARM_DONE = "bench:warm:done"
WARM_PIDS = "bench:warm:pids"

_client: Any = None
_client_pid = 0
_aclient: Any = None
_aclient_loop: Any = None


def redis_url() -> str:
    return os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL)


def client() -> Any:
    """One Redis connection per process (recreated after a fork)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        import redis

        _client = redis.Redis.from_url(redis_url())
        _client_pid = os.getpid()
    return _client


def noop() -> None:
    client().incr(COUNTER)


def warm(parent: bool = False) -> None:
    """``parent``: record the parent pid (for workers that fork a child per task)."""
    c = client()
    c.sadd(WARM_PIDS, os.getppid() if parent else os.getpid())
    time.sleep(0.05)
    c.incr(WARM_DONE)


async def anoop() -> None:
    """``noop`` for async workers: the same INCR through redis.asyncio."""
    import asyncio

    global _aclient, _aclient_loop
    loop = asyncio.get_running_loop()
    if _aclient is None or _aclient_loop is not loop:
        import redis.asyncio

        _aclient = redis.asyncio.Redis.from_url(redis_url())
        _aclient_loop = loop
    await _aclient.incr(COUNTER)


async def awarm() -> None:
    import asyncio

    c = client()  # warm-up is not timed; a blocking call is fine here
    c.sadd(WARM_PIDS, os.getpid())
    await asyncio.sleep(0.05)
    c.incr(WARM_DONE)
