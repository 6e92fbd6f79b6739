"""The `tactician` command. Bad input ends with one line on stderr and exit code 2."""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from tactician.app import Tactician
from tactician.cli.agent import register as register_agent
from tactician.cli.govern import acting, authorized
from tactician.cli.govern import register as register_govern
from tactician.cli.ingest import register as register_ingest
from tactician.cli.models import register as register_models
from tactician.cli.options import DbOption, JsonOption, TokenOption
from tactician.cli.report import parse_when
from tactician.cli.report import register as register_report
from tactician.cli.simulate import CapacityOption, parse_capacities
from tactician.cli.simulate import simulate as simulate_command
from tactician.domain import NewTask, Task, TaskState
from tactician.errors import InvalidInput, TacticianError
from tactician.govern.roles import Operation
from tactician.run.worker import WorkerOptions
from tactician.settings import Settings
from tactician.store.protocol import TaskFilter

cli = typer.Typer(
    name="tactician",
    help="Tactician: decides what runs when, runs it durably, keeps humans in charge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
tasks_cli = typer.Typer(help="List, inspect, cancel and retry tasks.", no_args_is_help=True)
schedules_cli = typer.Typer(help="Recurring tasks: cron or intervals.", no_args_is_help=True)
bench_cli = typer.Typer(help="Benchmarks.", no_args_is_help=True)
cli.add_typer(tasks_cli, name="tasks")
cli.add_typer(schedules_cli, name="schedules")
cli.add_typer(bench_cli, name="bench")
workload_cli = typer.Typer(help="Simulator workloads: generate and inspect.", no_args_is_help=True)
cli.add_typer(workload_cli, name="workload")
register_models(cli, bench_cli)  # train, models …, bench decide
register_govern(cli)  # audit, tokens, policy, approvals, overrides
register_ingest(cli)  # ingest: bus sources
register_report(cli)  # report (the KPI report)
register_agent(cli)  # agent (edge sites), agent keygen, sites

out = Console(highlight=False)
F = TypeVar("F", bound=Callable[..., Any])

AppOption = Annotated[
    str | None, typer.Option("--app", help="Your app as module:attribute, e.g. myapp.tasks:app.")
]


def _open(db: str | None, app_path: str | None = None) -> Tactician:
    if app_path:
        app = load_app(app_path)
        if db:
            app.settings = Settings.from_env(db=db)
        return app
    return Tactician(settings=Settings.from_env(db=db))


def load_app(path: str) -> Tactician:
    """Import `module:attribute` and return the Tactician it names."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise InvalidInput(f"--app must look like module:attribute, got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInput(f"cannot import {module_name}: {exc}") from None
    app = getattr(module, attribute, None)
    if not isinstance(app, Tactician):
        raise InvalidInput(f"{path} is not a Tactician app")
    return app


def _time(text: str | None, name: str) -> float | None:
    """Seconds since the epoch, an ISO 8601 time with a zone, or +N (seconds from now)."""
    if text is None:
        return None
    text = text.strip()
    try:
        if text.startswith("+"):
            return dt.datetime.now(dt.UTC).timestamp() + float(text[1:])
        try:
            return float(text)
        except ValueError:
            when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"--{name}: not a time (epoch seconds, ISO 8601 or +seconds): {text!r}"
        ) from None
    if when.tzinfo is None:
        raise InvalidInput(f"--{name}: give a time zone, e.g. {text}Z or {text}+01:00")
    return when.timestamp()


def _json_object(text: str) -> dict[str, Any]:
    """A payload from the command line: a JSON object, or a one-line error."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput("payload must be a JSON object")
    return data


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=str, sort_keys=True) + "\n")


def _task_json(task: Task) -> dict[str, Any]:
    data = asdict(task)
    data["state"] = str(task.state)
    return data


