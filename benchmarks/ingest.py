"""Ingest throughput per bus: messages turned into committed tasks per second, on PostgreSQL.

    .venv/bin/python benchmarks/ingest.py [--messages 10000] [--runs 3] [--batch 500]
        [--buses redis,nats,rabbitmq,outbox] [--pg postgresql://postgres@127.0.0.1:5432/postgres]

For each run and each bus, `--messages` JSON events are published first (not timed) to a fresh
Redis stream, JetStream subject, RabbitMQ queue or outbox source; then the same loop
`tactician ingest` runs (SourceRunner with the command's own wiring, in this process, so that
the command's start-up is not counted) takes them all: read, templated, committed in batches of
`--batch` in one transaction each, acknowledged. The figure is messages / seconds from the first
fetch to the last ack, with every message a committed task (checked).

The baseline, measured in the same run on the same kind of fresh database: the same tasks (built
by the same template) committed with `Tactician.submit_many` in batches of the same size, with
no bus at all. Each measurement gets a fresh database cloned from one migrated template, so none
sees another's tasks. Medians of the runs; the ratio is the bus's median over the baseline's.
Prints a Markdown table and writes it to benchmarks/ingest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from tactician.app import Tactician
from tactician.cli.ingest import link_for
from tactician.domain import KindSpec, NewTask
from tactician.govern.roles import Actor, Role
from tactician.govern.sources import SourceSpec
from tactician.ingest.records import Event, Unmatched
from tactician.ingest.sources import RunnerOptions, SourceRunner
from tactician.ingest.templates import task_for
from tactician.settings import Settings

ROOT = Actor("root", Role.ADMIN)
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
BUSES = ("redis", "nats", "rabbitmq", "outbox")
BASELINE = "submit_many (no bus)"
OUT = Path(__file__).with_name("ingest.md")


def bundle() -> str:
    templates = "".join(
        f"  - name: {bus}\n    source: bench-{bus}\n"
        "    task: {kind: job, payload: {n: '{n}'}}\n"
        for bus in (*BUSES, "direct")
    )
    return f"name: bench\ntemplates:\n{templates}"


def event(n: int) -> bytes:
    return json.dumps({"type": "order", "n": n, "customer": f"c{n % 97}"}).encode()


class Databases:
    """Fresh PostgreSQL databases cloned from one migrated template (kinds, bundle deployed)."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.template = f"tactician_bench_tpl_{uuid.uuid4().hex[:8]}"
        self.made: list[str] = [self.template]
        self._admin(f"CREATE DATABASE {self.template}")
        app = Tactician(settings=Settings(db=self.url(self.template)))
        app.store.register_kinds([KindSpec("job", pool="p")])
        app.gate.deploy(ROOT, bundle(), "bench.yaml")
        app.close()

    def url(self, name: str) -> str:
        return f"{self.admin_url.rpartition('/')[0]}/{name}"

    def _admin(self, sql: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql)

    def fresh(self) -> str:
        name = f"tactician_bench_{uuid.uuid4().hex[:8]}"
        self._admin(f"CREATE DATABASE {name} TEMPLATE {self.template}")
        self.made.append(name)
        return self.url(name)

    def drop_all(self) -> None:
        for name in reversed(self.made):
            self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --- publishing (not timed) ----------------------------------------------------------------------


def publish_redis(tag: str, count: int, _db: str) -> tuple[dict[str, Any], Callable[[], None]]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    stream = f"tactician-bench-{tag}"
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        pipe.xadd(stream, {"body": event(n)})
    pipe.execute()

    def clean() -> None:
        client.delete(stream)
        client.close()

    return {"url": REDIS_URL, "stream": stream}, clean


def publish_nats(tag: str, count: int, _db: str) -> tuple[dict[str, Any], Callable[[], None]]:
    import nats
    from nats.js.api import StorageType

    subject, stream = f"tactician.bench.{tag}", f"TACTICIAN_BENCH_{tag}"

    async def with_js(work: Callable[[Any], Any]) -> None:
        client = await nats.connect(NATS_URL)
        try:
            await work(client.jetstream())
        finally:
            await client.close()

    async def send(js: Any) -> None:
        await js.add_stream(name=stream, subjects=[subject], storage=StorageType.FILE)
        for start in range(0, count, 1000):
            await asyncio.gather(
                *(js.publish(subject, event(n)) for n in range(start, min(start + 1000, count)))
            )

    async def delete(js: Any) -> None:
        await js.delete_stream(stream)

    asyncio.run(with_js(send))
    return {"url": NATS_URL, "subject": subject}, lambda: asyncio.run(with_js(delete))


def publish_rabbitmq(tag: str, count: int, _db: str) -> tuple[dict[str, Any], Callable[[], None]]:
    import pika

    queue = f"tactician-bench-{tag}"
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    channel.tx_select()  # the commit returns once the broker holds every message
    for n in range(count):
        properties = pika.BasicProperties(delivery_mode=2, message_id=f"order-{n}")
        channel.basic_publish("", queue, event(n), properties)
    channel.tx_commit()

    def clean() -> None:
        channel.queue_delete(queue)
        connection.close()

    return {"url": AMQP_URL, "queue": queue}, clean


def publish_outbox(tag: str, count: int, db: str) -> tuple[dict[str, Any], Callable[[], None]]:
    with psycopg.connect(db) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO outbox (source, body) VALUES (%s, %s)",
            [("bench-outbox", event(n).decode()) for n in range(count)],
        )
    return {}, lambda: None


