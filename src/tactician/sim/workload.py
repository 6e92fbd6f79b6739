"""Workload files: the simulator's input, one task per JSON line.

Times are seconds from the start of the trace. `duration` is the true run time: the simulator
executes with it and a scheduler must never see it. Every error names the file, the line and
the field, e.g. ``workload.jsonl line 7: due_at (30.0) is before release_at (45.0)``.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from tactician.errors import InvalidInput

FeatureValue = float | int | str | bool

FIELDS = (
    "id",
    "kind",
    "submit_at",
    "release_at",
    "due_at",
    "duration",
    "estimate",
    "weight",
    "resources",
    "features",
    "sensitive",
    "depends_on",
)
REQUIRED = ("id", "kind", "submit_at", "duration")


@dataclass(frozen=True, kw_only=True)
class WorkloadTask:
    """One task of a trace, as the simulator submits it."""

    id: str
    kind: str
    submit_at: float
    """When the task is submitted, seconds from the start of the trace."""
    release_at: float
    """Earliest start (>= submit_at)."""
    duration: float
    """The true run time. The simulator runs with it; the scheduler never sees it."""
    due_at: float | None = None
    estimate: float | None = None
    """What the submitter believes the run time is; may be missing or wrong."""
    weight: float = 1.0
    resources: Mapping[str, int] = field(default_factory=dict)
    """Units held in each pool while running."""
    features: Mapping[str, FeatureValue] = field(default_factory=dict)
    """What a real system would know at submission: inputs for predictors and policies."""
    sensitive: bool = False
    depends_on: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The task as one line's object, fields in the documented order."""
        return {
            "id": self.id,
            "kind": self.kind,
            "submit_at": self.submit_at,
            "release_at": self.release_at,
            "due_at": self.due_at,
            "duration": self.duration,
            "estimate": self.estimate,
            "weight": self.weight,
            "resources": dict(self.resources),
            "features": dict(self.features),
            "sensitive": self.sensitive,
            "depends_on": list(self.depends_on),
        }


# --- reading ---------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    return json.dumps(value)[:60]


def _number(data: Mapping[str, Any], name: str, where: str) -> float:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{where}: {name} must be a number, got {_shown(value)}")
    if not math.isfinite(value):
        raise InvalidInput(f"{where}: {name} must be a finite number, got {value}")
    return float(value)


def _optional_number(data: Mapping[str, Any], name: str, where: str) -> float | None:
    if data.get(name) is None:
        return None
    return _number(data, name, where)


def _text(data: Mapping[str, Any], name: str, where: str) -> str:
    value = data[name]
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{where}: {name} must be a non-empty string, got {_shown(value)}")
    return value


