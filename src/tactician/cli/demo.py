"""`tactician demo`: the console over a delivery operation that runs while you watch.

It deploys a policy bundle (4 drivers; business-tier deliveries are sensitive and wait for an
approver), mints an admin token, serves the API and the console, runs a planner with local
workers, and streams the `logistics` scenario in: bookings, a storm that slows one zone, and
deliveries that wait for approval. Scenario time runs `SPEEDUP` times faster than the clock,
so an hour's drive takes 6 s and something happens about every second.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tactician.app import Tactician
from tactician.domain import NewTask
from tactician.govern.policy import bundle_version
from tactician.govern.roles import Role
from tactician.run.worker import WorkerOptions
from tactician.settings import Settings
from tactician.sim.scenarios import build
from tactician.sim.workload import WorkloadTask

SPEEDUP = 600.0
"""Scenario seconds per demo second."""
ROUND_TASKS = 600
"""Deliveries per pass through the scenario (about 8 minutes); then a new day begins."""
DRIVERS = 4
BREAKDOWN_RATE = 0.04
"""Share of delivery attempts that fail (a van breaks down) and are retried."""
DEMO_DIR = Path(".demo")
BUNDLE = f"""name: demo-logistics
description: The demo's delivery operation; business-tier deliveries need an approver.
pools:
  drivers: {DRIVERS}
approvals:
  - name: sensitive-deliveries
    match: {{sensitive: true}}
    approvers: {{roles: [approver, admin]}}
    required: 1
    expires_after: 1h
"""


def deliver(work_seconds: float, fail_rate: float = 0.0, **_features: Any) -> None:
    """Drive: sleep the delivery's scaled-down run time; now and then the van breaks down."""
    time.sleep(work_seconds)
    if random.random() < fail_rate:
        raise RuntimeError("the van broke down on the way")


def demo_app(db: str) -> Tactician:
    app = Tactician(settings=Settings.from_env(db=db, lease_seconds=10.0))
    app.pool("drivers", DRIVERS)
    app.task(deliver, pool="drivers", retries=2, backoff=0.5, max_backoff=2.0, timeout=60)
    return app


def as_new_task(task: WorkloadTask, start: float) -> NewTask:
    """A scenario task placed on the wall clock, its times compressed by SPEEDUP."""
    sensitive = task.features.get("tier") == "business"
    return NewTask(
        "deliver",
        {
            **task.features,
            "order": task.id,
            "work_seconds": round(task.duration / SPEEDUP, 2),
            "fail_rate": BREAKDOWN_RATE,
            "sensitive": sensitive,
        },
        release_at=start + task.release_at / SPEEDUP,
        due_at=None if task.due_at is None else start + task.due_at / SPEEDUP,
        weight=task.weight,
        estimate=None if task.estimate is None else task.estimate / SPEEDUP,
        tags=(str(task.features.get("zone", "")),),
        source="demo",
    )


@dataclass(frozen=True)
class Arrival:
    at: float
    """Seconds after the demo's start."""
    task: NewTask | None
    note: str = ""
    """A line to print instead of a task (the storm)."""


def arrivals(start: float) -> Iterator[Arrival]:
    """The scenario's bookings and storms on the wall clock, one day after another."""
    offset, day = 0.0, 0
    while True:
        day += 1
        scenario = build("logistics", tasks=ROUND_TASKS, seed=day, capacity={"drivers": DRIVERS})
        events: list[Arrival] = []
        for storm in scenario.events:
            zone = storm["zone"]
            events.append(
                Arrival(offset + storm["start"] / SPEEDUP, None, f"storm over {zone} begins")
            )
            events.append(Arrival(offset + storm["end"] / SPEEDUP, None, f"storm over {zone} ends"))
        for task in scenario.tasks:
            at = offset + task.submit_at / SPEEDUP
            events.append(Arrival(at, as_new_task(task, start + offset)))
        events.sort(key=lambda a: a.at)
        yield from events
        offset = max(offset + 1.0, events[-1].at + 1.0)


