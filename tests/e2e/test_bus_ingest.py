"""Bus sources end to end on PostgreSQL: Redis Streams, NATS JetStream, RabbitMQ, the outbox.

For each bus, 10,000 messages are published while a real `tactician ingest` process is killed
with SIGKILL three times and started again: at 20 %, 50 % and 80 % of the tasks, each time while
the bus shows messages delivered and not acknowledged (Redis's pending list, JetStream's ack
pending, locked outbox rows), a random few milliseconds later on RabbitMQ (AMQP does not show
them). In the end every
message is exactly one task (as many distinct idempotency keys and distinct payloads as
messages, and as many tasks), the bus holds nothing unacknowledged, and SIGTERM stops the last
process cleanly. The counts are printed and appended to test-results/bus_ingest.txt. Then, on
each bus, malformed messages and one no template takes become dead letters with their reasons
and are acknowledged, never delivered again; and with a small `max_pending` the source stops
pulling (the messages stay on the bus, counted there) and resumes when tasks finish.

The brokers are the machine's own (see /work/shared/SERVICES.md): Redis without persistence,
nats-server 2.9 with JetStream file storage (fsync on its two-minute timer: 2.9 has no
sync_interval setting), RabbitMQ with a durable queue and persistent messages published in AMQP
transactions. Only the ingest process is killed here, never a broker, so these tests show
nothing about a broker's own crash. A broker that is down skips its tests with the reason,
except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import random
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tactician.app import Tactician
from tactician.cli.ingest import link_for
from tactician.domain import KindSpec
from tactician.errors import InvalidInput
from tactician.govern.roles import Actor, Role
from tactician.govern.sources import SourceSpec
from tactician.ingest.sources import Link, Message, RunnerOptions, SourceRunner, SourceStalled
from tactician.settings import Settings
from tactician.store.protocol import TaskFilter
from tests.conftest import IN_CI

from .procs import TACTICIAN, Cluster, Proc, wait_for_progress, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Actor("root", Role.ADMIN)
RESULTS = Path(__file__).parents[2] / "test-results" / "bus_ingest.txt"
MESSAGES = 10_000
KILL_AT = (0.2, 0.5, 0.8)
"""Fractions of the messages committed as tasks at which the ingest process is killed."""
PORTS = {"redis": 6379, "nats": 4222, "rabbitmq": 5672}
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
BUNDLE = """name: buses
templates:
  - name: order
    source: {source}
    match: {{type: order}}
    task: {{kind: job, payload: {{n: "{{n}}"}}}}
"""


def need_broker(kind: str) -> None:
    """Skip (fail in CI) when the bus's broker does not answer."""
    if kind not in PORTS:
        return
    try:
        socket.create_connection(("127.0.0.1", PORTS[kind]), timeout=3).close()
    except OSError as exc:
        if IN_CI:
            pytest.fail(f"{kind} is required in CI: nothing answers on port {PORTS[kind]}: {exc}")
        pytest.skip(f"no {kind}: nothing answers on 127.0.0.1:{PORTS[kind]} ({exc})")


# --- the buses, seen from outside Tactician ------------------------------------------------------


class Bus:
    """Publishes to a bus and counts what it still holds, with clients of the test's own."""

    kind = ""

    def __init__(self, source: str, tag: str, db: str) -> None:
        self.source = source
        self.tag = tag
        self.db = db

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def publish(self, bodies: list[tuple[str, bytes]]) -> None:
        """(message id, body) pairs, each acknowledged by the broker before this returns."""
        raise NotImplementedError

    def held(self) -> int:
        """Messages not acknowledged yet: never delivered, or delivered and not acked."""
        raise NotImplementedError

    def in_flight(self) -> int | None:
        """Messages delivered to the ingest process and not acknowledged yet (a batch it is
        committing); None when the bus does not show them."""
        return None

    def close(self) -> None:
        pass


