"""The Tactician app the end-to-end worker processes run (`--app tests.e2e.crash_app:app`).

Every handler records what it did by appending one line to the file named by $E2E_EFFECTS.
A single `write` on a file opened with O_APPEND lands whole at the end of the file, even with
several processes writing and any of them killed with SIGKILL, so the file is a faithful log
of side effects: it is what the tests count executions, overlaps and start times from.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import replace

from tactician import Tactician, WorkerOptions, current_task
from tactician.run.worker import Worker

EFFECTS_ENV = "E2E_EFFECTS"
HEARTBEAT_ENV = "E2E_HEARTBEAT_EVERY"
"""Seconds between a worker's heartbeats; a huge value switches heartbeats off (fault tests)."""
TRUCKS = 3


class E2EApp(Tactician):
    """A Tactician whose workers can be told to (almost) never heartbeat."""

    def worker(self, options: WorkerOptions | None = None) -> Worker:
        every = os.environ.get(HEARTBEAT_ENV)
        if every:
            options = replace(options or WorkerOptions(), heartbeat_every=float(every))
        return super().worker(options)


def record(*fields: object) -> None:
    """Append one line to the effects file, in one write."""
    line = (" ".join(str(f) for f in fields) + "\n").encode()
    fd = os.open(os.environ[EFFECTS_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def build(db: str | None = None) -> E2EApp:
    app = E2EApp(db)
    app.pool("trucks", TRUCKS)

    @app.task
    def work(key: str, seconds: float | None = None) -> None:
        """The side effect happens first (as a sent e-mail would), then the work goes on."""
        token = current_task().token
        record("start", key, token, os.getpid(), f"{time.time():.6f}")
        time.sleep(random.uniform(0.001, 0.002) if seconds is None else seconds)
        record("done", key, token, os.getpid(), f"{time.time():.6f}")

    @app.task(pool="trucks")
    def haul(key: str, units: int, seconds: float) -> None:
        started = time.time()
        time.sleep(seconds)
        record("haul", key, units, f"{started:.6f}", f"{time.time():.6f}")

    @app.task(rate="10/s")
    def tick(key: str) -> None:
        record("tick", key, current_task().token, f"{time.time():.6f}")

    return app


app = build()