def _fmt_time(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


# --- running ---------------------------------------------------------------------------------


@cli.command()
def serve(
    app: AppOption = None,
    db: DbOption = None,
    workers: Annotated[int, typer.Option(min=0, help="Worker processes.")] = 2,
    concurrency: Annotated[int, typer.Option(min=1, help="Runners per worker.")] = 1,
    batch: Annotated[int, typer.Option(min=1, help="Tasks claimed per runner at once.")] = 1,
    host: Annotated[str, typer.Option(help="The API's address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="The API's port (0: none).")] = 8700,
    ingest: Annotated[
        bool, typer.Option("--ingest", help="Also pull the live bundle's bus sources.")
    ] = False,
) -> None:
    """Run the REST API, the planner and local worker processes until Ctrl-C."""
    from tactician.cli.ingest import serve_sources

    _logging()
    the_app = _open(db, app)
    if port:
        _serve_api(the_app.settings, host, port)
    services = []
    if ingest:
        template = the_app if app else None
        services.append(("ingest", functools.partial(serve_sources, the_app.settings, template)))
    the_app.serve(workers, WorkerOptions(concurrency=concurrency, batch=batch), services)


@cli.command()
def api(
    db: DbOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8700,
) -> None:
    """Serve the REST API only (OpenAPI at /docs) until Ctrl-C."""
    import uvicorn

    from tactician.api.app import create_api

    _logging()
    uvicorn.run(create_api(Settings.from_env(db=db)), host=host, port=port, log_level="info")


def _serve_api(settings: Settings, host: str, port: int) -> None:
    """The API in a thread of this (the planner's) process."""
    import threading

    import uvicorn

    from tactician.api.app import create_api

    server = uvicorn.Server(uvicorn.Config(create_api(settings), host=host, port=port))
    threading.Thread(target=server.run, name="api", daemon=True).start()
    out.print(f"API on http://{host}:{port} (docs at /docs)")


@cli.command()
def worker(
    app: Annotated[str, typer.Option("--app", help="Your app as module:attribute.")],
    db: DbOption = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Runner processes.")] = 1,
    batch: Annotated[int, typer.Option(min=1, help="Tasks claimed per runner at once.")] = 1,
) -> None:
    """Run a worker for the app's task kinds until Ctrl-C or SIGTERM."""
    _logging()
    _open(db, app).run_worker(WorkerOptions(concurrency=concurrency, batch=batch))


@cli.command()
def planner(app: AppOption = None, db: DbOption = None) -> None:
    """Run a planner (one is active; others stand by) until Ctrl-C or SIGTERM."""
    _logging()
    _open(db, app).run_planner()


@cli.command()
def demo(
    db: DbOption = None,
    duration: Annotated[
        float | None, typer.Option(min=1, help="Stop after this many seconds (default: Ctrl-C).")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
    port: Annotated[int, typer.Option(min=1, max=65535, help="The console's port.")] = 8700,
) -> None:
    """The console on a delivery operation streaming in (default database .demo/tactician.db)."""
    from tactician.cli.demo import run_demo

    run_demo(db, duration, workers, port)


# --- submitting and inspecting ------------------------------------------------------------------


@cli.command()
def submit(
    kind: Annotated[str, typer.Argument(help="The task kind.")],
    payload: Annotated[str, typer.Argument(help="A JSON object.")] = "{}",
    db: DbOption = None,
    app: AppOption = None,
    due_at: Annotated[str | None, typer.Option(help="Deadline: epoch, ISO 8601, +seconds.")] = None,
    release_at: Annotated[str | None, typer.Option(help="Earliest start.")] = None,
    weight: Annotated[float, typer.Option(help="Value of being on time.")] = 1.0,
    estimate: Annotated[float | None, typer.Option(help="Expected seconds.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Idempotency key.")] = None,
    depends_on: Annotated[list[str] | None, typer.Option(help="Task ids to wait for.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="A tag (repeat).")] = None,
    tenant: Annotated[str, typer.Option(help="Whose work it is.")] = "default",
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit one task; prints its id."""
    data = _json_object(payload)
    due, release = _time(due_at, "due-at"), _time(release_at, "release-at")
    the_app = _open(db, app)
    task = NewTask(
        kind=kind,
        payload=data,
        due_at=due,
        release_at=release,
        weight=weight,
        estimate=estimate,
        idempotency_key=key,
        depends_on=tuple(depends_on or ()),
        tenant=tenant,
        tags=tuple(tag or ()),
        source="cli",
    )
    (task_id,) = the_app.submit_many([task], actor=acting(the_app, token))
    if as_json:
        _print_json({"id": task_id})
    else:
        out.print(task_id)


@tasks_cli.command("list")
def tasks_list(
    db: DbOption = None,
    state: Annotated[str | None, typer.Option(help="Only this state.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only this kind.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
    after: Annotated[str | None, typer.Option(help="Page: ids after this one.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List tasks, oldest first."""
    tasks = _open(db).tasks(TaskFilter(state=state, kind=kind, limit=limit, after_id=after))
    if as_json:
        _print_json([_task_json(t) for t in tasks])
        return
    table = Table("id", "kind", "state", "attempt", "due", "pool", "last error")
    for t in tasks:
        table.add_row(
            t.id,
            t.kind,
            str(t.state),
            str(t.attempt),
            _fmt_time(t.due_at),
            t.pool,
            (t.last_error or "")[:60],
        )
    out.print(table)


@tasks_cli.command("show")
def tasks_show(task_id: str, db: DbOption = None, as_json: JsonOption = False) -> None:
    """One task with its attempts."""
    app = _open(db)
    task = app.get(task_id)
    attempts = app.store.attempts(task_id)
    if as_json:
        _print_json({**_task_json(task), "attempts": [asdict(a) for a in attempts]})
        return
    for field, value in _task_json(task).items():
        if field != "last_traceback":
            out.print(f"[bold]{field:>18}[/bold]  {value}")
    for a in attempts:
        out.print(
            f"  attempt {a.attempt} (token {a.token}) on {a.worker_id}: {a.outcome} "
            f"at {_fmt_time(a.finished_at)} {a.error or ''}"
        )
    if task.last_traceback:
        out.print(task.last_traceback)


@tasks_cli.command("cancel")
def tasks_cancel(
    task_id: str,
    db: DbOption = None,
    reason: Annotated[str, typer.Option(help="Why (audited).")] = "",
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a task; a running one is stopped within a heartbeat."""
    app = _open(db)
    actor = authorized(app, token, Operation.CANCEL, task_id)
    task = app.store.cancel(task_id, actor, reason)
    if as_json:
        _print_json(_task_json(task))
    elif task.cancel_requested:
        out.print(f"{task_id}: cancel requested; the worker stops it within a heartbeat")
    else:
        out.print(f"{task_id}: {task.state}")


@tasks_cli.command("retry")
def tasks_retry(
    task_id: str, db: DbOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Give a dead or cancelled task one more attempt."""
    app = _open(db)
    actor = authorized(app, token, Operation.RETRY, task_id)
    task = app.store.retry(task_id, actor)
    if as_json:
        _print_json(_task_json(task))
    else:
        out.print(f"{task_id}: {task.state}")


@tasks_cli.command("why")
def tasks_why(task_id: str, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Why a task waits: its decision, pending reason and score broken down by factor."""
    app = _open(db)
    task = app.get(task_id)
    if task.state.is_final or task.state in (
        TaskState.RUNNING,
        TaskState.AWAITING_APPROVAL,
        TaskState.HELD,
    ):
        text = f"{task_id} is {task.state}: no decision pending"
        if task.state is TaskState.RUNNING and task.worker_id:
            text = f"{task_id} is running on {task.worker_id}: no decision pending"
        elif task.state is TaskState.AWAITING_APPROVAL:
            approval = app.store.approval(task_id)
            text = (
                f"{task_id} is awaiting approval: rule {approval.rule.name}, "
                f"{approval.tally().text()}, asked by {approval.requested_by}"
            )
        elif task.state is TaskState.HELD:
            text = f"{task_id} is {task.last_error or 'held'}"
        _print_json(
            {"id": task_id, "state": str(task.state), "why": text}
        ) if as_json else out.print(text)
        return
    decisions, reasons, scorer = app.decisions(explain=[task_id])
    decision = next((d for d in decisions if d.task_id == task_id), None)
    if decision is None:
        raise InvalidInput(f"{task_id} is beyond the {app.settings.plan_batch} tasks ranked")
    reason = reasons[task_id]
    policy = decision.policy_version or ""
    if as_json:
        _print_json(
            {
                "id": task_id,
                "state": str(task.state),
                "pending_reason": reason,
                "decision": {
                    "action": str(decision.action),
                    "score": decision.score,
                    "confidence": decision.confidence,
                    "tier": int(decision.tier),
                    "scorer": scorer,
                    "model_version": decision.model_version,
                    "policy_version": decision.policy_version,
                    "defer_until": decision.defer_until,
                    "merge_into": decision.merge_into,
                    "note": decision.note,
                    "reasons": [asdict(r) for r in decision.reasons],
                },
            }
        )
        return
    out.print(f"[bold]{task_id}[/bold] ({task.kind}) is {task.state}: {reason}")
    out.print(
        f"decision: {decision.action} · score {decision.score:.3f} (1 = next) · confidence "
        f"{decision.confidence:.2f} · tier {int(decision.tier)} · scorer {scorer} "
        f"· models {decision.model_version or 'none'} · policy {policy[:12]}"
    )
    if decision.note:
        out.print(f"note: {decision.note}")
    table = Table("factor", "contribution", "why")
    for r in decision.reasons:
        table.add_row(r.factor, f"{r.contribution:.4g}", r.text)
    out.print(table)


@tasks_cli.command("reprioritize")
def tasks_reprioritize(
    task_id: str,
    db: DbOption = None,
    weight: Annotated[
        float | None, typer.Option(help="New weight (value of being on time).")
    ] = None,
    due: Annotated[
        str | None,
        typer.Option("--due-at", help="New deadline: epoch seconds, ISO 8601 or +seconds."),
    ] = None,
    no_due: Annotated[bool, typer.Option("--no-due", help="Remove the deadline.")] = False,
    reason: Annotated[str, typer.Option(help="Why (audited).")] = "",
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change a queued or running task's weight or deadline; the planner re-scores it at once."""
    if due is not None and no_due:
        raise InvalidInput("give --due-at or --no-due, not both")
    app = _open(db)
    actor = authorized(app, token, Operation.REPRIORITIZE, task_id)
    task = app.store.reprioritize(
        task_id,
        weight=weight,
        due_at=_time(due, "due-at"),
        clear_due=no_due,
        actor=actor,
        reason=reason,
    )
    if as_json:
        _print_json(_task_json(task))
    else:
        out.print(f"{task_id}: weight {task.weight:g}, due {_fmt_time(task.due_at)}")


@cli.command()
def purge(
    before: Annotated[
        str,
        typer.Option(
            "--before",
            help="Remove tasks that ended before this: a duration back from now (30d, 12h) "
            "or an ISO 8601 time with a zone.",
        ),
    ],
    db: DbOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would go; change nothing.")
    ] = False,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove finished tasks (and their attempts, approvals, overrides) that ended before a
    time; the audit chain keeps their story. Their idempotency keys become free again."""
    app = _open(db)
    cutoff = parse_when(before, "before", app.store.db_now())
    if dry_run:
        count = app.store.purge(cutoff, dry_run=True)
    else:
        actor = authorized(app, token, Operation.PURGE, f"before {before}")
        count = app.store.purge(cutoff, actor)
    if as_json:
        _print_json({"before": cutoff, "purged": 0 if dry_run else count, "would": count})
    else:
        verb = "would remove" if dry_run else "removed"
        out.print(f"{verb} {count} tasks that ended before {_fmt_time(cutoff)}")


@cli.command()
def pools(
    db: DbOption = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="NAME=UNITS (or NAME=unbounded).")
    ] = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Pools with their capacity and use, and the state of each downstream target."""
    app = _open(db)
    wanted: dict[str, int | None] = {}
    for item in set_ or []:  # all checked before any is changed
        name, _, value = item.partition("=")
        if not name or not value:
            raise InvalidInput(f"--set wants NAME=UNITS, got {item!r}")
        if value != "unbounded" and not value.isdigit():
            raise InvalidInput(f"--set {item}: units must be a whole number >= 0 or 'unbounded'")
        wanted[name] = None if value == "unbounded" else int(value)
    if wanted:
        actor = authorized(app, token, Operation.SET_POOL, ",".join(wanted))
        for name, capacity in wanted.items():
            app.store.set_pool(name, capacity)
            app.gate.record(actor, "pool.set", name, {"capacity": capacity})
    usage = app.store.pools()
    targets = app.store.targets()
    if as_json:
        _print_json(
            {
                "pools": [
                    {
                        "name": u.pool.name,
                        "capacity": u.pool.capacity,
                        "used": u.used,
                        "ready": u.ready,
                        "leased": u.leased,
                        "running": u.running,
                    }
                    for u in usage
                ],
                "targets": [asdict(t) for t in targets],
            }
        )
        return
    table = Table("pool", "capacity", "used", "ready", "granted", "running")
    for u in usage:
        cap = "∞" if u.pool.capacity is None else str(u.pool.capacity)
        table.add_row(u.pool.name, cap, str(u.used), str(u.ready), str(u.leased), str(u.running))
    out.print(table)
    if targets:
        ttable = Table("target", "breaker", "failures in a row", "adaptive limit")
        for t in targets:
            limit = "-" if t.limit is None else f"{t.limit:.1f}"
            ttable.add_row(t.target, t.breaker, str(t.consecutive_failures), limit)
        out.print(ttable)


# --- schedules ---------------------------------------------------------------------------------


@schedules_cli.command("add")
def schedules_add(
    name: str,
    kind: Annotated[str, typer.Option(help="Task kind each tick creates.")],
    cron: Annotated[str | None, typer.Option(help="5-field cron expression.")] = None,
    every: Annotated[str | None, typer.Option(help="Interval: 30s, 5m, 1h30m.")] = None,
    tz: Annotated[str, typer.Option(help="IANA time zone of the cron expression.")] = "UTC",
    jitter: Annotated[float, typer.Option(help="Max seconds of delay per tick.")] = 0.0,
    overlap: Annotated[str, typer.Option(help="skip|buffer_one|allow_all|cancel_running")] = "skip",
    catchup: Annotated[float, typer.Option(help="Catch-up window after downtime (s).")] = 60.0,
    payload: Annotated[str, typer.Option(help="JSON object for each task.")] = "{}",
    paused: Annotated[bool, typer.Option(help="Create paused.")] = False,
    db: DbOption = None,
    app: AppOption = None,
    token: TokenOption = None,
) -> None:
    """Create or replace a schedule."""
    from tactician.plan.schedules import ScheduleSpec, parse_every
    from tactician.run.schedules import ScheduleService

    data = _json_object(payload)
    spec = ScheduleSpec(
        name=name,
        kind=kind,
        payload=data,
        cron=cron,
        every=parse_every(every) if every else None,
        timezone=tz,
        jitter=jitter,
        overlap=overlap,  # type: ignore[arg-type]  # validated by ScheduleSpec
        catchup_window=catchup,
        paused=paused,
    )
    the_app = _open(db, app)
    actor = authorized(the_app, token, Operation.SCHEDULE, name)
    ScheduleService(the_app.store, the_app).save(spec)
    the_app.gate.record(actor, "schedule.saved", name, {"kind": kind, "cron": cron, "every": every})
    out.print(f"schedule {name} saved")


@schedules_cli.command("list")
def schedules_list(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Every schedule with its next tick."""
    from tactician.plan.schedules import next_tick
    from tactician.run.schedules import spec_from_row

    app = _open(db)
    rows = app.store.schedules()
    now = app.store.db_now()
    listing = []
    for row in rows:
        spec = spec_from_row(row)
        listing.append(
            {
                **row.spec,
                "paused": row.paused,
                "last_tick": row.last_tick,
                "next_tick": None if row.paused else next_tick(spec, now),
            }
        )
    if as_json:
        _print_json(listing)
        return
    table = Table("name", "kind", "when", "tz", "overlap", "paused", "next tick")
    for item in listing:
        when = item["cron"] or f"every {item['every']:g}s"
        table.add_row(
            item["name"],
            item["kind"],
            when,
            item["timezone"],
            item["overlap"],
            "yes" if item["paused"] else "no",
            _fmt_time(item["next_tick"]),
        )
    out.print(table)


@schedules_cli.command("pause")
def schedules_pause(name: str, db: DbOption = None, token: TokenOption = None) -> None:
    """Stop firing (ticks while paused are dropped)."""
    app = _open(db)
    actor = authorized(app, token, Operation.SCHEDULE, name)
    app.store.set_schedule_paused(name, True)
    app.gate.record(actor, "schedule.paused", name)
    out.print(f"schedule {name} paused")


@schedules_cli.command("resume")
def schedules_resume(name: str, db: DbOption = None, token: TokenOption = None) -> None:
    """Fire again from the next tick."""
    app = _open(db)
    actor = authorized(app, token, Operation.SCHEDULE, name)
    app.store.set_schedule_paused(name, False)
    app.gate.record(actor, "schedule.resumed", name)
    out.print(f"schedule {name} resumed")


@schedules_cli.command("delete")
def schedules_delete(name: str, db: DbOption = None, token: TokenOption = None) -> None:
    """Delete a schedule (its tasks stay)."""
    app = _open(db)
    actor = authorized(app, token, Operation.SCHEDULE, name)
    app.store.delete_schedule(name)
    app.gate.record(actor, "schedule.deleted", name)
    out.print(f"schedule {name} deleted")


@schedules_cli.command("backfill")
def schedules_backfill(
    name: str,
    start: Annotated[str, typer.Option(help="Start of the range (epoch or ISO 8601).")],
    end: Annotated[str, typer.Option(help="End of the range.")],
    db: DbOption = None,
    app: AppOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """One task per tick of a past range (ticks already run are not repeated)."""
    from tactician.run.schedules import ScheduleService

    first, last = _time(start, "start"), _time(end, "end")
    assert first is not None and last is not None
    the_app = _open(db, app)
    actor = authorized(the_app, token, Operation.SCHEDULE, name)
    ids = ScheduleService(the_app.store, the_app).backfill(name, first, last, actor)
    the_app.gate.record(actor, "schedule.backfilled", name, {"tasks": len(ids)})
    if as_json:
        _print_json({"ids": ids})
    else:
        out.print(f"{len(ids)} ticks backfilled for {name}")


# --- benchmarks --------------------------------------------------------------------------------


@bench_cli.command("throughput")
def bench_throughput(
    tasks: Annotated[int, typer.Option(min=1)] = 20000,
    workers: Annotated[int, typer.Option(min=1)] = 2,
    runs: Annotated[int, typer.Option(min=1)] = 3,
    batch: Annotated[int, typer.Option(min=1, help="Tasks claimed per worker at once.")] = 500,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """No-op tasks end to end through real planner and worker processes (median of runs)."""
    from tactician.cli.bench import throughput

    figures = throughput(db, tasks, workers, runs, batch)
    if as_json:
        _print_json(figures)
        return
    for key, value in figures.items():
        out.print(f"{key:>18}  {value}")


# --- workloads ---------------------------------------------------------------------------------


@workload_cli.command("generate")
def workload_generate(
    scenario: Annotated[str, typer.Option(help="logistics, incidents, campaigns or batch.")],
    out_path: Annotated[str, typer.Option("--out", help="The JSON Lines file to write.")],
    tasks: Annotated[int, typer.Option(min=1, help="How many tasks.")] = 1000,
    seed: Annotated[int, typer.Option(help="The same seed gives the same tasks.")] = 0,
    load: Annotated[float, typer.Option(help="Work demanded / capacity over the trace.")] = 1.2,
    capacity: CapacityOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a built-in scenario's tasks; prints the capacities to simulate them with."""
    from tactician.sim.scenarios import generate
    from tactician.sim.workload import summarize, write_workload

    generated, pools = generate(
        scenario, tasks=tasks, seed=seed, load=load, capacity=parse_capacities(capacity)
    )
    write_workload(out_path, generated)
    summary = summarize(generated, pools)
    hints = " ".join(f"--capacity {pool}={units}" for pool, units in pools.items())
    if as_json:
        _print_json({"out": out_path, "capacity": pools, "summary": summary})
        return
    loads = ", ".join(f"{pool} {value}" for pool, value in summary["load"].items())
    out.print(
        f"wrote {len(generated)} {scenario} tasks to {out_path}: "
        f"span {summary['span'] / 3600:.1f} h, load {loads}; simulate with {hints}",
        soft_wrap=True,
    )


@workload_cli.command("inspect")
def workload_inspect(
    path: Annotated[str, typer.Argument(help="A workload file (JSON Lines).")],
    capacity: CapacityOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a workload file and summarise it: kinds, span, demand, deadlines, load."""
    from tactician.sim.workload import read_workload, summarize

    summary = summarize(read_workload(path), parse_capacities(capacity))
    if as_json:
        _print_json(summary)
        return
    for key, value in summary.items():
        shown = (
            ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
        )
        out.print(f"{key:>18}  {shown}")


cli.command("simulate")(simulate_command)


def _logging() -> None:
    """Structured lines on stderr: TACTICIAN_LOG_FORMAT=json|console, TACTICIAN_LOG_LEVEL."""
    from tactician.observe.logs import Format, configure_logging
    from tactician.run.context import add_task

    settings = Settings.from_env()
    if settings.log_format not in ("json", "console"):
        raise InvalidInput("TACTICIAN_LOG_FORMAT must be json or console")
    fmt: Format = "json" if settings.log_format == "json" else "console"
    configure_logging(settings.log_level, fmt, [add_task])


def main() -> None:
    try:
        code = cli(standalone_mode=False)
    except TacticianError as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        sys.exit(2)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        # Usage errors from Typer's click (vendored in recent Typer, so matched by shape).
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            sys.stderr.write(f"error: {exc.format_message()}\n")
            sys.exit(2)
        raise
    if isinstance(code, int) and code:  # typer.Exit(n) returns n outside standalone mode
        sys.exit(code)
