"""`tactician ingest`: pull events from buses (Redis Streams, NATS JetStream, RabbitMQ, the
PostgreSQL outbox) and commit them as tasks, until SIGTERM or Ctrl-C; `tactician serve --ingest`
runs the live bundle's sources the same way in a child process.

The sources come from `--config FILE` (a `sources:` list) or, without it, from the live policy
bundle's `sources:` section. Each source runs in a thread of its own with its own database
connection. On SIGTERM each finishes the batch in hand (commit, ack) and the process exits 0.
`register` adds the command to the `tactician` app.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Annotated

import typer

from tactician.cli.options import DbOption
from tactician.errors import InvalidInput, TacticianError
from tactician.settings import Settings

if TYPE_CHECKING:
    from tactician.app import Tactician
    from tactician.govern.sources import SourceSpec
    from tactician.ingest.sources import Link

log = logging.getLogger("tactician.ingest")
BUNDLE_CHECK_S = 5.0
"""How often a process running the live bundle's sources looks for a deploy that changes them."""

ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="A YAML file with a `sources:` list; default: the live policy bundle's sources.",
    ),
]
SourceOption = Annotated[
    list[str] | None,
    typer.Option(
        "--source", metavar="NAME", help="Run only the source of this name (may be repeated)."
    ),
]
AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        help="Your app as module:attribute, to register its task kinds (else the kinds its "
        "workers registered in the database are used).",
    ),
]


def register(cli: typer.Typer) -> None:
    """Add `ingest` to the `tactician` app."""
    cli.command("ingest")(ingest)


