"""`tactician train`, `tactician models …` and `tactician bench decide`.

    train     fit predictors from recorded outcomes (a scenario, a workload file or a
              database's finished attempts) and save the model set in the registry
    models    list, show, promote and roll back the registry's model sets

Heavy imports (LightGBM, the simulator) wait until a command runs, so `tactician --help` stays
fast. `register` adds the commands to the `tactician` app.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tactician.cli.options import JsonOption, TokenOption
from tactician.errors import InvalidInput
from tactician.govern.roles import Actor
from tactician.settings import Settings

if TYPE_CHECKING:
    from tactician.app import Tactician
    from tactician.decide.predictors import ModelSet
    from tactician.sim.history import Recorded
    from tactician.store.registry import ModelRegistry

models_cli = typer.Typer(
    help="The model registry: list, show, promote, roll back.", no_args_is_help=True
)
out = Console(highlight=False)

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="The database whose audit chain records the change."),
]
ModelsDirOption = Annotated[
    str | None,
    typer.Option(
        "--models-dir",
        help="The model registry's directory; default $TACTICIAN_MODELS_DIR or .tactician/models.",
    ),
]


def register(cli: typer.Typer, bench_cli: typer.Typer) -> None:
    """Add `train`, `models` and `bench decide` to the `tactician` app."""
    cli.command("train")(train)
    cli.add_typer(models_cli, name="models")
    bench_cli.command("decide")(bench_decide)


def _registry(models_dir: str | None) -> ModelRegistry:
    from tactician.store.registry import ModelRegistry

    return ModelRegistry(models_dir or Settings.from_env().models_dir)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=str, sort_keys=True) + "\n")


def _when(value: float) -> str:
    """An epoch time as UTC; a trace's seconds (from a scenario or workload) as they are."""
    if value < 1e9:
        return f"{value:,.0f} s"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"--since: not a time (epoch seconds or ISO 8601): {text!r}") from None
    if when.tzinfo is None:
        raise InvalidInput(f"--since: give a time zone, e.g. {text}Z or {text}+01:00")
    return when.timestamp()


def _predictors(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        check["predictor"]: {k: v for k, v in check.items() if k != "predictor"}
        for check in manifest["validation"]
    }


def _validation_table(manifest: dict[str, Any]) -> Table:
    table = Table("predictor", "metric", "model", "baseline", "held-out rows", "accepted")
    for name, check in _predictors(manifest).items():
        table.add_row(
            name,
            check["metric"],
            f"{check['model']:.4g}",
            f"{check['baseline']:.4g} ({check['baseline_name']})",
            str(check["rows"]),
            "yes" if check["accepted"] else "[red]refused[/red]",
        )
    return table


# --- train -------------------------------------------------------------------------------------


def _records(
    scenario: str | None,
    tasks: int | None,
    seed: int | None,
    load: float | None,
    workload: str | None,
    db: str | None,
    since: str | None,
    limit: int,
) -> tuple[list[Recorded], dict[str, Any]]:
    given = [name for name, value in (("--scenario", scenario), ("--workload", workload)) if value]
    given += ["--db"] if db else []
    if len(given) != 1:
        raise InvalidInput("give exactly one source: --scenario, --workload or --db")
    if scenario is None and any(v is not None for v in (tasks, seed, load)):
        raise InvalidInput("--tasks, --seed and --load go with --scenario")
    if db is None and since is not None:
        raise InvalidInput("--since goes with --db")
    from tactician.sim.history import from_store, from_workload

    if scenario is not None:
        from tactician.sim.scenarios import build

        count, seed_, load_ = tasks or 2000, seed or 0, 1.2 if load is None else load
        built = build(scenario, tasks=count, seed=seed_, load=load_)
        source = {"scenario": scenario, "tasks": count, "seed": seed_, "load": load_}
        return from_workload(built.tasks), source
    if workload is not None:
        from tactician.sim.workload import read_workload

        return from_workload(read_workload(workload)), {"workload": workload}
    assert db is not None
    from tactician.store.open import open_store

    store = open_store(db, Settings.from_env(db=db))
    try:
        rows = store.outcomes(_since(since), limit)
    finally:
        store.close()
    return from_store(rows), {"db": db.split("://", 1)[0], "since": _since(since), "limit": limit}


