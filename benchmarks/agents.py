"""Central or at the edge: the simulator's central planner against an agent per site.

    .venv/bin/python benchmarks/agents.py [--seeds 5] [--policy ai]

The `logistics` (2,000 deliveries, zones as sites) and `incidents` (3,000 alerts, 12 on call,
services as sites) scenarios at load 1.2, the first quarter of each trace kept as history
(the policy learns from it; nobody is scored on it), spread over 3 sites, each site with its
share of the pool by its share of the work. Each seed: 3 seeded outages of one hour at random
sites, and the same runs with no outage as the reference for the cost. Three global limits on
the scenario's one kind of task: none; a shared rate of 1.25 x the trace's mean arrival rate
with a burst of 10 (a per-second style API limit); the same rate as an hourly quota (burst of
one hour's worth). Leases last 1 h and are renewed every 60 s; round trip to the centre 50 ms.

Every figure is a median over the seeds; violations and run counts are totals over every run.
Prints a Markdown table and writes it to benchmarks/agents.md. `tactician simulate --agents`
gives any single cell (the command is printed in the file).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tactician.sim.agents import AgentsOptions
from tactician.sim.agents_compare import AgentsSetup, compare
from tactician.sim.leases import RateLimit
from tactician.sim.policies import get_policy, split
from tactician.sim.scenarios import build

HOUR = 3600.0
SITES = 3
OUTAGES = 3
LEASE_TTL = HOUR


@dataclass(frozen=True)
class Case:
    scenario: str
    tasks: int
    capacity: dict[str, int] | None
    kind: str
    per_hour: float
    """The shared rate: 1.25 x the measured trace's mean arrival rate, rounded."""


CASES = (
    Case("logistics", 2000, None, "deliver", 200.0),
    Case("incidents", 3000, {"oncall": 12}, "remediate", 250.0),
)
LIMITS = {
    "none": None,
    "rate, burst 10": 10.0,
    "rate, hourly quota": HOUR,
}
"""Global limit → the burst (seconds' worth of the rate for the quota; None: no limit)."""


def _rate(case: Case, burst: float | None) -> dict[str, RateLimit]:
    if burst is None:
        return {}
    per_second = case.per_hour / HOUR
    tokens = case.per_hour if burst == HOUR else burst
    return {case.kind: RateLimit(per_second, tokens)}


def command(case: Case, burst: float | None, seed: int, policy: str) -> str:
    """The `tactician simulate` line that gives one cell."""
    parts = [
        f"tactician simulate --scenario {case.scenario} --tasks {case.tasks} --seed {seed}",
        "--load 1.2 --train-fraction 0.25",
    ]
    for pool, units in (case.capacity or {}).items():
        parts.append(f"--capacity {pool}={units}")
    parts.append(f"--policy {policy} --agents {SITES}")
    for kind, limit in _rate(case, burst).items():
        parts.append(f"--global-rate {kind}={case.per_hour:g}/h,burst={limit.burst:g}")
    parts.append(f"--random-outages {OUTAGES} --outage-length 1h --lease-ttl 1h --json")
    return " ".join(parts)


