"""`tactician demo`: a planner and workers, a sample workload streaming in, and a live view.

The workload is a small delivery operation: deliveries that need one of 4 drivers and must
not overlap per customer, rate-limited customer notifications, a flaky report job that is
retried with backoff, a job that sometimes overruns its hard timeout, and a schedule that
syncs inventory every 5 seconds.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import time
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from tactician.app import Tactician
from tactician.domain import NewTask, Task
from tactician.plan.schedules import ScheduleSpec
from tactician.run.schedules import ScheduleService
from tactician.run.worker import WorkerOptions
from tactician.settings import Settings
from tactician.store.protocol import TaskFilter

STATE_STYLE = {
    "succeeded": "green",
    "running": "bold cyan",
    "leased": "cyan",
    "ready": "yellow",
    "pending": "dim",
    "retry_wait": "magenta",
    "dead": "bold red",
    "cancelled": "red",
}


def deliver(order_id: str, customer: str, seconds: float) -> None:
    time.sleep(seconds)


def notify(customer: str, message: str) -> None:
    time.sleep(0.02)


def build_report(region: str, fail_rate: float) -> None:
    time.sleep(0.3)
    if random.random() < fail_rate:
        raise RuntimeError(f"report for {region}: upstream warehouse API returned garbage")


def reindex(seconds: float) -> None:
    time.sleep(seconds)


def sync_inventory() -> None:
    time.sleep(0.2)


def demo_app(db: str) -> Tactician:
    app = Tactician(settings=Settings.from_env(db=db, lease_seconds=10.0))
    app.pool("drivers", 4)
    app.task(deliver, pool="drivers", retries=3, timeout=30, concurrency_key="{customer}")
    app.task(notify, rate="5/s", retries=5)
    app.task(build_report, retries=3, backoff=0.5, max_backoff=4.0)
    app.task(reindex, timeout=1.5, retries=1)
    app.task(sync_inventory, retries=0)
    return app


def _stream(app: Tactician, rng: random.Random, now: float, serial: int) -> int:
    """Submit this second's arrivals; returns the next serial number."""
    tasks = []
    for _ in range(rng.randint(1, 4)):
        serial += 1
        customer = f"c{rng.randint(1, 6)}"
        tasks.append(
            NewTask(
                "deliver",
                {
                    "order_id": f"A{serial}",
                    "customer": customer,
                    "seconds": round(rng.uniform(0.5, 2.5), 2),
                },
                due_at=now + rng.uniform(5, 40),
                weight=rng.choice([1.0, 1.0, 3.0]),
                estimate=1.5,
                idempotency_key=f"order-A{serial}",
            )
        )
        tasks.append(NewTask("notify", {"customer": customer, "message": f"order A{serial}"}))
    if rng.random() < 0.3:
        region = rng.choice(["north", "south", "east"])
        tasks.append(NewTask("build_report", {"region": region, "fail_rate": 0.4}))
    if rng.random() < 0.15:
        tasks.append(NewTask("reindex", {"seconds": rng.choice([0.5, 1.0, 3.0])}))
    app.submit_many(tasks)
    return serial


def _view(app: Tactician, started: float, seconds: float) -> Group:
    counts = app.store.counts()
    summary = "  ".join(
        f"[{STATE_STYLE.get(s, 'white')}]{s} {n}[/]" for s, n in sorted(counts.items())
    )
    elapsed = time.monotonic() - started
    header = Panel(
        f"{summary}\n[dim]{elapsed:5.1f}s of {seconds:.0f}s · Ctrl-C stops · db {app.store.url}",
        title="Tactician demo",
    )
    pools = Table("pool", "capacity", "in use", "ready", "running", title="Pools")
    for usage in app.store.pools():
        capacity = "∞" if usage.pool.capacity is None else str(usage.pool.capacity)
        pools.add_row(
            usage.pool.name, capacity, str(usage.used), str(usage.ready), str(usage.running)
        )
    running = _recent(app, "running", 8)
    queue = _recent(app, "ready", 8)
    finished = app.tasks(TaskFilter(state="succeeded", limit=10_000))[-6:]
    failed = app.tasks(TaskFilter(state="dead", limit=10_000))[-4:]
    return Group(
        header,
        pools,
        _table("Running now", running),
        _table("Queue (ready, earliest deadline first)", queue),
        _table("Finished", finished + failed),
    )


def _recent(app: Tactician, state: str, limit: int) -> list[Task]:
    tasks = app.tasks(TaskFilter(state=state, limit=500))
    return sorted(tasks, key=lambda t: t.due_at or float("inf"))[:limit]


def _table(title: str, tasks: list[Task]) -> Table:
    table = Table(title=title)
    for name, width in (("id", 8), ("kind", 14), ("state", 10), ("try", 3), ("due in", 6)):
        table.add_column(name, min_width=width, no_wrap=True)
    table.add_column("payload / error", no_wrap=True, overflow="ellipsis")
    now = time.time()
    for t in tasks:
        due = "-" if t.due_at is None else f"{t.due_at - now:+.0f}s"
        detail: Any = t.last_error if t.state == "dead" else t.payload
        table.add_row(
            t.id[-8:],
            t.kind,
            f"[{STATE_STYLE.get(t.state, 'white')}]{t.state}[/]",
            str(t.attempt),
            due,
            str(detail)[:70],
        )
    return table


def _serve(db: str, workers: int, log_file: str) -> None:
    logging.basicConfig(
        filename=log_file,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s",
    )
    demo_app(db).serve(workers, WorkerOptions(concurrency=3))


def run_demo(db: str | None, seconds: float, workers: int) -> None:
    if db is None:
        folder = Path(".demo")
        folder.mkdir(exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-lock"):
            Path(f"{folder}/tactician.db{suffix}").unlink(missing_ok=True)
        db = f"sqlite:///{folder}/tactician.db"
    app = demo_app(db)
    ScheduleService(app.store, app).save(
        ScheduleSpec(name="inventory", kind="sync_inventory", payload={}, every=5.0)
    )
    log_file = str(Path(".demo") / "tactician.log")
    Path(".demo").mkdir(exist_ok=True)
    server = multiprocessing.get_context("fork").Process(
        target=_serve, args=(db, workers, log_file)
    )
    server.start()
    rng = random.Random(7)
    serial = 0
    started = time.monotonic()
    next_arrival = started
    try:
        with Live(_view(app, started, seconds), refresh_per_second=4, screen=False) as live:
            while time.monotonic() - started < seconds:
                if time.monotonic() >= next_arrival:
                    serial = _stream(app, rng, time.time(), serial)
                    next_arrival += 1.0
                live.update(_view(app, started, seconds))
                time.sleep(0.25)
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.join(30)
    counts = app.store.counts()
    late = [
        t
        for t in app.tasks(TaskFilter(state="succeeded", kind="deliver", limit=10_000))
        if t.due_at is not None and t.finished_at is not None and t.finished_at > t.due_at
    ]
    print(f"\nsubmitted {sum(counts.values())} tasks: {counts}")
    print(f"deliveries finished late: {len(late)}")
    print(f"inspect with: tactician tasks list --db {db} --state dead")
    print(f"the planner's and workers' log: {log_file}")
