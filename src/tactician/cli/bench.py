"""`tactician bench throughput`: a no-op workload end to end through real processes.

The planner and the workers run in their own processes and are warm before the clock starts.
The clock covers submission (every task committed before `submit` returns) through the moment
the last task is seen succeeded. Each figure is the median of several runs.

`metrics=False` switches off what the planner and workers count in memory (as
TACTICIAN_METRICS=0 does); `scrape_every` adds a process that renders the /metrics text from the
database at that interval during the run, as a Prometheus server scraping the API would
(benchmarks/metrics_overhead.py compares the two).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import tempfile
import time
import uuid
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


def bench_app(db: str, metrics: bool = True) -> Tactician:
    app = Tactician(settings=Settings.from_env(db=db, metrics=metrics))
    app.task(noop, name="noop", retries=0, timeout=60)
    return app


@dataclass(frozen=True)
class RunFigures:
    submit_s: float
    e2e_s: float
    scrapes: int = 0
    """/metrics renderings during the run (with `scrape_every`)."""
    cpu_s: float = 0.0
    """CPU seconds (user + system) of the planner, workers, runners and scraper, from their
    start to their exit: less sensitive than wall time to other work on the machine."""
    scrape_s: float = 0.0
    """Wall seconds the scrapes took, in all."""


class BenchDatabase:
    """A database of the benchmark's own, never one that holds anything else.

    SQLite: a file that must not exist yet. PostgreSQL: a fresh schema in the given database
    (reached through search_path), dropped at the end; existing tables are never touched.
    """

    def __init__(self, url: str) -> None:
        self.given = url
        self.schema: str | None = None
        if url.startswith("sqlite:///"):
            self.path = Path(url.removeprefix("sqlite:///"))
            if self.path.exists():
                raise InvalidInput(
                    f"bench needs a database of its own: {self.path} exists; give a new path"
                )
            self.url = url
        elif url.startswith(("postgresql://", "postgres://")):
            self.schema = f"tactician_bench_{uuid.uuid4().hex[:10]}"
            joiner = "&" if "?" in url else "?"
            self.url = f"{url}{joiner}options=-csearch_path%3D{self.schema}"
        else:
            raise InvalidInput(f"unsupported database URL {url!r}")

    def reset(self) -> None:
        """Empty before each run: delete our file, or recreate our schema."""
        if self.schema is None:
            for suffix in ("", "-wal", "-shm", "-lock"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            return
        self._sql(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE", f"CREATE SCHEMA {self.schema}")

    def drop(self) -> None:
        if self.schema is None:
            self.reset()
        else:
            self._sql(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    def _sql(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(self.given, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement.encode())  # our own identifiers, not user input


def _worker_main(db: str, batch: int, stop: Any, metrics: bool) -> None:
    app = bench_app(db, metrics)
    app.worker(WorkerOptions(concurrency=1, batch=batch)).run(stop.is_set)


def _planner_main(db: str, stop: Any, metrics: bool) -> None:
    bench_app(db, metrics).planner().run(stop.is_set)


def _scraper_main(db: str, stop: Any, every: float, scrapes: Any, spent: Any) -> None:
    """Render the /metrics text every `every` seconds until stopped (a Prometheus scrape)."""
    from tactician.observe.metrics import metrics_text

    app = bench_app(db)
    app.store  # noqa: B018 (connected before the first scrape, as a running API is)
    try:
        while not stop.wait(every):
            began = time.perf_counter()
            if b"tactician_tasks" not in metrics_text(app.store):
                raise RuntimeError("a scrape came back without the task gauges")
            spent.value += time.perf_counter() - began
            scrapes.value += 1
    finally:
        app.close()


def run_once(
    bench_db: BenchDatabase,
    tasks: int,
    workers: int,
    batch: int,
    *,
    metrics: bool = True,
    scrape_every: float | None = None,
) -> RunFigures:
    bench_db.reset()
    db = bench_db.url
    app = bench_app(db, metrics)
    app.store  # noqa: B018 (create the schema before the children open it)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    scrapes = ctx.Value("i", 0)
    spent = ctx.Value("d", 0.0)
    app.close()
    children = [ctx.Process(target=_planner_main, args=(db, stop, metrics))]
    children += [
        ctx.Process(target=_worker_main, args=(db, batch, stop, metrics)) for _ in range(workers)
    ]
    if scrape_every is not None:
        scraper = ctx.Process(target=_scraper_main, args=(db, stop, scrape_every, scrapes, spent))
        children.append(scraper)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
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
    failed = [c.name for c in children if c.exitcode != 0]
    if failed:
        raise RuntimeError(f"bench processes did not stop cleanly: {failed}")
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return RunFigures(
        submitted - started, finished - started, int(scrapes.value), cpu, float(spent.value)
    )


def throughput(
    db: str | None,
    tasks: int,
    workers: int,
    runs: int,
    batch: int,
    *,
    metrics: bool = True,
    scrape_every: float | None = None,
) -> dict[str, Any]:
    if tasks < 1 or workers < 1 or runs < 1 or batch < 1:
        raise InvalidInput("tasks, workers, runs and batch must be >= 1")
    if scrape_every is not None and not scrape_every > 0:
        raise InvalidInput("scrape_every must be a positive number of seconds")
    with tempfile.TemporaryDirectory(prefix="tactician-bench-") as tmp:
        url = db or f"sqlite:///{os.path.join(tmp, 'bench.db')}"
        bench_db = BenchDatabase(url)
        try:
            figures = [
                run_once(
                    bench_db, tasks, workers, batch, metrics=metrics, scrape_every=scrape_every
                )
                for _ in range(runs)
            ]
        finally:
            bench_db.drop()
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
        "metrics": metrics,
        "scrapes": [f.scrapes for f in figures],
    }
