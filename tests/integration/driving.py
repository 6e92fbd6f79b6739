"""Helpers the integration tests share: open stores, run a real worker until a condition."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tactician.app import Tactician
from tactician.run.worker import WorkerOptions
from tactician.settings import Settings
from tactician.store.base import SqlStore
from tactician.store.open import open_store

Opener = Callable[..., SqlStore]


def stores_on(url: str) -> Iterator[Opener]:
    """Open stores on one database with some settings changed; all closed at the end."""
    opened: list[SqlStore] = []

    def open_(**changes: Any) -> SqlStore:
        store = open_store(url, Settings(db=url, **changes))
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def make_app(url: str, lease_seconds: float = 5.0) -> Tactician:
    return Tactician(settings=Settings(db=url, lease_seconds=lease_seconds, poll_interval=0.01))


def run_until(
    app: Tactician,
    done: Callable[[], bool],
    *,
    timeout: float = 8.0,
    options: WorkerOptions | None = None,
    each: Callable[[], None] | None = None,
) -> bool:
    """Run a worker (and tick a planner) until done() or the deadline; True if done."""
    planner = app.planner()
    worker = app.worker(options or WorkerOptions(poll_interval=0.01))
    deadline = time.monotonic() + timeout
    reached = False

    def should_stop() -> bool:
        nonlocal reached
        if reached:
            return True
        if each is not None:  # before the tick: it sees each state a result left behind
            each()
        planner.tick()
        reached = done()
        return reached or time.monotonic() > deadline

    try:
        worker.run(should_stop)
    finally:
        app.store.resign(planner.holder)
    return reached


def final(app: Tactician, *task_ids: str) -> Callable[[], bool]:
    return lambda: all(app.get(t).state.is_final for t in task_ids)


def lock_is_free(lock_file: str | Path) -> bool:
    """True when nobody holds the flock on this file (the SQLite store's write lock)."""
    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}