def _resources(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: resources must be an object, got {_shown(value)}")
    for pool, units in value.items():
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise InvalidInput(
                f"{where}: resources.{pool} must be a positive integer, got {_shown(units)}"
            )
    return dict(value)


def _features(value: Any, where: str) -> dict[str, FeatureValue]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: features must be an object, got {_shown(value)}")
    for name, item in value.items():
        if not isinstance(item, int | float | str | bool) or (
            isinstance(item, float) and not math.isfinite(item)
        ):
            raise InvalidInput(
                f"{where}: features.{name} must be a number, string or boolean, got {_shown(item)}"
            )
    return dict(value)


def _depends_on(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidInput(f"{where}: depends_on must be a list of task ids, got {_shown(value)}")
    return tuple(value)


def parse_line(text: str, line_no: int, *, source: str = "workload") -> WorkloadTask:
    """One line of a workload file as a task; raises InvalidInput naming line and field."""
    where = f"{source} line {line_no}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{where}: a task must be a JSON object, got {_shown(data)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"{where}: unknown field {unknown[0]!r}")
    for name in REQUIRED:
        if name not in data:
            raise InvalidInput(f"{where}: {name} is missing")
    task_id, kind = _text(data, "id", where), _text(data, "kind", where)
    submit_at = _number(data, "submit_at", where)
    if submit_at < 0:
        raise InvalidInput(f"{where}: submit_at ({submit_at}) must be >= 0")
    release_at = _optional_number(data, "release_at", where)
    if release_at is None:
        release_at = submit_at
    elif release_at < submit_at:
        raise InvalidInput(f"{where}: release_at ({release_at}) is before submit_at ({submit_at})")
    due_at = _optional_number(data, "due_at", where)
    if due_at is not None and due_at < release_at:
        raise InvalidInput(f"{where}: due_at ({due_at}) is before release_at ({release_at})")
    duration = _number(data, "duration", where)
    if duration <= 0:
        raise InvalidInput(f"{where}: duration ({duration}) must be > 0")
    estimate = _optional_number(data, "estimate", where)
    if estimate is not None and estimate < 0:
        raise InvalidInput(f"{where}: estimate ({estimate}) must be >= 0")
    weight = 1.0 if data.get("weight") is None else _number(data, "weight", where)
    if weight < 0:
        raise InvalidInput(f"{where}: weight ({weight}) must be >= 0")
    sensitive = data.get("sensitive", False)
    if not isinstance(sensitive, bool):
        raise InvalidInput(f"{where}: sensitive must be true or false, got {_shown(sensitive)}")
    return WorkloadTask(
        id=task_id,
        kind=kind,
        submit_at=submit_at,
        release_at=release_at,
        due_at=due_at,
        duration=duration,
        estimate=estimate,
        weight=weight,
        resources=_resources(data.get("resources", {}), where),
        features=_features(data.get("features", {}), where),
        sensitive=sensitive,
        depends_on=_depends_on(data.get("depends_on", []), where),
    )


def check_workload(
    tasks: Sequence[WorkloadTask], line_numbers: Sequence[int], *, source: str = "workload"
) -> None:
    """Ids unique, dependencies known and acyclic; errors name the offending line."""
    line_of: dict[str, int] = {}
    for task, line_no in zip(tasks, line_numbers, strict=True):
        if task.id in line_of:
            raise InvalidInput(
                f"{source} line {line_no}: id {task.id!r} is already used on line "
                f"{line_of[task.id]}"
            )
        line_of[task.id] = line_no
    for task, line_no in zip(tasks, line_numbers, strict=True):
        for dep in task.depends_on:
            if dep not in line_of:
                raise InvalidInput(
                    f"{source} line {line_no}: depends_on names {dep!r}, which is not in the file"
                )
    cycle = _find_cycle(tasks)
    if cycle:
        first = min(cycle, key=line_of.__getitem__)
        start = cycle.index(first)
        path = [*cycle[start:], *cycle[:start], first]
        raise InvalidInput(
            f"{source} line {line_of[first]}: depends_on makes a cycle: {' -> '.join(path)}"
        )


def _find_cycle(tasks: Sequence[WorkloadTask]) -> list[str]:
    """Task ids along one dependency cycle, or [] (Kahn's algorithm, then a walk)."""
    waiting = {t.id: len(set(t.depends_on)) for t in tasks}
    dependents: dict[str, list[str]] = defaultdict(list)
    for t in tasks:
        for dep in set(t.depends_on):
            dependents[dep].append(t.id)
    free = [task_id for task_id, count in waiting.items() if count == 0]
    while free:
        done = free.pop()
        del waiting[done]
        for nxt in dependents[done]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                free.append(nxt)
    if not waiting:
        return []
    # Every task left waits on another task left, so walking its dependencies must loop.
    deps = {t.id: t.depends_on for t in tasks}
    node = next(iter(waiting))
    seen: dict[str, int] = {}
    walk: list[str] = []
    while node not in seen:
        seen[node] = len(walk)
        walk.append(node)
        node = next(d for d in deps[node] if d in waiting)
    return walk[seen[node] :]


def read_workload(path: str | PathLike[str]) -> list[WorkloadTask]:
    """All tasks of a workload file, checked; blank lines are skipped."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"{source}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{source}: not UTF-8 text") from None
    tasks: list[WorkloadTask] = []
    line_numbers: list[int] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            tasks.append(parse_line(line, line_no, source=source))
            line_numbers.append(line_no)
    check_workload(tasks, line_numbers, source=source)
    return tasks


def write_workload(path: str | PathLike[str], tasks: Iterable[WorkloadTask]) -> None:
    """Write tasks as JSON Lines, one task per line."""
    with Path(path).open("w", encoding="utf-8") as out:
        for task in tasks:
            out.write(json.dumps(task.to_json(), separators=(",", ":")) + "\n")


# --- summary ---------------------------------------------------------------------------------


def demand(tasks: Iterable[WorkloadTask]) -> dict[str, float]:
    """Units x seconds of true run time asked of each pool."""
    totals: dict[str, float] = defaultdict(float)
    for task in tasks:
        for pool, units in task.resources.items():
            totals[pool] += units * task.duration
    return dict(totals)


def span(tasks: Sequence[WorkloadTask]) -> float:
    """Seconds from the first submission to the last release: the window work arrives in."""
    if not tasks:
        return 0.0
    return max(t.release_at for t in tasks) - min(t.submit_at for t in tasks)


def summarize(
    tasks: Sequence[WorkloadTask], capacity: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Counts, demand per pool and, for pools with a capacity, the load over the span."""
    count = len(tasks)
    window = span(tasks)
    demanded = demand(tasks)
    load: dict[str, float | None] = {}
    for pool, units in (capacity or {}).items():
        work = demanded.get(pool, 0.0)
        load[pool] = round(work / (units * window), 4) if units > 0 and window > 0 else None
    return {
        "count": count,
        "kinds": dict(sorted(Counter(t.kind for t in tasks).items())),
        "span": window,
        "first_submit_at": min((t.submit_at for t in tasks), default=None),
        "last_release_at": max((t.release_at for t in tasks), default=None),
        "demand": {pool: round(work, 3) for pool, work in sorted(demanded.items())},
        "deadline_share": _share(t.due_at is not None for t in tasks),
        "estimate_share": _share(t.estimate is not None for t in tasks),
        "sensitive_share": _share(t.sensitive for t in tasks),
        "with_dependencies": sum(1 for t in tasks if t.depends_on),
        "mean_duration": round(sum(t.duration for t in tasks) / count, 3) if count else None,
        "load": load,
    }


def _share(flags: Iterable[bool]) -> float:
    values = list(flags)
    return round(sum(values) / len(values), 4) if values else 0.0
