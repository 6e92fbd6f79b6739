"""The simulator's side of Tactician: workload files and built-in scenarios."""

from tactician.sim.scenarios import SCENARIOS, Scenario, build, generate
from tactician.sim.workload import (
    WorkloadTask,
    parse_line,
    read_workload,
    summarize,
    write_workload,
)

__all__ = [
    "SCENARIOS",
    "Scenario",
    "WorkloadTask",
    "build",
    "generate",
    "parse_line",
    "read_workload",
    "summarize",
    "write_workload",
]
