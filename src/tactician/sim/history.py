"""A trace as recorded history: the simulator's side of `tactician.decide.training`."""

from __future__ import annotations

from collections.abc import Iterable

from tactician.decide.training import Recorded, feed, fit_recorded
from tactician.run.training import from_store
from tactician.sim.simulator import scored
from tactician.sim.workload import WorkloadTask

__all__ = ["Recorded", "feed", "fit_recorded", "from_store", "from_workload"]


def from_workload(tasks: Iterable[WorkloadTask]) -> list[Recorded]:
    """A trace as recorded history: each task started at its release and ran its duration."""
    ordered = sorted(tasks, key=lambda t: (t.submit_at, t.id))
    return [
        Recorded(scored(task, seq), task.release_at, task.duration)
        for seq, task in enumerate(ordered)
    ]