def _serve_workers(db: str, workers: int, log_file: str) -> None:
    logging.basicConfig(
        filename=log_file,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s",
    )
    demo_app(db).serve(workers, WorkerOptions(concurrency=3))


def _prepare(app: Tactician) -> str:
    """Deploy the demo bundle (unless it is live already) and mint an admin token."""
    admin = app.gate.actor(None, local_admin="demo")
    if app.gate.policy().version != bundle_version(BUNDLE):
        app.gate.deploy(admin, BUNDLE, "demo-logistics.yaml", reason="tactician demo")
    return app.gate.create_token(admin, f"demo-admin-{time.time():.0f}", Role.ADMIN)


def _start_api(settings: Settings, port: int) -> tuple[Any, threading.Thread]:
    import uvicorn

    from tactician.api.app import create_api

    config = uvicorn.Config(
        create_api(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the console could not start on port {port}")
        time.sleep(0.05)
    return server, thread


def _status(app: Tactician, elapsed: float, arrived: int) -> str:
    counts = app.store.counts()
    queued = sum(counts.get(s, 0) for s in ("ready", "retry_wait", "leased"))
    shown = (
        f"booked {counts.get('pending', 0)}",
        f"queued {queued}",
        f"running {counts.get('running', 0)}",
        f"awaiting approval {counts.get('awaiting_approval', 0)}",
        f"succeeded {counts.get('succeeded', 0)}",
        f"dead {counts.get('dead', 0)}",
    )
    return f"[{elapsed:5.0f}s] arrived {arrived:4d} · " + " · ".join(shown)


def default_db() -> str:
    DEMO_DIR.mkdir(exist_ok=True)
    return f"sqlite:///{DEMO_DIR / 'tactician.db'}"


def run_demo(db: str | None, duration: float | None, workers: int, port: int) -> None:
    """Serve the console with the scenario streaming in, until Ctrl-C or `duration` seconds."""
    db = db or default_db()
    folder = Path(db[len("sqlite:///") :]).parent if db.startswith("sqlite:///") else DEMO_DIR
    folder.mkdir(parents=True, exist_ok=True)
    log_file = str(folder / "tactician.log")
    app = demo_app(db)
    token = _prepare(app)
    app.close()
    server_process = multiprocessing.get_context("fork").Process(
        target=_serve_workers, args=(db, workers, log_file), name="planner"
    )
    server_process.start()  # before the API's thread: fork copies only the calling thread
    api, api_thread = None, None
    try:
        api, api_thread = _start_api(app.settings, port)
        print(f"Console: http://127.0.0.1:{port}/console/  token: {token}", flush=True)
        print(f"API: http://127.0.0.1:{port}/docs · database {db} · log {log_file}", flush=True)
        print("Ctrl-C stops the demo.", flush=True)
        _stream(app, duration)
    except KeyboardInterrupt:
        pass
    finally:
        if api is not None and api_thread is not None:
            api.should_exit = True
            api_thread.join(10)
        server_process.terminate()
        server_process.join(30)
    print(f"stopped · {app.store.counts()} · the database stays at {db}", flush=True)
    app.close()


def _stream(app: Tactician, duration: float | None) -> None:
    start_wall, start = time.time(), time.monotonic()
    upcoming = arrivals(start_wall)
    nxt = next(upcoming)
    arrived, next_status = 0, start + 1.0
    while duration is None or time.monotonic() - start < duration:
        elapsed = time.monotonic() - start
        batch: list[NewTask] = []
        while nxt.at <= elapsed:
            if nxt.task is not None:
                batch.append(nxt.task)
            else:
                print(f"[{elapsed:5.0f}s] {nxt.note}", flush=True)
            nxt = next(upcoming)
        if batch:
            app.submit_many(batch)
            arrived += len(batch)
        if time.monotonic() >= next_status:
            print(_status(app, elapsed, arrived), flush=True)
            next_status += 1.0
        time.sleep(0.1)
