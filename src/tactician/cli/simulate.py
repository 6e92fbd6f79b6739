"""`tactician simulate`: one workload through several policies on a virtual clock.

The workload is a file (JSON Lines) or a built-in scenario; a scenario's shifts change its pools'
capacity as the trace goes. With `--train-fraction F` the first F of the trace (by submission) is
history: a learning policy is taught its outcomes first, and every policy is simulated and
measured on the rest only, so that all are compared on the same tasks.

The simulator and its models are imported when the command runs, not when `tactician` starts.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tactician.errors import InvalidInput

if TYPE_CHECKING:
    from tactician.decide.scorers import Scorer
    from tactician.sim.agents_compare import AgentsSetup
    from tactician.sim.simulator import Calendar, SimResult
    from tactician.sim.workload import WorkloadTask

ALL_POLICIES = "fifo,edf,wspt,atc,easy,ai"
DEFAULT_TASKS = 1000
DEFAULT_LOAD = 1.2

CapacityOption = Annotated[
    list[str] | None,
    typer.Option("--capacity", help="Units of a pool, as pool=N; repeat for several pools."),
]


def parse_capacities(items: list[str] | None) -> dict[str, int] | None:
    """`pool=N` options as a mapping; None when there are none."""
    if not items:
        return None
    capacity: dict[str, int] = {}
    for item in items:
        pool, _, units = item.partition("=")
        if not pool or not units.strip().isdigit() or int(units) < 1:
            raise InvalidInput(f"--capacity must look like pool=N with N >= 1, got {item!r}")
        capacity[pool.strip()] = int(units)
    return capacity


def parse_policies(text: str) -> list[str]:
    """Comma-separated policy names, checked, in the order given, each once."""
    from tactician.sim.policies import POLICIES, get_policy

    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise InvalidInput(f"--policy names no policy; choose from {', '.join(POLICIES)}")
    for name in names:
        get_policy(name)
    return names


@dataclass(frozen=True)
class Trace:
    """What the policies run on."""

    title: str
    history: list[WorkloadTask]
    """The first part of the trace: outcomes a learning policy is taught before it starts."""
    tasks: list[WorkloadTask]
    """The part every policy is simulated and measured on."""
    capacity: dict[str, int]
    calendar: Calendar
    events: list[dict[str, Any]]
    headline: str
    """The metric the report leads with (lower is better)."""


def load_trace(
    *,
    workload: str | None,
    scenario: str | None,
    tasks: int | None,
    seed: int,
    load: float | None,
    capacity: dict[str, int] | None,
    train_fraction: float,
) -> Trace:
    """A workload file or a built-in scenario, split into history and the measured tasks."""
    from tactician.sim.policies import split
    from tactician.sim.scenarios import build
    from tactician.sim.workload import read_workload

    if (workload is None) == (scenario is None):
        raise InvalidInput("give exactly one of --workload and --scenario")
    calendar: Calendar = {}
    events: list[dict[str, Any]] = []
    if workload is not None:
        if tasks is not None or load is not None:
            raise InvalidInput("--tasks and --load apply to --scenario only")
        everything = read_workload(workload)
        if not everything:
            raise InvalidInput(f"{workload}: no tasks")
        pools = capacity or {}
        title = f"Simulation of {Path(workload).name}"
    else:
        assert scenario is not None
        count, work = tasks or DEFAULT_TASKS, DEFAULT_LOAD if load is None else load
        built = build(scenario, tasks=count, seed=seed, load=work, capacity=capacity)
        everything, pools = built.tasks, built.capacity
        calendar, events = built.calendar, built.events
        title = f"Simulation of the {scenario} scenario ({count} tasks, seed {seed}, load {work:g})"
    history, measured = split(everything, train_fraction)
    if history:
        title += f", after {len(history)} tasks of history"
    if scenario is not None:
        headline = "mean_bounded_slowdown" if scenario == "batch" else "missed_deadlines"
    else:
        has_deadlines = any(t.due_at is not None for t in measured)
        headline = "missed_deadlines" if has_deadlines else "mean_bounded_slowdown"
    return Trace(title, history, measured, pools, calendar, events, headline)


@dataclass(frozen=True)
class PolicyRun:
    name: str
    scorer: Scorer
    result: SimResult
    metrics: dict[str, Any]


def run_policy(name: str, trace: Trace, max_wait: float | None = None) -> PolicyRun:
    """Simulate `trace.tasks` under one policy; a learning policy first learns the history.
    With `max_wait`, aging as a bundle's `objective.max_wait` makes it."""
    from tactician.decide.learned import Learned
    from tactician.decide.shares import Aging
    from tactician.sim.metrics import compute_metrics
    from tactician.sim.policies import get_policy, pretrain
    from tactician.sim.simulator import simulate

    policy = get_policy(name)
    began = time.perf_counter()
    inner = policy.make()
    backlog = None
    if isinstance(inner, Learned) and trace.history:
        backlog = pretrain(inner, trace.history)
    scorer: Scorer = inner if max_wait is None else Aging(inner, max_wait)
    result = simulate(
        trace.tasks,
        trace.capacity,
        scorer,
        policy.options(),
        calendar=trace.calendar,
        backlog=backlog,
    )
    metrics = compute_metrics(trace.tasks, result, trace.capacity, trace.calendar)
    metrics["escalations"] = result.escalations
    metrics["wall_s"] = round(time.perf_counter() - began, 3)
    return PolicyRun(name, scorer, result, metrics)