class RedisBus(Bus):
    kind = "redis"

    def __init__(self, source: str, tag: str, db: str) -> None:
        import redis

        super().__init__(source, tag, db)
        self.client = redis.Redis.from_url(REDIS_URL)
        self.stream = f"tactician-test-{tag}"

    def spec(self) -> dict[str, Any]:
        return {"url": REDIS_URL, "stream": self.stream, "claim_idle": "2s"}

    def publish(self, bodies: list[tuple[str, bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for _, body in bodies:
            pipe.xadd(self.stream, {"body": body})
        pipe.execute()

    def held(self) -> int:
        groups = self.client.xinfo_groups(self.stream) if self.client.exists(self.stream) else []
        for group in groups:
            if group["name"] == b"tactician":
                return int(group["lag"] or 0) + int(group["pending"])
        return int(self.client.xlen(self.stream))

    def in_flight(self) -> int | None:
        with contextlib.suppress(redis_errors()):
            return int(self.client.xpending(self.stream, "tactician")["pending"])
        return 0

    def close(self) -> None:
        self.client.delete(self.stream)
        self.client.close()


class NatsBus(Bus):
    kind = "nats"

    def __init__(self, source: str, tag: str, db: str) -> None:
        super().__init__(source, tag, db)
        self.subject = f"tactician.test.{tag}"
        self.stream = f"TACTICIAN_TEST_{tag}"

        async def create(js: Any) -> None:
            from nats.js.api import StorageType

            await js.add_stream(name=self.stream, subjects=[self.subject], storage=StorageType.FILE)

        self._with_js(create)

    def _with_js(self, work: Callable[[Any], Any]) -> Any:
        import nats

        async def run() -> Any:
            client = await nats.connect(NATS_URL, connect_timeout=3)
            try:
                return await work(client.jetstream())
            finally:
                await client.close()

        return asyncio.run(run())

    def spec(self) -> dict[str, Any]:
        return {"url": NATS_URL, "subject": self.subject, "ack_wait": "3s"}

    def publish(self, bodies: list[tuple[str, bytes]]) -> None:
        async def send(js: Any) -> None:
            acks = [js.publish(self.subject, body) for _, body in bodies]
            await asyncio.gather(*acks)  # each waits for the stream's PubAck

        self._with_js(send)

    def held(self) -> int:
        import nats.js.errors

        async def count(js: Any) -> int:
            try:
                info = await js.consumer_info(self.stream, "tactician")
            except nats.js.errors.NotFoundError:
                return int((await js.stream_info(self.stream)).state.messages)
            return int(info.num_pending) + int(info.num_ack_pending)

        return int(self._with_js(count))

    def in_flight(self) -> int | None:
        import nats.js.errors

        async def count(js: Any) -> int:
            try:
                return int((await js.consumer_info(self.stream, "tactician")).num_ack_pending)
            except nats.js.errors.NotFoundError:
                return 0

        return int(self._with_js(count))

    def close(self) -> None:
        async def delete(js: Any) -> None:
            await js.delete_stream(self.stream)

        self._with_js(delete)


class RabbitBus(Bus):
    kind = "rabbitmq"

    def __init__(self, source: str, tag: str, db: str) -> None:
        super().__init__(source, tag, db)
        self.queue = f"tactician-test-{tag}"
        with self._channel() as channel:
            channel.queue_declare(self.queue, durable=True)

    @contextlib.contextmanager
    def _channel(self) -> Iterator[Any]:
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            yield connection.channel()
        finally:
            connection.close()

    def spec(self) -> dict[str, Any]:
        return {"url": AMQP_URL, "queue": self.queue}

    def publish(self, bodies: list[tuple[str, bytes]]) -> None:
        import pika

        with self._channel() as channel:
            channel.tx_select()  # the commit returns once the broker holds every message
            for message_id, body in bodies:
                properties = pika.BasicProperties(delivery_mode=2, message_id=message_id)
                channel.basic_publish("", self.queue, body, properties, mandatory=True)
            channel.tx_commit()

    def held(self) -> int:
        """Ready messages: with no consumer holding any (paused or stopped), all it holds."""
        with self._channel() as channel:
            return int(channel.queue_declare(self.queue, passive=True).method.message_count)

    def close(self) -> None:
        with self._channel() as channel:
            channel.queue_delete(self.queue)


class OutboxBus(Bus):
    kind = "outbox"

    def spec(self) -> dict[str, Any]:
        return {"poll_interval": "1s"}

    def publish(self, bodies: list[tuple[str, bytes]]) -> None:
        with psycopg.connect(self.db) as conn, conn.cursor() as cur:  # one transaction
            cur.executemany(
                "INSERT INTO outbox (source, body) VALUES (%s, %s)",
                [(self.source, body.decode()) for _, body in bodies],
            )

    def held(self) -> int:
        with psycopg.connect(self.db, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM outbox WHERE source = %s", (self.source,))
            return int(row.fetchone()[0])  # type: ignore[index]

    def in_flight(self) -> int | None:
        """Rows claimed (locked) by a transaction that has not committed yet."""
        with psycopg.connect(self.db, autocommit=True) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM outbox WHERE source = %s) - (SELECT count(*) "
                "FROM (SELECT 1 FROM outbox WHERE source = %s FOR UPDATE SKIP LOCKED) AS free)",
                (self.source, self.source),
            ).fetchone()
            return int(row[0])  # type: ignore[index]


BUSES: dict[str, type[Bus]] = {
    "redis": RedisBus,
    "nats": NatsBus,
    "rabbitmq": RabbitBus,
    "outbox": OutboxBus,
}


@pytest.fixture(params=list(BUSES))
def bus(request: pytest.FixtureRequest, pg_url: str) -> Iterator[Bus]:
    """A fresh stream, subject, queue or outbox source on each bus, and a database whose live
    bundle turns its `{"type": "order", "n": …}` messages into `job` tasks."""
    kind = request.param
    need_broker(kind)
    tag = uuid.uuid4().hex[:10]
    source = f"{kind}-orders"
    app = Tactician(settings=Settings(db=pg_url))
    app.store.register_kinds([KindSpec("job", pool="p")])
    app.gate.deploy(ROOT, BUNDLE.format(source=source), "buses.yaml")
    app.close()
    made = BUSES[kind](source, tag, pg_url)
    yield made
    made.close()


def redis_errors() -> type[Exception]:
    import redis

    return redis.ResponseError  # the group does not exist yet


def order(n: int) -> bytes:
    return json.dumps({"type": "order", "n": n}).encode()


def spec_of(bus: Bus, **fields: Any) -> dict[str, Any]:
    return {"name": bus.source, "type": bus.kind, **bus.spec(), **fields}


def tasks_of(db: str, source: str) -> tuple[int, int, int]:
    """Tasks of the source, their distinct idempotency keys, their distinct payloads."""
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT idempotency_key), count(DISTINCT payload) "
            "FROM tasks WHERE source = %s",
            (source,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def dead_letters(db: str, source: str) -> list[str]:
    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT reason FROM dead_letters WHERE source = %s ORDER BY id", (source,)
        ).fetchall()
    return [str(row[0]) for row in rows]


class Publisher(threading.Thread):
    """Publishes `total` orders in chunks, one chunk every `every` seconds."""

    def __init__(self, bus: Bus, total: int, chunk: int, every: float) -> None:
        super().__init__(name="publisher", daemon=True)
        self.bus, self.total, self.chunk, self.every = bus, total, chunk, every
        self.published = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for start in range(0, self.total, self.chunk):
                began = time.monotonic()
                numbers = range(start, min(start + self.chunk, self.total))
                self.bus.publish([(f"order-{n}", order(n)) for n in numbers])
                self.published += len(numbers)
                time.sleep(max(0.0, self.every - (time.monotonic() - began)))
        except BaseException as exc:
            self.error = exc


def record(line: str) -> None:
    print(line)
    RESULTS.parent.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    with RESULTS.open("a") as out:
        out.write(f"{stamp} {line}\n")


# --- SIGKILL three times -------------------------------------------------------------------------


def kill_inside_a_batch(ingest: Proc, bus: Bus) -> int | str:
    """SIGKILL the ingest process while the bus shows messages delivered and not acknowledged
    (waiting up to 5 s for that); returns how many, or "?" when the bus cannot tell (RabbitMQ
    over AMQP): then the kill lands a random few milliseconds later."""
    deadline = time.monotonic() + 5.0
    while bus.in_flight() is not None and time.monotonic() < deadline:
        flying = bus.in_flight()
        if flying:
            ingest.kill()
            return flying
    time.sleep(random.uniform(0.0, 0.03))
    ingest.kill()
    return "?" if bus.in_flight() is None else 0


def test_every_message_one_task_through_three_sigkills(
    bus: Bus, pg_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "ingest.yaml"
    config.write_text(
        yaml.safe_dump({"sources": [spec_of(bus, batch_size=250, max_pending=20_000)]})
    )
    began = time.monotonic()
    with Cluster(pg_url, tmp_path) as cluster:
        ingest = Proc(
            "ingest",
            [TACTICIAN, "ingest", "--config", str(config), "--db", pg_url],
            cluster.env,
            cluster.log_dir,
        )
        cluster.procs.append(ingest)
        publisher = Publisher(bus, MESSAGES, chunk=250, every=0.25)
        publisher.start()
        ingest.start()

        def made() -> int:
            return tasks_of(pg_url, bus.source)[0]

        def progress() -> str:
            return f"published {publisher.published}, tasks {tasks_of(pg_url, bus.source)}"

        killed_at, in_flight = [], []
        for fraction in KILL_AT:
            wait_for_progress(made, int(MESSAGES * fraction), progress, stall=60, cap=120)
            flying = kill_inside_a_batch(ingest, bus)
            killed_at.append(made())
            in_flight.append(flying)
            ingest.start()
        publisher.join(120)
        assert publisher.error is None, publisher.error
        assert publisher.published == MESSAGES
        wait_for_progress(made, MESSAGES, progress, stall=60, cap=120)
        wait_until(lambda: bus.held() == 0, 30, lambda: f"{bus.held()} held on the bus")
        assert ingest.stop() == 0, "SIGTERM: the last ingest process exits cleanly"
        tasks, keys, payloads = tasks_of(pg_url, bus.source)
        held = bus.held()
    lost = MESSAGES - payloads
    duplicated = tasks - payloads
    record(
        f"{bus.kind}: published {MESSAGES}, tasks {tasks}, distinct idempotency keys {keys}, "
        f"distinct payloads {payloads}, lost {lost}, duplicated {duplicated}, "
        f"unacknowledged on the bus {held}, SIGKILLs {len(killed_at)} (at {killed_at} tasks, "
        f"with {in_flight} messages delivered and not acknowledged), "
        f"{time.monotonic() - began:.1f} s"
    )
    assert (tasks, keys, payloads, held) == (MESSAGES, MESSAGES, MESSAGES, 0)
    assert dead_letters(pg_url, bus.source) == []
    assert 0 not in in_flight, "every kill found messages delivered and not acknowledged"


# --- in one process: dead letters and backpressure -----------------------------------------------


def runner_for(bus: Bus, db: str, **fields: Any) -> SourceRunner:
    spec = SourceSpec.model_validate(spec_of(bus, **fields))
    options = RunnerOptions(poll_timeout=0.2, recheck_every=0.1)
    return SourceRunner(spec, lambda: link_for(spec, Settings(db=db), None), options=options)


@contextlib.contextmanager
def running(runner: SourceRunner) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop.is_set,), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the runner stops within a batch of being asked"


def test_unreadable_messages_are_dead_letters_acked_once(bus: Bus, pg_url: str) -> None:
    bus.publish(
        [
            ("m-1", order(1)),
            ("m-2", b'{"type": "order", "n": '),  # cut short: not JSON
            ("m-3", json.dumps({"type": "refund", "n": 3}).encode()),  # no template takes it
            ("m-4", b"[1, 2]"),  # JSON, but not an object
        ]
    )
    quick_redelivery = {"ack_wait": "1s"} if bus.kind == "nats" else {}
    runner = runner_for(bus, pg_url, **quick_redelivery)
    with running(runner):
        wait_until(
            lambda: len(dead_letters(pg_url, bus.source)) == 3 and bus.held() == 0,
            30,
            lambda: f"dead letters {dead_letters(pg_url, bus.source)}, held {bus.held()}",
        )
        time.sleep(2.5)  # past NATS's ack wait and Redis's claim scan: nothing comes back
    reasons = dead_letters(pg_url, bus.source)
    assert len(reasons) == 3, reasons
    assert reasons[0].startswith("the message is not JSON"), reasons
    assert "no template of source" in reasons[1] and "tried order" in reasons[1], reasons
    assert reasons[2] == "an event is a JSON object, not list", reasons
    assert tasks_of(pg_url, bus.source) == (1, 1, 1)
    assert bus.held() == 0
    assert runner.stats.dead_letters == 3 and runner.stats.messages == 4


def backpressure_counted(db: str, source: str) -> float:
    """The metric counters' `tactician_backpressure` for the source, as flushed to the database."""
    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT labels, value FROM metric_counters WHERE name = 'tactician_backpressure'"
        ).fetchall()
    return sum(float(value) for labels, value in rows if json.loads(labels)["source"] == source)


def test_backpressure_stops_pulling_and_resumes(
    bus: Bus, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    total, bound = 200, 50
    bus.publish([(f"order-{n}", order(n)) for n in range(total)])
    runner = runner_for(bus, pg_url, max_pending=bound, batch_size=20)
    app = Tactician(settings=Settings(db=pg_url))
    try:
        with running(runner):
            wait_until(
                lambda: runner.stats.pauses == 1,
                30,
                lambda: f"tasks {tasks_of(pg_url, bus.source)}",
            )
            time.sleep(1.0)  # paused: it pulls nothing more
            assert tasks_of(pg_url, bus.source)[0] == bound
            assert bus.held() == total - bound, "the rest waits on the bus, not in memory"
            cancelled = 0
            while cancelled < total:  # tasks finish (cancelled here): the source resumes
                waiting = [
                    task.id
                    for task in app.tasks(TaskFilter(source=bus.source, state="ready", limit=1000))
                ]
                assert 0 < len(waiting) <= bound
                for task_id in waiting:
                    app.cancel(task_id)
                cancelled += len(waiting)
                wait_until(
                    lambda done=cancelled: tasks_of(pg_url, bus.source)[0] > done or done == total,
                    30,
                    lambda: f"tasks {tasks_of(pg_url, bus.source)}, held {bus.held()}",
                )
        assert tasks_of(pg_url, bus.source) == (total, total, total)
        assert bus.held() == 0
        assert runner.stats.pauses >= 2, "paused, resumed, and paused again at the bound"
        pausing = [r for r in caplog.records if "pausing, the bus keeps" in r.getMessage()]
        assert len(pausing) == runner.stats.pauses, "logged once per episode"
        assert backpressure_counted(pg_url, bus.source) >= runner.stats.pauses
    finally:
        app.close()


# --- the runner's own rules, with a bus in memory (SQLite) ---------------------------------------


class MemoryBus:
    """A bus in a list: what was delivered, acknowledged and given back."""

    name = "memory"

    def __init__(self, bodies: list[bytes]) -> None:
        self.waiting = [Message(f"m{i}", body) for i, body in enumerate(bodies)]
        self.acked: list[Message] = []
        self.released: list[Message] = []

    def fetch(self, limit: int, timeout: float) -> list[Message]:
        taken, self.waiting = self.waiting[:limit], self.waiting[limit:]
        return taken

    def ack(self, messages: Sequence[Message]) -> None:
        self.acked += messages

    def release(self, messages: Sequence[Message]) -> None:
        self.released += messages
        self.waiting = [*messages, *self.waiting]

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        pass


def memory_runner(
    app: Tactician, bus: MemoryBus, submit: Callable[..., list[str]] | None = None
) -> SourceRunner:
    spec = SourceSpec(name="memory", type="outbox", batch_size=10)
    link = Link(
        bus,
        app.store,
        submit or (lambda tasks, actor: app.submit_many(tasks, actor)),
        lambda: app.gate.policy().bundle.templates,
    )
    return SourceRunner(spec, lambda: link, options=RunnerOptions(backoff_initial=0.01))


def test_a_template_naming_an_unknown_kind_leaves_the_batch_on_the_bus(sqlite_url: str) -> None:
    app = Tactician(settings=Settings(db=sqlite_url))
    app.gate.deploy(ROOT, BUNDLE.format(source="memory"), "memory.yaml")
    bus = MemoryBus([order(1), order(2)])
    runner = memory_runner(app, bus)
    with pytest.raises(SourceStalled, match="unknown kind 'job', which a template names"):
        runner.step()  # `run` logs it and tries again with backoff
    assert (len(bus.waiting), len(bus.released), bus.acked) == (2, 2, [])
    assert app.store.dead_letters() == []
    app.store.register_kinds([KindSpec("job", pool="p")])  # the workers' app starts
    assert runner.step() == 2
    assert len(bus.acked) == 2 and tasks_count(app) == 2
    app.close()


def test_a_batch_the_store_refuses_costs_only_the_message_at_fault(sqlite_url: str) -> None:
    app = Tactician(settings=Settings(db=sqlite_url))
    app.store.register_kinds([KindSpec("job", pool="p")])
    app.gate.deploy(ROOT, BUNDLE.format(source="memory"), "memory.yaml")

    def picky(tasks: Sequence[Any], actor: Actor) -> list[str]:
        if any(task.payload["n"] == 13 for task in tasks):
            raise InvalidInput("thirteen is refused")
        return app.submit_many(tasks, actor)

    bus = MemoryBus([order(n) for n in range(10, 16)])
    assert memory_runner(app, bus, picky).step() == 6
    assert len(bus.acked) == 6 and tasks_count(app) == 5
    [letter] = app.store.dead_letters()
    assert (letter.source, letter.reason, json.loads(letter.body)["n"]) == (
        "memory",
        "thirteen is refused",
        13,
    )
    app.close()


def tasks_count(app: Tactician) -> int:
    return len(app.tasks(TaskFilter(source="memory", limit=1000)))


def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "ingest.yaml"
    config.write_text("sources:\n  - name: a\n    type: redis\n    url: redis://x\n")
    done = subprocess.run(
        [TACTICIAN, "ingest", "--config", str(config), "--db", f"sqlite:///{tmp_path}/t.db"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr == f"error: {config}:2: sources[0].stream: is required for type redis\n"
    config.write_text("sources:\n  - name: a\n    type: outbox\n")
    done = subprocess.run(
        [TACTICIAN, "ingest", "--config", str(config), "--db", f"sqlite:///{tmp_path}/t.db"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stderr) == (
        2,
        "error: source a: an outbox needs Tactician on PostgreSQL (--db postgresql://…)\n",
    )
    # The same source from the live bundle: the same one line, and the process ends.
    db = f"sqlite:///{tmp_path}/bundle.db"
    app = Tactician(settings=Settings(db=db))
    app.gate.deploy(ROOT, "name: b\nsources: [{name: a, type: outbox}]\n", "b.yaml")
    app.close()
    done = subprocess.run(
        [TACTICIAN, "ingest", "--db", db], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr.splitlines()[-1]) == (
        2,
        "error: source a: an outbox needs Tactician on PostgreSQL (--db postgresql://…)",
    )


def test_sources_from_the_live_bundle(pg_url: str, tmp_path: Path) -> None:
    """Without --config, `tactician ingest` runs the live bundle's `sources:` (--source picks)."""
    app = Tactician(settings=Settings(db=pg_url))
    app.store.register_kinds([KindSpec("job", pool="p")])
    bundle = BUNDLE.format(source="shop") + (
        "sources:\n  - {name: shop, type: outbox}\n  - {name: other, type: outbox}\n"
    )
    app.gate.deploy(ROOT, bundle, "buses.yaml")
    app.close()
    shop = OutboxBus("shop", "-", pg_url)
    shop.publish([(f"order-{n}", order(n)) for n in range(3)])
    with Cluster(pg_url, tmp_path) as cluster:
        ingest = Proc(
            "ingest",
            [TACTICIAN, "ingest", "--db", pg_url, "--source", "shop"],
            cluster.env,
            cluster.log_dir,
        )
        cluster.procs.append(ingest)
        ingest.start()
        wait_until(lambda: tasks_of(pg_url, "shop")[0] == 3, 60, lambda: ingest.tail())
        assert ingest.stop() == 0
    assert shop.held() == 0
    assert "source shop: outbox rows" in ingest.text() and "source other" not in ingest.text()


TWO_SOURCES = """name: more-buses
templates:
  - {name: order, source: shop, match: {type: order}, task: {kind: job, payload: {n: "{n}"}}}
  - {name: later, source: later, match: {type: order}, task: {kind: job, payload: {n: "{n}"}}}
sources:
  - {name: shop, type: outbox}
  - {name: later, type: outbox}
"""


def test_serve_with_ingest_runs_the_bundles_sources_beside_the_planner(
    pg_url: str, tmp_path: Path
) -> None:
    """`tactician serve --ingest` pulls the live bundle's sources in a child process, follows
    a deploy that adds one, and its SIGTERM stops them with the planner."""
    app = Tactician(settings=Settings(db=pg_url))
    app.store.register_kinds([KindSpec("job", pool="p")])
    bundle = BUNDLE.format(source="shop") + "sources: [{name: shop, type: outbox}]\n"
    app.gate.deploy(ROOT, bundle, "buses.yaml")
    shop = OutboxBus("shop", "-", pg_url)
    shop.publish([(f"order-{n}", order(n)) for n in range(5)])
    with Cluster(pg_url, tmp_path) as cluster:
        serve = Proc(
            "serve",
            [TACTICIAN, "serve", "--ingest", "--workers", "0", "--port", "0", "--db", pg_url],
            cluster.env,
            cluster.log_dir,
        )
        cluster.procs.append(serve)
        serve.start()
        wait_until(lambda: tasks_of(pg_url, "shop")[0] == 5, 60, lambda: serve.tail())
        shop.publish([(f"order-{n}", order(n)) for n in range(5, 8)])  # while it runs
        wait_until(lambda: tasks_of(pg_url, "shop")[0] == 8, 60, lambda: serve.tail())
        later = OutboxBus("later", "-", pg_url)
        later.publish([(f"late-{n}", order(100 + n)) for n in range(4)])
        app.gate.deploy(ROOT, TWO_SOURCES, "more-buses.yaml")  # seen within 5 s, no restart
        wait_until(lambda: tasks_of(pg_url, "later")[0] == 4, 60, lambda: serve.tail())
        shop.publish([(f"order-{n}", order(n)) for n in range(8, 10)])
        wait_until(lambda: tasks_of(pg_url, "shop")[0] == 10, 60, lambda: serve.tail())
        assert serve.stop() == 0
    app.close()
    assert shop.held() == 0 and later.held() == 0
    text = serve.text()
    assert "source shop: outbox rows" in text
    assert "changes the sources: shop, later" in text
    assert text.count("source shop: stopped after") == 2  # at the deploy, and at SIGTERM