def train(
    scenario: Annotated[
        str | None, typer.Option(help="A built-in scenario's tasks as recorded history.")
    ] = None,
    tasks: Annotated[int | None, typer.Option(min=1, help="Tasks of the scenario [2000].")] = None,
    seed: Annotated[int | None, typer.Option(help="The scenario's seed [0].")] = None,
    load: Annotated[
        float | None, typer.Option(help="The scenario's work / capacity [1.2].")
    ] = None,
    workload: Annotated[
        str | None, typer.Option(help="A workload file (JSON Lines) as recorded history.")
    ] = None,
    db: Annotated[
        str | None,
        typer.Option("--db", help="A Tactician database: train on its finished attempts."),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="With --db: attempts finished at or after this time.")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="With --db: the latest this many attempts.")
    ] = 100_000,
    valid_fraction: Annotated[
        float, typer.Option(help="The latest share of outcomes held out to validate on.")
    ] = 0.2,
    promote: Annotated[
        bool, typer.Option("--promote", help="Make the new set active if it was accepted.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="With --promote: even if its duration was refused.")
    ] = False,
    models_dir: ModelsDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fit predictors from recorded outcomes, validate them on the latest ones, save the set."""
    from tactician.errors import Conflict
    from tactician.sim.history import fit_recorded

    if force and not promote:
        raise InvalidInput("--force goes with --promote")
    records, source = _records(scenario, tasks, seed, load, workload, db, since, limit)
    models = fit_recorded(records, valid_fraction=valid_fraction)
    registry = _registry(models_dir)
    version = registry.save(models)
    promoted, refusal = False, None
    if promote:
        try:
            registry.promote(version, force=force)
            promoted = True
        except Conflict as exc:
            refusal = exc.message
    report = _train_report(models, str(registry.path(version)), source)
    report |= {"promoted": promoted, "active": registry.active_version()}
    if refusal:
        report["not_promoted"] = refusal
    if as_json:
        _print_json(report)
        return
    _print_training(models, report)


def _train_report(models: ModelSet, saved: str, source: dict[str, Any]) -> dict[str, Any]:
    manifest = models.manifest()
    return {
        "version": models.version,
        "rows": models.rows,
        "trained_from": models.trained_from,
        "trained_to": models.trained_to,
        "features": manifest["features"],
        "categorical": manifest["categorical"],
        "predictors": _predictors(manifest),
        "fitted": manifest["predictors"],
        "saved": saved,
        "source": source,
    }


def _print_training(models: ModelSet, report: dict[str, Any]) -> None:
    out.print(
        f"model set [bold]{models.version}[/bold] from {models.rows} outcomes finished "
        f"{_when(models.trained_from)} to {_when(models.trained_to)}",
        soft_wrap=True,
    )
    out.print(_validation_table(models.manifest()))
    out.print(f"saved {report['saved']}", soft_wrap=True)
    if report["promoted"]:
        out.print(f"promoted: {models.version} is active")
    elif "not_promoted" in report:
        out.print(f"not promoted: {report['not_promoted']}", soft_wrap=True)


# --- models ------------------------------------------------------------------------------------


@models_cli.command("list")
def models_list(models_dir: ModelsDirOption = None, as_json: JsonOption = False) -> None:
    """Saved model sets, oldest first; the active one is marked."""
    entries = _registry(models_dir).list()
    if as_json:
        _print_json([entry.to_json() for entry in entries])
        return
    if not entries:
        out.print("no model sets saved yet: tactician train …")
        return
    table = Table("", "version", "saved", "rows", "trained on", "duration MAE s (baseline)", "uses")
    for entry in entries:
        manifest = entry.manifest
        p50 = _predictors(manifest).get("duration_p50")
        mae = "-" if p50 is None else f"{p50['model']:.4g} ({p50['baseline']:.4g})"
        uses = ", ".join(name for name, fitted in manifest["predictors"].items() if fitted)
        table.add_row(
            "*" if entry.active else "",
            entry.version,
            _when(entry.created_at),
            str(manifest["rows"]),
            f"{_when(manifest['trained_from'])} to {_when(manifest['trained_to'])}",
            mae,
            uses or "baselines only",
        )
    out.print(table)


@models_cli.command("show")
def models_show(
    version: Annotated[str, typer.Argument(help="A version, or its first 6+ characters.")],
    models_dir: ModelsDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """One model set's manifest: training window, rows, features, validation."""
    manifest = _registry(models_dir).show(version)
    if as_json:
        _print_json(manifest)
        return
    out.print(f"[bold]{'version':>14}[/bold]  {manifest['version']}")
    out.print(f"[bold]{'active':>14}[/bold]  {'yes' if manifest['active'] else 'no'}")
    out.print(f"[bold]{'saved':>14}[/bold]  {_when(manifest['created_at'])}")
    out.print(f"[bold]{'rows':>14}[/bold]  {manifest['rows']}")
    window = f"{_when(manifest['trained_from'])} to {_when(manifest['trained_to'])}"
    out.print(f"[bold]{'trained on':>14}[/bold]  {window}")
    out.print(f"[bold]{'features':>14}[/bold]  {', '.join(manifest['features'])}", soft_wrap=True)
    out.print(_validation_table(manifest))


@models_cli.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="A version, or its first 6+ characters.")],
    force: Annotated[
        bool, typer.Option("--force", help="Even if its duration predictor was refused.")
    ] = False,
    models_dir: ModelsDirOption = None,
    db: DbOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make a saved model set the active one (audited in the database's chain)."""
    app = _gated(db)
    event = app.gate.promote_model(acting(app, token), _registry(models_dir), version, force=force)
    if as_json:
        _print_json(event.to_json())
    elif event.previous == event.version:
        out.print(f"{event.version} is already active")
    else:
        out.print(f"{event.version} is active (was {event.previous or 'none'})")


@models_cli.command("rollback")
def models_rollback(
    models_dir: ModelsDirOption = None,
    db: DbOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make the previously active model set active again (audited)."""
    app = _gated(db)
    event = app.gate.rollback_model(acting(app, token), _registry(models_dir))
    if as_json:
        _print_json(event.to_json())
    else:
        out.print(f"{event.version} is active again (rolled back from {event.previous})")


def _gated(db: str | None) -> Tactician:
    from tactician.cli.govern import open_app

    return open_app(db)


def acting(app: Tactician, token: str | None) -> Actor:
    from tactician.cli.govern import acting as who

    return who(app, token)


# --- bench decide ------------------------------------------------------------------------------


def bench_decide(
    backlog: Annotated[int, typer.Option(min=1, help="Waiting tasks to rank.")] = 100_000,
    history: Annotated[int, typer.Option(min=1, help="Finished tasks the models learn from.")] = (
        20_000
    ),
    scenario: Annotated[
        str, typer.Option(help="mix (all four, one pool each) or one built-in scenario.")
    ] = "mix",
    runs: Annotated[int, typer.Option(min=1, help="Runs; figures are their medians.")] = 3,
    repetitions: Annotated[int, typer.Option(min=1, help="Whole-backlog ranks per run.")] = 10,
    events: Annotated[int, typer.Option(min=1, help="Arrivals decided one by one per run.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the scenarios and the sample.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Decision latency with a large backlog: learned against atc and edf."""
    from tactician.cli.bench_decide import decide_bench

    figures = decide_bench(
        backlog=backlog,
        history=history,
        scenario=scenario,
        runs=runs,
        repetitions=repetitions,
        events=events,
        seed=seed,
    )
    if as_json:
        _print_json(figures)
        return
    models = figures["models"]
    out.print(
        f"{figures['backlog']} waiting tasks ({figures['scenario']}), models "
        f"{models['version'] or 'refused: baselines only'} fitted on {figures['history']} "
        f"outcomes in {models['fit_s']:.1f} s; encoding the backlog {figures['encode_ms']:.0f} ms",
        soft_wrap=True,
    )
    keys = ("rank_ms_p50", "rank_ms_p90", "rank_warm_ms_p50", "event_ms_p50", "event_ms_p99")
    table = Table("scorer", *keys, "arrival path")
    for name, row in figures["scorers"].items():
        table.add_row(name, *(f"{row[key]:.3f}" for key in keys), row["event_path"])
    out.print(table)
    for pair, ratios in figures["ratios"].items():
        shown = ", ".join(f"{k} x{v}" for k, v in ratios.items() if v is not None)
        out.print(f"{pair}: {shown}", soft_wrap=True)