def workload_summary(trace: Trace) -> dict[str, Any]:
    """The measured tasks summarised, with the capacities and the history they ran after."""
    from tactician.sim.workload import summarize

    return {
        **summarize(trace.tasks, trace.capacity),
        "capacity": trace.capacity,
        "history_tasks": len(trace.history),
        "shifts": {pool: [list(change) for change in c] for pool, c in trace.calendar.items()},
    }


def simulate(
    workload: Annotated[str | None, typer.Option(help="A workload file (JSON Lines).")] = None,
    scenario: Annotated[
        str | None,
        typer.Option(help="A built-in scenario: logistics, incidents, campaigns, batch."),
    ] = None,
    tasks: Annotated[
        int | None, typer.Option(min=1, help=f"Tasks of the scenario (default {DEFAULT_TASKS}).")
    ] = None,
    seed: Annotated[int, typer.Option(help="The scenario's seed.")] = 0,
    load: Annotated[
        float | None,
        typer.Option(help=f"The scenario's work / capacity (default {DEFAULT_LOAD})."),
    ] = None,
    capacity: CapacityOption = None,
    policy: Annotated[
        str, typer.Option(help="Comma-separated policies: fifo, edf, wspt, atc, easy, ai.")
    ] = ALL_POLICIES,
    train_fraction: Annotated[
        float,
        typer.Option(
            help="In [0, 1): this first part of the trace (by submission) is history; "
            "learning policies learn from it and no policy is measured on it."
        ),
    ] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    report: Annotated[
        Path | None,
        typer.Option(help="Write report.md and its plots into this directory."),
    ] = None,
    agents: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Agents mode: spread the work over N sites and compare a central planner "
            "with an agent deciding at each site (one policy; default ai).",
        ),
    ] = None,
    site_key: Annotated[
        str | None, typer.Option(help="Agents: the feature that says a task's site.")
    ] = None,
    site_capacity: Annotated[
        list[str] | None,
        typer.Option(help="Agents: pool=N at every site, or SITE:pool=N; repeatable."),
    ] = None,
    global_rate: Annotated[
        list[str] | None,
        typer.Option(
            help="Agents: a rate shared by all sites, KIND=N/s|min|h[,burst=B] (burst: a "
            "minute's worth); repeatable."
        ),
    ] = None,
    global_pool: Annotated[
        list[str] | None,
        typer.Option(help="Agents: units of a pool shared by all sites, pool=N; repeatable."),
    ] = None,
    outage: Annotated[
        list[str] | None,
        typer.Option(help="Agents: SITE:START-END, a site's link down (e.g. s2:2h-3h)."),
    ] = None,
    random_outages: Annotated[
        int, typer.Option(min=0, help="Agents: this many seeded outages at random sites.")
    ] = 0,
    outage_length: Annotated[
        str, typer.Option(help="Agents: the length of each random outage.")
    ] = "1h",
    rtt: Annotated[
        float, typer.Option(help="Agents: modelled round trip to the centre, seconds.")
    ] = 0.05,
    lease_ttl: Annotated[
        str, typer.Option(help="Agents: how long a lease of global tokens lasts unrenewed.")
    ] = "10m",
    max_wait: Annotated[
        str | None,
        typer.Option(
            help="Aging, as a bundle's objective.max_wait: a task released longer ago than "
            "this (90, 15m, 2h) goes first and holds its pool until it starts."
        ),
    ] = None,
) -> None:
    """Run one workload through each policy on a virtual clock and compare the outcomes."""
    agent_options = {
        "--site-key": site_key,
        "--site-capacity": site_capacity,
        "--global-rate": global_rate,
        "--global-pool": global_pool,
        "--outage": outage,
        "--random-outages": random_outages,
    }
    if agents is not None:
        if report is not None:
            raise InvalidInput("--report does not apply to --agents")
        names = ["ai"] if policy == ALL_POLICIES else parse_policies(policy)
        if len(names) != 1:
            raise InvalidInput("--agents compares central and agents under one --policy")
        from tactician.sim.agents import AgentsOptions
        from tactician.sim.agents_compare import AgentsSetup
        from tactician.sim.leases import parse_pools, parse_rate
        from tactician.sim.sites import (
            parse_duration,
            parse_outage,
            parse_site_capacity,
            site_names,
        )

        sites = site_names(agents)
        setup = AgentsSetup(
            sites=agents,
            options=AgentsOptions(
                rates=dict(parse_rate(item) for item in global_rate or ()),
                pools=parse_pools(global_pool or ()),
                outages=tuple(parse_outage(item, sites) for item in outage or ()),
                rtt=rtt,
                lease_ttl=parse_duration(lease_ttl, "--lease-ttl"),
            ),
            site_key=site_key,
            site_capacity=parse_site_capacity(site_capacity or (), sites) or None,
            random_outages=random_outages,
            outage_length=parse_duration(outage_length, "--outage-length"),
            seed=seed,
        )
        _simulate_agents(
            names[0],
            setup,
            as_json,
            load_trace(
                workload=workload,
                scenario=scenario,
                tasks=tasks,
                seed=seed,
                load=load,
                capacity=parse_capacities(capacity),
                train_fraction=train_fraction,
            ),
        )
        return
    given = [name for name, value in agent_options.items() if value]
    if given:
        raise InvalidInput(f"{given[0]} applies to --agents only")
    from tactician.sim.sites import parse_duration

    bound = None if max_wait is None else parse_duration(max_wait, "--max-wait")
    names = parse_policies(policy)
    if report is not None and report.exists() and not report.is_dir():
        raise InvalidInput(f"--report {report}: not a directory")
    trace = load_trace(
        workload=workload,
        scenario=scenario,
        tasks=tasks,
        seed=seed,
        load=load,
        capacity=parse_capacities(capacity),
        train_fraction=train_fraction,
    )
    runs: dict[str, PolicyRun] = {}
    stderr = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
        disable=as_json or not stderr.is_terminal,
    ) as progress:
        step = progress.add_task("simulating", total=len(names))
        for name in names:
            progress.update(step, description=f"simulating {name}")
            runs[name] = run_policy(name, trace, bound)
            progress.advance(step)
    metrics = {name: run.metrics for name, run in runs.items()}
    summary = workload_summary(trace)
    written = None
    if report is not None:
        written = _write_report(report, trace, runs, summary)
    if as_json:
        sys.stdout.write(
            json.dumps({"policies": metrics, "workload": summary}, sort_keys=True) + "\n"
        )
        return
    _print_table(trace, metrics)
    if written is not None:
        Console(highlight=False).print(f"report: {written}", soft_wrap=True)


