"""How long 100,000 tasks take to simulate under every policy.

    .venv/bin/python benchmarks/scale.py [--scenario logistics] [--tasks 100000] [--runs 1]

Prints one JSON object: per policy the wall and CPU seconds of `tactician simulate`'s work
(building nothing: the trace is generated once, before timing) and its headline figures. The
target is under 5 minutes per policy on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from tactician.sim.metrics import compute_metrics
from tactician.sim.policies import BASELINES, get_policy
from tactician.sim.scenarios import build
from tactician.sim.simulator import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="logistics")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--policies", default=",".join((*BASELINES, "ai")))
    args = parser.parse_args()
    built = build(args.scenario, tasks=args.tasks, seed=1, load=1.2)
    out: dict[str, object] = {"scenario": args.scenario, "tasks": args.tasks, "policies": {}}
    for name in args.policies.split(","):
        walls, cpus = [], []
        figures: dict[str, object] = {}
        for _ in range(args.runs):
            policy = get_policy(name)
            began, cpu = time.perf_counter(), time.process_time()
            result = simulate(
                built.tasks,
                built.capacity,
                policy.make(),
                policy.options(),
                calendar=built.calendar,
            )
            walls.append(time.perf_counter() - began)
            cpus.append(time.process_time() - cpu)
            figures = compute_metrics(built.tasks, result, built.capacity, built.calendar)
        out["policies"][name] = {  # type: ignore[index]
            "wall_s": round(statistics.median(walls), 1),
            "cpu_s": round(statistics.median(cpus), 1),
            "completed": figures["completed"],
            "missed_deadlines": figures["missed_deadlines"],
            "mean_bounded_slowdown": figures["mean_bounded_slowdown"],
        }
        print(name, out["policies"][name], file=sys.stderr, flush=True)  # type: ignore[index]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
