"""Central against agents on one workload: both modes' usual metrics, decision latency, the
independent check of global limits, run counts, and what the outages cost each mode (the same
mode without them is the reference). What `tactician simulate --agents N` prints.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tactician.sim.agents import AGENTS, CENTRAL, AgentsOptions, ModeResult, run_mode
from tactician.sim.checks import Executed, Violations, check_schedule
from tactician.sim.metrics import compute_metrics
from tactician.sim.policies import Policy
from tactician.sim.sites import Layout, Links, layout, random_outages
from tactician.sim.workload import WorkloadTask


@dataclass(frozen=True)
class AgentsSetup:
    """What `tactician simulate --agents N` was given."""

    sites: int
    options: AgentsOptions = field(default_factory=AgentsOptions)
    site_key: str | None = None
    site_capacity: Mapping[str, Mapping[str, int]] | None = None
    random_outages: int = 0
    outage_length: float = 3600.0
    seed: int = 0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100.0 * len(ordered)) - 1)]


def run_counts(tasks: Sequence[WorkloadTask], runs: Sequence[Executed]) -> dict[str, int]:
    """Nothing lost, nothing run twice: completed runs per task, from the executed runs."""
    completed: dict[str, int] = {}
    for r in runs:
        if r.completed:
            completed[r.task] = completed.get(r.task, 0) + 1
    return {
        "attempts": len(runs),
        "fenced": sum(1 for r in runs if not r.completed and math.isfinite(r.end)),
        "completed_once": sum(1 for t in tasks if completed.get(t.id, 0) == 1),
        "completed_twice": sum(1 for t in tasks if completed.get(t.id, 0) > 1),
        "never_completed": sum(1 for t in tasks if completed.get(t.id, 0) == 0),
    }


def _latency(mode: ModeResult) -> dict[str, float]:
    cpu = [1000.0 * s for s in mode.decision_cpu_s]
    rtt = 1000.0 * mode.rtt_s
    return {
        "p50": round(percentile(cpu, 50) + rtt, 3),
        "p99": round(percentile(cpu, 99) + rtt, 3),
        "measured_cpu_p50": round(percentile(cpu, 50), 3),
        "measured_cpu_p99": round(percentile(cpu, 99), 3),
        "modelled_rtt": round(rtt, 3),
        "decisions": len(cpu),
    }


_COST_KEYS = ("missed_deadlines", "weighted_tardiness", "mean_wait_s")


def figures(
    tasks: Sequence[WorkloadTask],
    sites: Layout,
    options: AgentsOptions,
    mode: ModeResult,
    wall_s: float,
) -> dict[str, Any]:
    """The usual metrics of one mode's run, plus latency, violations and run counts."""
    capacity, calendar = sites.totals()
    metrics = compute_metrics(tasks, mode.result, capacity, calendar)
    violations: Violations = check_schedule(
        mode.runs,
        rates=options.rates,
        pools=options.pools,
        site_capacity=sites.capacity_at,
    )
    metrics["escalations"] = mode.result.escalations
    metrics["wall_s"] = round(wall_s, 3)
    metrics["decision_latency_ms"] = _latency(mode)
    metrics["violations"] = violations.to_json()
    metrics["global_limit_violations"] = violations.global_limits
    metrics["runs"] = run_counts(tasks, mode.runs)
    return metrics


def compare(
    tasks: Sequence[WorkloadTask],
    capacity: Mapping[str, int],
    calendar: Mapping[str, Sequence[tuple[float, int]]],
    policy: Policy,
    setup: AgentsSetup,
    *,
    history: Sequence[WorkloadTask] = (),
) -> dict[str, Any]:
    """Central and agents on the same workload and seed: per mode, the figures of `figures`
    and, when there are outages, their cost (the same mode without them as the reference)."""
    sites = layout(
        tasks,
        setup.sites,
        capacity,
        calendar,
        seed=setup.seed,
        key=setup.site_key,
        site_capacity=setup.site_capacity,
    )
    span = max((t.release_at for t in tasks), default=0.0)
    outages = tuple(setup.options.outages) + tuple(
        random_outages(
            sites.sites, setup.random_outages, setup.outage_length, span, seed=setup.seed
        )
    )
    options = dataclasses.replace(setup.options, outages=outages)
    modes: dict[str, Any] = {}
    for mode in (CENTRAL, AGENTS):
        began = time.perf_counter()
        result = run_mode(tasks, sites, policy, options, mode, history=history)
        modes[mode] = figures(tasks, sites, options, result, time.perf_counter() - began)
        modes[mode]["outage_cost"] = None
        if outages:
            began = time.perf_counter()
            calm = dataclasses.replace(options, outages=())
            reference = run_mode(tasks, sites, policy, calm, mode, history=history)
            base = figures(tasks, sites, calm, reference, time.perf_counter() - began)
            modes[mode]["without_outages"] = {
                key: base[key] for key in (*_COST_KEYS, "global_limit_violations", "runs")
            }
            modes[mode]["outage_cost"] = {
                key: round(modes[mode][key] - base[key], 3) for key in _COST_KEYS
            }
    return {
        "modes": modes,
        "setup": {
            "policy": policy.name,
            "sites": list(sites.sites),
            "site_key": sites.key,
            "site_groups": {s: list(v) for s, v in sites.groups.items()},
            "site_capacity": {s: dict(c) for s, c in sites.capacity.items()},
            "global_rates": {
                kind: {"per_second": limit.per_second, "burst": limit.burst}
                for kind, limit in options.rates.items()
            },
            "global_pools": dict(options.pools),
            "outages": [{"site": s, "start": a, "end": b} for s, a, b in Links(outages).spans()],
            "rtt_s": options.rtt,
            "lease_period_s": options.lease_period,
            "lease_ttl_s": options.lease_ttl,
        },
    }