def ingest(
    config: ConfigOption = None,
    source: SourceOption = None,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Pull events from the configured buses and commit them as tasks until SIGTERM/Ctrl-C."""
    from tactician.ingest.sources import read_sources, select_sources

    settings = Settings.from_env(db=db)
    _logging(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    template = _load_app(app) if app else None
    if config is None:
        if not follow_bundle(settings, template, source or [], stop, required=True):
            raise typer.Exit(1)
        return
    chosen = select_sources(read_sources(config), source or [])
    if not chosen:
        raise InvalidInput(f"no sources to run: {config} declares none")
    if not run_sources(chosen, settings, template, stop):
        raise typer.Exit(1)


def serve_sources(settings: Settings, template: Tactician | None) -> None:
    """`tactician serve --ingest`: the live bundle's sources in this (a child) process, until
    SIGTERM; none declared is logged, not an error (the planner and workers go on)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if not follow_bundle(settings, template, [], stop, required=False):
        raise SystemExit(1)


def follow_bundle(
    settings: Settings,
    template: Tactician | None,
    names: Sequence[str],
    stop: threading.Event,
    *,
    required: bool,
) -> bool:
    """The live bundle's sources (those `names`, or all), until `stop`. A deploy that changes
    them is seen within BUNDLE_CHECK_S: the running sources finish their batch (commit, ack)
    and the new set starts. With `required`, a bundle that declares none at the start is an
    error; otherwise, and after the start, ingest waits for a deploy that declares some.
    False if a source crashed."""
    from tactician.ingest.sources import select_sources

    declared = _bundle_sources(settings, stop)
    if declared is None:
        return True  # told to stop while waiting for the database
    chosen = select_sources(declared, names)
    if not chosen and required:
        raise InvalidInput("no sources to run: the live policy bundle declares none")
    while not stop.is_set():
        changed = _Change()
        watch = threading.Thread(
            target=_watch_bundle,
            args=(settings, names, chosen, stop, changed),
            name="bundle-watch",
        )
        watch.start()
        try:
            if chosen:
                ok = run_sources(chosen, settings, template, changed)
            else:
                log.warning("ingest: the live policy bundle declares no sources; waiting for one")
                ok = True
            while watch.is_alive():  # short waits: the main thread runs the signal handler
                watch.join(0.2)
        finally:  # an error above must not leave the watcher (and the process) running
            changed.set()
            watch.join()
        if not ok:
            return False
        if changed.sources is not None:
            chosen = changed.sources
    return True


class _Change(threading.Event):
    """Set when the running sources must stop: told to, a source crashed, or a deploy changed
    them (then `sources` is the new set)."""

    sources: list[SourceSpec] | None = None


def _watch_bundle(
    settings: Settings,
    names: Sequence[str],
    running: Sequence[SourceSpec],
    stop: threading.Event,
    changed: _Change,
) -> None:
    """Set `changed` (with the new sources on it) when the live bundle's sources differ from
    `running`, or when `stop` is set; also ends when `changed` is set by anyone else (a crashed
    source stops the others)."""
    from tactician.ingest.sources import select_sources
    from tactician.run.gate import Gate
    from tactician.store.open import open_store

    store = None
    checked = time.monotonic()
    problem = None
    try:
        while not changed.wait(0.2):
            if stop.is_set():
                changed.set()
                return
            if time.monotonic() - checked < BUNDLE_CHECK_S:
                continue
            checked = time.monotonic()
            try:
                store = store or open_store(settings.db, settings)
                policy = Gate(store).policy()
                now = select_sources(policy.bundle.sources, names)
            except Exception as exc:  # a database away, a source no longer declared
                message = exc.message if isinstance(exc, TacticianError) else repr(exc)
                if message != problem:
                    log.error("ingest: cannot read the live bundle's sources: %s", message)
                problem = message
                continue
            problem = None
            if now != list(running):
                log.info(
                    "ingest: policy %s changes the sources: %s",
                    policy.version[:12],
                    ", ".join(spec.name for spec in now) or "none",
                )
                changed.sources = now
                changed.set()
    finally:
        changed.set()  # however it ends, the sources of this round stop with it
        if store is not None:
            store.close()


def run_sources(
    chosen: Sequence[SourceSpec],
    settings: Settings,
    template: Tactician | None,
    stop: threading.Event,
) -> bool:
    """Each source in a thread of its own until `stop` is set; False if one crashed (then the
    others are stopped too: a half-running ingest would hide the fault)."""
    from tactician.ingest.sources import SourceRunner

    logging.getLogger("pika").setLevel(logging.WARNING)  # a line per socket event at INFO
    outboxes = [spec.name for spec in chosen if spec.type == "outbox"]
    if outboxes and not settings.db.startswith(("postgresql://", "postgres://")):
        raise InvalidInput(
            f"source {outboxes[0]}: an outbox needs Tactician on PostgreSQL (--db postgresql://…)"
        )
    runners = [SourceRunner(spec, partial(link_for, spec, settings, template)) for spec in chosen]
    crashed: list[str] = []

    def run(runner: SourceRunner) -> None:
        try:
            runner.run(stop.is_set)
        except BaseException:
            log.exception("source %s: stopped by an unexpected error", runner.spec.name)
            crashed.append(runner.spec.name)
            stop.set()

    threads = [
        threading.Thread(target=run, args=(r,), name=f"source-{r.spec.name}") for r in runners
    ]
    for spec in chosen:
        log.info("source %s: %s, batch %d, max_pending %d", *_shown(spec))
    for thread in threads:
        thread.start()
    # Joined in short waits: the main thread must stay free to run the signal handler.
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(0.2)
    for runner in runners:
        s = runner.stats
        log.info(
            "source %s: stopped after %d messages, %d tasks, %d dead letters, %d pauses",
            runner.spec.name,
            s.messages,
            s.tasks,
            s.dead_letters,
            s.pauses,
        )
    return not crashed


def link_for(spec: SourceSpec, settings: Settings, template: Tactician | None) -> Link:
    """A fresh app (its own database connection) and the source's bus connection."""
    from tactician.app import Tactician
    from tactician.ingest.sources import Link, open_source
    from tactician.observe import counters
    from tactician.store.postgres import PostgresStore

    app = Tactician(settings=settings)
    if template is not None:
        app.kinds.update(template.kinds)
        app.pool_capacity.update(template.pool_capacity)
    try:
        store = app.store
        database = (store.conn, store.url) if isinstance(store, PostgresStore) else None
        bus = open_source(spec, database)
    except BaseException:
        app.close()
        raise

    def close() -> None:
        counters.flush(store)
        app.close()

    return Link(
        source=bus,
        store=store,
        submit=lambda tasks, actor: app.submit_many(tasks, actor),
        templates=lambda: app.gate.policy().bundle.templates,
        close=close,
        tick=lambda: counters.flush_due(store),
    )


def _bundle_sources(settings: Settings, stop: threading.Event) -> tuple[SourceSpec, ...] | None:
    """The live bundle's sources, waiting for a database that is not up yet (None: told to
    stop meanwhile); each source then reconnects on its own."""
    from tactician.run.gate import Gate
    from tactician.store.open import open_store_waiting

    store = open_store_waiting(settings.db, settings, stop.is_set)
    if store is None:
        return None
    try:
        return Gate(store).policy().bundle.sources
    finally:
        store.close()


def _load_app(path: str) -> Tactician:
    from tactician.cli.main import load_app

    return load_app(path)


def _shown(spec: SourceSpec) -> tuple[str, str, int, int]:
    from tactician.ingest.sources.base import redact_url

    if spec.url is None:
        bus = f"outbox rows with source = {spec.name!r}"
    else:
        where = spec.stream or spec.subject or spec.queue
        bus = f"{spec.type} {redact_url(spec.url)} {where}"
    return spec.name, bus, spec.batch_size, spec.max_pending


def _logging(settings: Settings) -> None:
    """Structured lines on stderr, as every long-running command writes them."""
    from tactician.observe import counters
    from tactician.observe.logs import Format, configure_logging

    if settings.log_format not in ("json", "console"):
        raise InvalidInput("TACTICIAN_LOG_FORMAT must be json or console")
    fmt: Format = "json" if settings.log_format == "json" else "console"
    configure_logging(settings.log_level, fmt)
    counters.configure(settings.metrics)