PUBLISH = {
    "redis": publish_redis,
    "nats": publish_nats,
    "rabbitmq": publish_rabbitmq,
    "outbox": publish_outbox,
}


# --- measuring -----------------------------------------------------------------------------------


def count_tasks(db: str, source: str) -> int:
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT idempotency_key) FROM tasks WHERE source = %s", (source,)
        ).fetchone()
    return int(row[0]) if row else 0


def measure_bus(bus: str, db: str, count: int, batch: int) -> float:
    """Seconds for the runner to take `count` published messages to committed tasks."""
    fields, clean = PUBLISH[bus](uuid.uuid4().hex[:10], count, db)
    try:
        spec = SourceSpec.model_validate(
            {"name": f"bench-{bus}", "type": bus, "batch_size": batch, "max_pending": 10**6}
            | fields
        )
        options = RunnerOptions(poll_timeout=0.5)
        runner = SourceRunner(spec, lambda: link_for(spec, Settings(db=db), None), options=options)
        runner.link = runner.connect()  # connected before the clock starts
        began = time.perf_counter()
        while runner.stats.messages < count:
            runner.step()
        elapsed = time.perf_counter() - began
        runner.close()
    finally:
        clean()
    made = count_tasks(db, spec.name)
    if made != count:
        raise SystemExit(f"{bus}: {made} tasks for {count} messages")
    return elapsed


def measure_baseline(db: str, count: int, batch: int) -> float:
    """Seconds to commit the same tasks with submit_many, in batches of `batch`."""
    app = Tactician(settings=Settings(db=db))
    try:
        templates = app.gate.policy().bundle.templates
        now = app.store.db_now()
        tasks: list[NewTask] = []
        for n in range(count):
            made = task_for(
                Event("bench-direct", json.loads(event(n)), f"direct:{n}"), templates, now
            )
            if isinstance(made, Unmatched):
                raise SystemExit(made.reason)
            tasks.append(made)
        actor = Actor("source:bench-direct", Role.OPERATOR)
        began = time.perf_counter()
        for start in range(0, count, batch):
            app.submit_many(tasks[start : start + batch], actor)
        elapsed = time.perf_counter() - began
    finally:
        app.close()
    made_count = count_tasks(db, "bench-direct")
    if made_count != count:
        raise SystemExit(f"baseline: {made_count} tasks for {count}")
    return elapsed


@contextmanager
def databases(admin_url: str) -> Iterator[Databases]:
    made = Databases(admin_url)
    try:
        yield made
    finally:
        made.drop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--buses", default=",".join(BUSES))
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    buses = [b for b in args.buses.split(",") if b]
    unknown = set(buses) - set(BUSES)
    if unknown:
        raise SystemExit(f"unknown bus {sorted(unknown)[0]!r}: choose from {', '.join(BUSES)}")
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {name: [] for name in (BASELINE, *buses)}
    with databases(args.pg) as dbs:
        for run in range(args.runs):
            paths = [BASELINE, *buses]
            for name in paths[run % len(paths) :] + paths[: run % len(paths)]:  # rotated
                db = dbs.fresh()
                if name == BASELINE:
                    took = measure_baseline(db, args.messages, args.batch)
                else:
                    took = measure_bus(name, db, args.messages, args.batch)
                seconds[name].append(took)
                print(f"run {run + 1}: {name}: {args.messages / took:,.0f}/s", flush=True)
    load = (load_before, os.getloadavg()[0])
    table = report(seconds, args, time.monotonic() - started, load)
    print(table)
    OUT.write_text(table)


def report(
    seconds: dict[str, list[float]],
    args: argparse.Namespace,
    took: float,
    load: tuple[float, float],
) -> str:
    base = statistics.median(args.messages / s for s in seconds[BASELINE])
    lines = [
        "# Ingest throughput per bus",
        "",
        f"{args.messages:,} JSON events per measurement, batches of {args.batch} (one "
        f"transaction each), PostgreSQL {server_version(args.pg)} on 127.0.0.1; a fresh "
        f"database per measurement; median of {args.runs} runs (the order of the paths rotated "
        "from run to run). Messages are published before "
        "the clock starts; the clock runs from the first fetch to the last acknowledgement. "
        "Baseline: the same tasks committed with `submit_many` in batches of the same size, "
        "no bus.",
        "",
        "| path | messages → committed tasks per second (median) | runs | vs baseline |",
        "|---|---|---|---|",
    ]
    for name, times in seconds.items():
        rates = [args.messages / s for s in times]
        median = statistics.median(rates)
        shown = " ".join(f"{r:,.0f}" for r in rates)
        lines.append(f"| {name} | {median:,.0f} | {shown} | {median / base:.2f} |")
    lines += [
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other work, Python "
        f"{platform.python_version()}; brokers on loopback (Redis without persistence, "
        "nats-server 2.9 JetStream file storage, RabbitMQ durable queue with persistent "
        f"messages). Load average {load[0]:.1f} before, {load[1]:.1f} after. Took {took:.0f} s.",
        "",
        "    .venv/bin/python benchmarks/ingest.py "
        f"--messages {args.messages} --runs {args.runs} --batch {args.batch}",
        "",
    ]
    return "\n".join(lines)


def server_version(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "?"


if __name__ == "__main__":
    main()