def _write_report(
    directory: Path, trace: Trace, runs: dict[str, PolicyRun], summary: dict[str, Any]
) -> Path:
    from tactician.sim.report import write_report

    try:
        return write_report(
            directory,
            title=trace.title,
            tasks=trace.tasks,
            capacity=trace.capacity,
            results={name: run.result for name, run in runs.items()},
            metrics={name: run.metrics for name, run in runs.items()},
            workload_summary=summary,
            events=trace.events,
            headline=trace.headline,
        )
    except OSError as exc:
        raise InvalidInput(f"--report {directory}: {exc.strerror or exc}") from None


_SHOWN = {
    "missed %": "missed_pct",
    "w. tardiness": "weighted_tardiness",
    "mean wait s": "mean_wait_s",
    "p95 wait s": "p95_wait_s",
    "slowdown": "mean_bounded_slowdown",
    "makespan s": "makespan_s",
    "µs/plan": "decide_cpu_us",
    "wall s": "wall_s",
}


def _print_table(trace: Trace, metrics: dict[str, dict[str, Any]]) -> None:
    out = Console(highlight=False)
    if trace.history:
        out.print(
            f"measured on the last {len(trace.tasks)} tasks, "
            f"after {len(trace.history)} tasks of history",
            soft_wrap=True,
        )
    table = Table("policy", "done", *_SHOWN, "utilization")
    for name, figures in metrics.items():
        used = ", ".join(f"{pool} {value:.2f}" for pool, value in figures["utilization"].items())
        table.add_row(
            name,
            f"{figures['completed']}/{figures['tasks']}",
            *(f"{figures[key]:.1f}" for key in _SHOWN.values()),
            used,
        )
    out.print(table)