def run_case(case: Case, burst: float | None, seed: int, policy: str) -> dict[str, Any]:
    scenario = build(case.scenario, tasks=case.tasks, seed=seed, load=1.2, capacity=case.capacity)
    history, tasks = split(scenario.tasks, 0.25)
    setup = AgentsSetup(
        sites=SITES,
        options=AgentsOptions(rates=_rate(case, burst), lease_ttl=LEASE_TTL),
        random_outages=OUTAGES,
        outage_length=HOUR,
        seed=seed,
    )
    return compare(
        tasks,
        scenario.capacity,
        scenario.calendar,
        get_policy(policy),
        setup,
        history=history,
    )


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _row(scenario: str, label: str, mode: str, cells: list[dict[str, Any]]) -> str:
    def median(*path: str) -> float:
        values = []
        for cell in cells:
            value: Any = cell
            for key in path:
                value = value[key]
            values.append(float(value))
        return _median(values)

    latency = ("decision_latency_ms",)
    return (
        "| "
        + " | ".join(
            [
                scenario,
                label,
                f"**{mode}**",
                f"{median('without_outages', 'missed_deadlines'):g}",
                f"{median('missed_deadlines'):g}",
                f"{median('outage_cost', 'missed_deadlines'):+g}",
                f"{median('outage_cost', 'weighted_tardiness'):+,.0f}",
                f"{median('mean_wait_s'):,.0f}",
                f"{median(*latency, 'p50'):.2f} / {median(*latency, 'p99'):.2f}",
                str(sum(c["global_limit_violations"] for c in cells)),
            ]
        )
        + " |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--policy", default="ai")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("agents.md"))
    args = parser.parse_args()
    began = time.perf_counter()
    rows = []
    per_seed = []
    violations = runs = lost = twice = fenced = 0
    for case in CASES:
        for label, burst in LIMITS.items():
            results = [run_case(case, burst, seed, args.policy) for seed in range(args.seeds)]
            for mode in ("central", "agents"):
                cells = [r["modes"][mode] for r in results]
                for cell in cells:
                    for figures in (cell, cell["without_outages"]):
                        violations += figures["global_limit_violations"]
                        counts = figures["runs"]
                        runs += 1
                        lost += counts["never_completed"]
                        twice += counts["completed_twice"]
                        fenced += counts["fenced"]
                rows.append(_row(case.scenario, label, mode, cells))
                calm = " ".join(str(c["without_outages"]["missed_deadlines"]) for c in cells)
                cut = " ".join(str(c["missed_deadlines"]) for c in cells)
                per_seed.append(f"| {case.scenario} | {label} | {mode} | {calm} | {cut} |")
            print(f"{case.scenario}, {label}: done", flush=True)
    took = time.perf_counter() - began
    example = command(CASES[0], LIMITS["rate, hourly quota"], 0, args.policy)
    text = "\n".join(
        [
            f"Central planner against an agent per site ({SITES} sites), policy `{args.policy}`, "
            f"{args.seeds} seeds (0..{args.seeds - 1}), medians over the seeds.",
            "",
            "Regenerate with `.venv/bin/python benchmarks/agents.py "
            f"--seeds {args.seeds} --policy {args.policy}`; one cell (logistics, hourly quota, "
            "seed 0, both modes, with outages and without) with:",
            "",
            "```sh",
            example,
            "```",
            "",
            "- Workloads: `logistics`, 2,000 deliveries, sites by `zone`; `incidents`, 3,000 "
            "alerts, `--capacity oncall=12`, sites by `service`. Load 1.2; the first quarter of "
            "each trace is history, the rest (1,500 and 2,250 tasks) is scored. Each site gets "
            "its share of the pool (and of each on-call shift) by its share of the work.",
            f"- Outages: {OUTAGES} seeded one-hour cuts of a site's link per seed. *cost* = the "
            "same mode with outages minus without them.",
            "- Global limit on the scenario's kind (`deliver` 200/h, `remediate` 250/h, about "
            "1.25 x the mean arrival rate): none; a shared rate with a burst of 10; the same "
            "rate as an hourly quota (burst 200 / 250). Leases last 1 h, renewed every 60 s.",
            "- Decision ms: CPU time of one planning pass (ranking + planning), measured on "
            "this machine; for central, plus a **modelled** 50 ms round trip (event to the "
            "centre, order back). The schedule itself is not delayed by it.",
            "- Violations: starts outside a global rate's token-bucket envelope or over a "
            "shared pool, found by an independent check of the executed runs.",
            "",
            "| scenario | global limit | mode | missed, no outage | missed, outages "
            "| outage cost: missed | outage cost: w. tardiness | mean wait s (outages) "
            "| decision ms p50 / p99 | global-limit violations |",
            "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
            *rows,
            "",
            "Missed deadlines per seed (0 first), to show what the medians hide:",
            "",
            "| scenario | global limit | mode | no outage | outages |",
            "|---|---|---|---|---|",
            *per_seed,
            "",
            f"Over all {runs} runs: {violations} global-limit violations, {lost} tasks never "
            f"completed, {twice} tasks completed twice, {fenced} attempts fenced (stopped when "
            "a cut-off site's lease on a shared pool expires; no pool is shared here).",
            "",
            f"Took {took:.0f} s.",
            "",
        ]
    )
    print(text)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
