"""`tactician bench throughput`: a no-op workload end to end through real processes.

The planner and the workers run in their own processes and are warm before the clock starts.
The clock covers submission (every task committed before `submit` returns) through the moment
the last task is seen succeeded. Each figure is the median of several runs.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tactician.app import Tactician
from tactician.domain import NewTask
from tactician.errors import InvalidInput
from tactician.run.worker import WorkerOptions
from tactician.settings import Settings

SUBMIT_CHUNK = 1000
TIMEOUT_S = 600.0


def noop() -> None:
    """The benchmark's task: does nothing, so what is measured is the scheduler."""


def bench_app(db: str) -> Tactician:
    app = Tactician(settings=Settings.from_env(db=db))
    app.task(noop, name="noop", retries=0, timeout=60)
    return app


@dataclass(frozen=True)
class RunFigures:
    submit_s: float
    e2e_s: float


def _reset(db: str) -> None:
    if db.startswith("sqlite:///"):
        path = Path(db.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "DROP TABLE IF EXISTS tasks, task_deps, attempts, kinds, pools, rate_buckets, "
            "targets, schedules, workers, leader, schema_migrations CASCADE"
        )


def _worker_main(db: str, batch: int, stop: Any) -> None:
    app = bench_app(db)
    app.worker(WorkerOptions(concurrency=1, batch=batch)).run(stop.is_set)


def _planner_main(db: str, stop: Any) -> None:
    bench_app(db).planner().run(stop.is_set)


def run_once(db: str, tasks: int, workers: int, batch: int) -> RunFigures:
    _reset(db)
    app = bench_app(db)
    app.store  # noqa: B018 (create the schema before the children open it)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    app.close()
    children = [ctx.Process(target=_planner_main, args=(db, stop))]
    children += [ctx.Process(target=_worker_main, args=(db, batch, stop)) for _ in range(workers)]
    for child in children:
        child.start()
    try:
        time.sleep(1.0)  # warm: every child connected and polling
        batches = [
            [NewTask("noop", {}) for _ in range(min(SUBMIT_CHUNK, tasks - start))]
            for start in range(0, tasks, SUBMIT_CHUNK)
        ]
        started = time.perf_counter()
        for chunk in batches:
            app.submit_many(chunk)
        submitted = time.perf_counter()
        deadline = started + TIMEOUT_S
        while True:
            done = app.store.count_state("succeeded")
            if done >= tasks:
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"only {done} of {tasks} tasks finished in {TIMEOUT_S}s")
            time.sleep(0.02)
        finished = time.perf_counter()
        counts = app.store.counts()
        if counts != {"succeeded": tasks}:
            raise RuntimeError(f"expected {tasks} succeeded tasks, found {counts}")
    finally:
        stop.set()
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()
        app.close()
    return RunFigures(submitted - started, finished - started)


def throughput(db: str | None, tasks: int, workers: int, runs: int, batch: int) -> dict[str, Any]:
    if tasks < 1 or workers < 1 or runs < 1 or batch < 1:
        raise InvalidInput("tasks, workers, runs and batch must be >= 1")
    with tempfile.TemporaryDirectory(prefix="tactician-bench-") as tmp:
        url = db or f"sqlite:///{os.path.join(tmp, 'bench.db')}"
        figures = [run_once(url, tasks, workers, batch) for _ in range(runs)]
    submit_s = statistics.median(f.submit_s for f in figures)
    e2e_s = statistics.median(f.e2e_s for f in figures)
    return {
        "tasks": tasks,
        "workers": workers,
        "batch": batch,
        "runs": runs,
        "db": url.split("://", 1)[0],
        "submit_per_s": round(tasks / submit_s, 1),
        "complete_per_s": round(tasks / e2e_s, 1),
        "e2e_s": round(e2e_s, 3),
        "e2e_s_runs": [round(f.e2e_s, 3) for f in figures],
        "verified_succeeded": tasks,
    }