def _simulate_agents(policy: str, setup: AgentsSetup, as_json: bool, trace: Trace) -> None:
    """`simulate --agents N`: central and agents on the same workload (tactician.sim.agents)."""
    from tactician.sim.agents_compare import compare
    from tactician.sim.policies import get_policy

    comparison = compare(
        trace.tasks,
        trace.capacity,
        trace.calendar,
        get_policy(policy),
        setup,
        history=trace.history,
    )
    if as_json:
        comparison["workload"] = workload_summary(trace)
        sys.stdout.write(json.dumps(comparison, sort_keys=True) + "\n")
        return
    _print_agents(trace, comparison)


def _print_agents(trace: Trace, comparison: dict[str, Any]) -> None:
    out = Console(highlight=False)
    setup = comparison["setup"]
    out.print(f"{trace.title}, policy {setup['policy']}", soft_wrap=True)
    by = setup["site_key"] or "a hash of the task id"
    for site in setup["sites"]:
        serves = ", ".join(setup["site_groups"].get(site, ())) or "-"
        units = ", ".join(f"{p} {n}" for p, n in setup["site_capacity"][site].items())
        out.print(f"  {site}: {units}; {by} {serves}", soft_wrap=True)
    for cut in setup["outages"]:
        out.print(f"  outage: {cut['site']} {cut['start']:.0f}-{cut['end']:.0f} s", soft_wrap=True)
    columns = ("done", "missed", "w. tardiness", "wait s", "ms p50/p99", "violations")
    table = Table("mode", *columns, "outage cost")
    for mode, figures in comparison["modes"].items():
        latency = figures["decision_latency_ms"]
        cost = figures["outage_cost"]
        table.add_row(
            mode,
            f"{figures['completed']}/{figures['tasks']}",
            str(figures["missed_deadlines"]),
            f"{figures['weighted_tardiness']:.0f}",
            f"{figures['mean_wait_s']:.0f}",
            f"{latency['p50']:.2f}/{latency['p99']:.2f}",
            str(figures["global_limit_violations"]),
            "-"
            if cost is None
            else f"{cost['missed_deadlines']:+d} / {cost['weighted_tardiness']:+.0f}",
        )
    out.print(table)
    fenced = ", ".join(f"{m} {f['runs']['fenced']}" for m, f in comparison["modes"].items())
    out.print(
        f"ms: decision latency, the CPU per planning pass measured here, plus for central a "
        f"modelled round trip of {1000 * setup['rtt_s']:g} ms; violations: of the global "
        "limits, by an independent check of what ran; outage cost: missed / weighted "
        f"tardiness against the same mode without outages; attempts fenced: {fenced}",
        soft_wrap=True,
    )
