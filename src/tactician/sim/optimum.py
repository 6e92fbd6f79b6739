"""The offline optimum: the best non-preemptive schedule of a small trace, found by CP-SAT.

Clairvoyant: it knows every arrival and every true `duration` in advance, which no policy does,
so it is the yardstick a policy's result is measured against. One objective at a time, each as
`sim.metrics` computes it:

    missed               tasks with a deadline that finish after it; ties broken by weighted
                         tardiness in whole seconds, weighted so that one miss outweighs all of it
    weighted_tardiness   Σ weight · max(0, finish - due_at)
    slowdown             mean of max(1, (finish - release_at) / max(duration, 10 s))

The model: a start per task, at or after `release_at`; finish = start + duration; per bounded
pool a cumulative constraint over the units the tasks hold (pools missing from `capacity` are
unbounded); a task starts after everything it depends on has finished.

Times are scaled to integer ticks: the coarsest of 1 s, 0.1 s, 0.01 s and 1 ms on which every
release, deadline and duration lies exactly (the built-in scenarios round to 1 ms). Off that grid
the model is conservative (releases and durations rounded up, deadlines down) and the bound is
then a bound of the gridded problem. The model's schedule becomes float times by replaying its
start order through a serial schedule (each task, in that order, at the earliest float time its
release, dependencies and pool allow): no task finishes later than in the model, and the result
is feasible in exactly the arithmetic `sim.metrics` uses (finish = start + duration).

The classic rules (fifo, edf, wspt, least slack, and shortest-first for slowdown) are first run
clairvoyantly, as the simulator runs a scorer; the best is CP-SAT's hint and the fallback, so the
optimum is never worse than they are, even when the time limit cuts the search.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ortools.sat.python import cp_model

from tactician.errors import InvalidInput
from tactician.sim.metrics import SLOWDOWN_TAU
from tactician.sim.simulator import TaskRecord
from tactician.sim.workload import WorkloadTask

MAX_TASKS = 60
"""The largest trace the model takes: beyond it CP-SAT rarely proves anything in seconds."""
OBJECTIVES = ("missed", "weighted_tardiness", "slowdown")
RESOLUTIONS = (1.0, 0.1, 0.01, 0.001)
"""Candidate tick lengths in seconds, coarsest first."""
WEIGHT_SCALES = (1, 10, 100, 1000)
"""Candidate multipliers that make weights integers, smallest first (else rounded at 1000)."""
SLOWDOWN_PRECISION = 1000
"""Each task's slowdown coefficient is an integer of at least this: relative error <= 1/1000."""
SEED = 0
"""CP-SAT's random seed. A search that ends by proof gives the same value on every run (and,
with one worker, the same schedule); one cut by the time limit may vary with the machine's load.
"""

_GRID_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Optimum:
    """The best schedule found, its value, and how close to proven it is."""

    records: dict[str, TaskRecord]
    """Task id → start and finish, in the order of the input (the simulator's record type)."""
    objective_value: float
    """The objective of `records`, computed as `sim.metrics` computes it."""
    optimal: bool
    """True when CP-SAT proved that no schedule is better (for `missed`: has fewer misses).

    Off the tick grid, or for `slowdown` (coefficients rounded to 1/1000), proven for the model.
    """
    bound: float
    """No schedule does better than this (in the objective's own units)."""
    wall_s: float
    """Seconds spent, scheduling the baselines and solving."""
    objective: str = "missed"
    resolution_s: float = 0.001
    """The tick the model used."""


# --- input -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Instance:
    tasks: Sequence[WorkloadTask]
    pools: list[str | None]
    """The bounded pool each task holds, or None."""
    units: list[int]
    parents: list[list[int]]
    capacity: Mapping[str, int]


def _instance(tasks: Sequence[WorkloadTask], capacity: Mapping[str, int]) -> _Instance:
    if len(tasks) > MAX_TASKS:
        raise InvalidInput(f"the offline optimum takes at most {MAX_TASKS} tasks, got {len(tasks)}")
    index: dict[str, int] = {}
    for i, task in enumerate(tasks):
        if task.id in index:
            raise InvalidInput(f"task ids must be unique: {task.id!r} is used twice")
        index[task.id] = i
    pools: list[str | None] = []
    units: list[int] = []
    for task in tasks:
        if len(task.resources) > 1:
            raise InvalidInput(f"task {task.id}: holds {len(task.resources)} pools; one at most")
        pool, held = next(iter(task.resources.items()), (None, 0))
        cap = None if pool is None else capacity.get(pool)
        if cap is not None and held > cap:
            raise InvalidInput(f"task {task.id}: needs {held} units of {pool}, which has {cap}")
        pools.append(pool if cap is not None else None)
        units.append(held)
    parents: list[list[int]] = []
    for task in tasks:
        unknown = [dep for dep in task.depends_on if dep not in index]
        if unknown:
            raise InvalidInput(f"task {task.id}: depends_on names unknown task {unknown[0]!r}")
        parents.append(sorted({index[dep] for dep in task.depends_on}))
    _check_acyclic(tasks, parents)
    return _Instance(tasks, pools, units, parents, capacity)


def _check_acyclic(tasks: Sequence[WorkloadTask], parents: list[list[int]]) -> None:
    state = [0] * len(tasks)  # 0 new, 1 on the path, 2 done
    for root in range(len(tasks)):
        stack = [(root, 0)]
        while stack:
            i, next_parent = stack.pop()
            if next_parent == 0:
                if state[i] == 2:
                    continue
                state[i] = 1
            if next_parent < len(parents[i]):
                stack.append((i, next_parent + 1))
                parent = parents[i][next_parent]
                if state[parent] == 1:
                    raise InvalidInput(f"task {tasks[i].id}: its dependencies form a cycle")
                if state[parent] == 0:
                    stack.append((parent, 0))
            else:
                state[i] = 2


# --- float schedules -------------------------------------------------------------------------


def _serial_schedule(instance: _Instance, order: Sequence[int]) -> tuple[list[float], list[float]]:
    """Each task in `order` (parents before children) at its earliest feasible float time."""
    tasks = instance.tasks
    starts = [0.0] * len(tasks)
    finishes = [0.0] * len(tasks)
    placed: dict[str, list[tuple[float, float, int]]] = {}
    for i in order:
        task = tasks[i]
        earliest = max([task.release_at, *(finishes[p] for p in instance.parents[i])])
        pool = instance.pools[i]
        start = earliest
        if pool is not None:
            busy = placed.setdefault(pool, [])
            room = instance.capacity[pool] - instance.units[i]
            for at in sorted({earliest, *(f for _, f, _ in busy if f > earliest)}):
                end = at + task.duration
                points = [at, *(s for s, _, _ in busy if at < s < end)]
                if all(sum(u for s, f, u in busy if s <= x < f) <= room for x in points):
                    start = at
                    break
            busy.append((start, start + task.duration, instance.units[i]))
        starts[i] = start
        finishes[i] = start + task.duration
    return starts, finishes


def _value(
    tasks: Sequence[WorkloadTask],
    starts: Sequence[float],
    finishes: Sequence[float],
    objective: str,
) -> tuple[float, float]:
    """(objective, tie-break) as `sim.metrics` computes them; only `missed` has a tie-break."""
    missed = 0
    tardiness = 0.0
    slowdown = 0.0
    for task, start, finish in zip(tasks, starts, finishes, strict=True):
        if task.due_at is not None:
            missed += finish > task.due_at
            tardiness += task.weight * max(0.0, finish - task.due_at)
        run = finish - start
        slowdown += max(1.0, (finish - task.release_at) / max(run, SLOWDOWN_TAU))
    if objective == "missed":
        return float(missed), tardiness
    if objective == "weighted_tardiness":
        return tardiness, 0.0
    return (slowdown / len(tasks) if tasks else 0.0), 0.0


def _list_schedule(instance: _Instance, priority: Sequence[float | tuple[float, ...]]) -> list[int]:
    """Start order of the non-delay list schedule the simulator would run with `priority`.

    At every release or finish, the ready tasks start in priority order while they fit (a task
    that does not fit is passed over), as `plan_starts` does.
    """
    tasks = instance.tasks
    left = set(range(len(tasks)))
    finish: dict[int, float] = {}
    used: dict[str, int] = {}
    running: list[int] = []
    order: list[int] = []
    now = min((t.release_at for t in tasks), default=0.0)
    while left:
        for i in [r for r in running if finish[r] <= now]:
            running.remove(i)
            pool = instance.pools[i]
            if pool is not None:
                used[pool] -= instance.units[i]
        ready = [
            i
            for i in left
            if tasks[i].release_at <= now
            and all(p in finish and finish[p] <= now for p in instance.parents[i])
        ]
        for i in sorted(ready, key=lambda i: priority[i]):
            pool = instance.pools[i]
            if pool is not None:
                if used.get(pool, 0) + instance.units[i] > instance.capacity[pool]:
                    continue
                used[pool] = used.get(pool, 0) + instance.units[i]
            left.discard(i)
            running.append(i)
            order.append(i)
            finish[i] = now + tasks[i].duration
        upcoming = [finish[r] for r in running] + [
            tasks[i].release_at for i in left if tasks[i].release_at > now
        ]
        assert upcoming or not left, "a task can never start"
        now = min(upcoming, default=now)
    return order


def _baselines(instance: _Instance) -> dict[str, list[int]]:
    """Start orders of the classic rules, run clairvoyantly (true durations)."""
    tasks = instance.tasks
    seq = [(t.submit_at, i) for i, t in enumerate(tasks)]
    inf = math.inf
    keys: dict[str, list[tuple[float, ...]]] = {
        "fifo": [(*seq[i],) for i in range(len(tasks))],
        "edf": [(inf if t.due_at is None else t.due_at, *seq[i]) for i, t in enumerate(tasks)],
        "wspt": [
            (t.duration / t.weight if t.weight > 0 else inf, *seq[i]) for i, t in enumerate(tasks)
        ],
        "slack": [
            (inf if t.due_at is None else t.due_at - t.duration, *seq[i])
            for i, t in enumerate(tasks)
        ],
        "slowdown": [
            (t.duration * max(t.duration, SLOWDOWN_TAU), *seq[i]) for i, t in enumerate(tasks)
        ],
    }
    return {name: _list_schedule(instance, key) for name, key in keys.items()}


def _baseline(instance: _Instance, objective: str) -> tuple[tuple[float, float], list[int]]:
    """The best start order among the baselines, replayed by the serial schedule."""
    tasks = instance.tasks
    best: tuple[tuple[float, float], list[int]] | None = None
    for order in _baselines(instance).values():
        value = _value(tasks, *_serial_schedule(instance, order), objective)
        if best is None or value < best[0]:
            best = (value, order)
    assert best is not None
    return best


# --- ticks -----------------------------------------------------------------------------------


def _on_grid(value: float, scale: float) -> bool:
    scaled = value * scale
    return abs(scaled - round(scaled)) <= _GRID_TOLERANCE


def _resolution(tasks: Sequence[WorkloadTask]) -> float:
    values = [v for t in tasks for v in (t.release_at, t.due_at, t.duration) if v is not None]
    for tick in RESOLUTIONS:
        if all(_on_grid(v, 1.0 / tick) for v in values):
            return tick
    return RESOLUTIONS[-1]


def _ticks(value: float, tick: float, *, up: bool) -> int:
    scaled = value / tick
    if abs(scaled - round(scaled)) <= _GRID_TOLERANCE:
        return round(scaled)
    return math.ceil(scaled) if up else math.floor(scaled)


def _weights(tasks: Sequence[WorkloadTask]) -> tuple[list[int], int]:
    for scale in WEIGHT_SCALES:
        if all(_on_grid(t.weight, scale) for t in tasks):
            return [round(t.weight * scale) for t in tasks], scale
    scale = WEIGHT_SCALES[-1]
    return [round(t.weight * scale) for t in tasks], scale


# --- the models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """The instance in ticks."""

    tick: float
    release: list[int]
    duration: list[int]
    due: dict[int, int]
    """Task index → deadline, for the tasks that have one."""
    horizon: int

    @classmethod
    def of(cls, tasks: Sequence[WorkloadTask], tick: float) -> _Grid:
        release = [_ticks(t.release_at, tick, up=True) for t in tasks]
        duration = [max(1, _ticks(t.duration, tick, up=True)) for t in tasks]
        due = {
            i: _ticks(t.due_at, tick, up=False) for i, t in enumerate(tasks) if t.due_at is not None
        }
        return cls(tick, release, duration, due, max(release, default=0) + sum(duration))

    def hint(self, starts: Sequence[float]) -> list[int]:
        return [
            max(r, _ticks(s, self.tick, up=True)) for r, s in zip(self.release, starts, strict=True)
        ]


@dataclass
class _Model:
    model: cp_model.CpModel
    starts: list[cp_model.IntVar]
    to_value: float
    """Objective units per model unit (for `missed`: one miss per `miss_cost`)."""
    miss_cost: int = 0
    lates: list[cp_model.IntVar] | None = None


def _resources(
    instance: _Instance, model: cp_model.CpModel, intervals: Sequence[cp_model.IntervalVar]
) -> None:
    for pool, cap in sorted(instance.capacity.items()):
        members = [i for i, p in enumerate(instance.pools) if p == pool]
        if not members:
            continue
        demands = [instance.units[i] for i in members]
        model.add_cumulative([intervals[i] for i in members], demands, cap)
        if len(members) > 1 and 2 * min(demands) > cap:
            # No two of them ever fit together: disjunctive reasoning is much stronger.
            model.add_no_overlap([intervals[i] for i in members])


def _build(instance: _Instance, objective: str, grid: _Grid, hint: Sequence[int]) -> _Model:
    """The CP-SAT model, every variable hinted from the start ticks `hint`."""
    tasks = instance.tasks
    model = cp_model.CpModel()
    release, duration, due, horizon = grid.release, grid.duration, grid.due, grid.horizon
    starts: list[cp_model.IntVar] = []
    ends: list[cp_model.IntVar] = []
    intervals: list[cp_model.IntervalVar] = []
    for i, task in enumerate(tasks):
        start = model.new_int_var(release[i], horizon - duration[i], f"s{task.id}")
        end = model.new_int_var(release[i] + duration[i], horizon, f"e{task.id}")
        intervals.append(model.new_interval_var(start, duration[i], end, f"i{task.id}"))
        starts.append(start)
        ends.append(end)
        model.add_hint(start, hint[i])
        model.add_hint(end, hint[i] + duration[i])
    for i, parents in enumerate(instance.parents):
        for parent in parents:
            model.add(starts[i] >= ends[parent])
    _resources(instance, model, intervals)

    hinted_end = [hint[i] + duration[i] for i in range(len(tasks))]
    weights, weight_scale = _weights(tasks)
    terms: list[cp_model.LinearExprT] = []
    if objective == "slowdown":
        tau = round(SLOWDOWN_TAU / grid.tick)
        scale = [max(d, tau) for d in duration]
        big = SLOWDOWN_PRECISION * max(scale, default=1)
        offset = 0
        for i in range(len(tasks)):
            if duration[i] >= tau:
                # end - release >= duration = scale: the max with 1 never bites. Ends in the
                # objective let the LP's completion-time cuts see it.
                terms.append((big // scale[i]) * ends[i])
                offset += (big // scale[i]) * release[i]
                continue
            # flow >= max(scale, end - release): the bounded slowdown times `scale`.
            flow = model.new_int_var(scale[i], max(scale[i], horizon - release[i]), f"f{i}")
            model.add(flow >= ends[i] - release[i])
            model.add_hint(flow, max(scale[i], hinted_end[i] - release[i]))
            terms.append((big // scale[i]) * flow)
        model.minimize(cp_model.LinearExpr.sum(terms) - offset)
        # Coefficients are rounded down: objective / big never exceeds the true sum.
        return _Model(model, starts, 1.0 / (big * max(1, len(tasks))))
    if objective == "weighted_tardiness":
        for i in due:
            tardy = model.new_int_var(0, max(0, horizon - due[i]), f"t{i}")
            model.add(tardy >= ends[i] - due[i])
            model.add_hint(tardy, max(0, hinted_end[i] - due[i]))
            terms.append(weights[i] * tardy)
        model.minimize(cp_model.LinearExpr.sum(terms))
        return _Model(model, starts, grid.tick / weight_scale)
    # missed: a miss costs more than the largest possible tie-break, tardiness in whole seconds.
    per_second = max(1, round(1.0 / grid.tick))
    lates: list[cp_model.IntVar] = []
    miss_cost = 1
    for i in due:
        most = max(0, -(-(horizon - due[i]) // per_second))
        tardy = model.new_int_var(0, most, f"t{i}")
        model.add(per_second * tardy >= ends[i] - due[i])
        model.add_hint(tardy, max(0, -(-(hinted_end[i] - due[i]) // per_second)))
        terms.append(weights[i] * tardy)
        miss_cost += weights[i] * most
        late = model.new_bool_var(f"late{i}")
        model.add(ends[i] <= due[i]).only_enforce_if(~late)
        model.add_hint(late, hinted_end[i] > due[i])
        lates.append(late)
    model.minimize(miss_cost * cp_model.LinearExpr.sum(lates) + cp_model.LinearExpr.sum(terms))
    return _Model(model, starts, 1.0, miss_cost, lates)


def _build_on_time(
    instance: _Instance, grid: _Grid, hint: Sequence[int]
) -> tuple[cp_model.CpModel, list[cp_model.IntVar], list[cp_model.IntVar]]:
    """The most tasks that can meet their deadlines: (model, starts, kept).

    Exact for the number of misses: a kept task runs in its window; every other task can run
    after all kept ones (placed later by the serial schedule, it never delays them), so it holds
    no capacity here. A kept task keeps what it depends on.
    """
    tasks = instance.tasks
    model = cp_model.CpModel()
    release, duration, due = grid.release, grid.duration, grid.due
    starts: list[cp_model.IntVar] = []
    ends: list[cp_model.IntVar] = []
    kept: list[cp_model.IntVar] = []
    intervals: list[cp_model.IntervalVar] = []
    for i, task in enumerate(tasks):
        last_end = due.get(i, grid.horizon)
        keep = model.new_bool_var(f"k{task.id}")
        if last_end < release[i] + duration[i]:
            model.add(keep == 0)  # it cannot make its deadline
            last_end = release[i] + duration[i]
        start = model.new_int_var(release[i], last_end - duration[i], f"s{task.id}")
        end = model.new_int_var(release[i] + duration[i], last_end, f"e{task.id}")
        intervals.append(
            model.new_optional_interval_var(start, duration[i], end, keep, f"i{task.id}")
        )
        on_time = hint[i] + duration[i] <= last_end
        model.add_hint(keep, on_time)
        model.add_hint(start, hint[i] if on_time else release[i])
        model.add_hint(end, (hint[i] if on_time else release[i]) + duration[i])
        starts.append(start)
        ends.append(end)
        kept.append(keep)
    for i, parents in enumerate(instance.parents):
        for parent in parents:
            model.add_implication(kept[i], kept[parent])
            model.add(starts[i] >= ends[parent]).only_enforce_if(kept[i])
    _resources(instance, model, intervals)
    model.minimize(cp_model.LinearExpr.sum([1 - kept[i] for i in due]))
    return model, starts, kept


def _topological(order: Sequence[int], parents: Sequence[Sequence[int]]) -> list[int]:
    """`order` changed as little as possible so that parents come before their children."""
    left = list(order)
    done: set[int] = set()
    out: list[int] = []
    while left:
        k = next(k for k, i in enumerate(left) if all(p in done for p in parents[i]))
        done.add(left[k])
        out.append(left.pop(k))
    return out


def _solver(seconds: float, workers: int) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.0, seconds)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = SEED
    if workers <= 2:
        # The full-problem search with the strongest LP (completion-time and energy cuts) and,
        # with two workers, LNS beside it: better bounds and schedules than the default here.
        if workers == 1:
            solver.parameters.linearization_level = 2
        else:
            solver.parameters.subsolvers.append("max_lp")
    return solver


def _checked(status: cp_model.CpSolverStatus, model: cp_model.CpModel) -> cp_model.CpSolverStatus:
    if status == cp_model.MODEL_INVALID:
        raise InvalidInput(f"the trace cannot be modelled: {model.validate()}")
    # The horizon leaves room for every task in turn: an infeasible model is a bug here.
    assert status != cp_model.INFEASIBLE, "the offline model is infeasible"
    return status


@dataclass
class _Search:
    """The best schedule so far, as a start order, and its (objective, tie-break)."""

    instance: _Instance
    objective: str
    value: tuple[float, float]
    order: list[int]

    def offer(self, order: list[int]) -> bool:
        value = _value(self.instance.tasks, *_serial_schedule(self.instance, order), self.objective)
        if value <= self.value:
            self.value, self.order = value, order
            return True
        return False

    def offer_ticks(self, ticks: Sequence[int]) -> bool:
        return self.offer(sorted(range(len(ticks)), key=lambda i: (ticks[i], i)))


def _count_first(search: _Search, grid: _Grid, seconds: float, workers: int) -> float:
    """Most of the time on the number of misses alone: returns its proven lower bound."""
    instance = search.instance
    hint = grid.hint(_serial_schedule(instance, search.order)[0])
    model, starts, kept = _build_on_time(instance, grid, hint)
    solver = _solver(seconds, workers)
    status = _checked(solver.solve(model), model)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        ticks = [solver.value(s) for s in starts]
        chosen = [i for i in range(len(ticks)) if solver.boolean_value(kept[i])]
        rest = [i for i in range(len(ticks)) if not solver.boolean_value(kept[i])]
        edf = sorted(rest, key=lambda i: (grid.due.get(i, grid.horizon), ticks[i], i))
        chosen.sort(key=lambda i: (ticks[i], i))
        search.offer(_topological(chosen + edf, instance.parents))
    return math.ceil(solver.best_objective_bound - 1e-9)


def offline_optimum(
    tasks: Sequence[WorkloadTask],
    capacity: Mapping[str, int],
    objective: str,
    time_limit_s: float = 20.0,
    workers: int = 2,
) -> Optimum:
    """The best schedule of `tasks` for `objective` that CP-SAT finds within the time limit.

    For `missed`, up to 70 % of the time goes to the number of misses alone (a model of which
    tasks can all meet their deadlines); the rest to the tie-break with that number capped.
    """
    began = time.perf_counter()
    if objective not in OBJECTIVES:
        raise InvalidInput(f"no objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if not time_limit_s > 0 or workers < 1:
        raise InvalidInput("time_limit_s must be > 0 and workers >= 1")
    instance = _instance(tasks, capacity)
    tick = _resolution(tasks)
    if not tasks:
        return Optimum({}, 0.0, True, 0.0, time.perf_counter() - began, objective, tick)

    def left() -> float:
        return time_limit_s - (time.perf_counter() - began)

    grid = _Grid.of(tasks, tick)
    search = _Search(instance, objective, *_baseline(instance, objective))
    count_bound = -math.inf
    if objective == "missed" and search.value[0] > 0:
        count_bound = _count_first(search, grid, 0.7 * left(), workers)
    built = _build(
        instance, objective, grid, grid.hint(_serial_schedule(instance, search.order)[0])
    )
    if built.lates is not None:
        # No schedule with more misses than the best so far needs looking at.
        built.model.add(cp_model.LinearExpr.sum(built.lates) <= round(search.value[0]))
    solver = _solver(left(), workers)
    status = _checked(solver.solve(built.model), built.model)
    solved = False
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        solved = search.offer_ticks([solver.value(s) for s in built.starts])
    if built.miss_cost:
        bound = max(count_bound, math.floor(solver.best_objective_bound / built.miss_cost + 1e-9))
    else:
        bound = solver.best_objective_bound * built.to_value
    value = search.value[0]
    if value < bound <= value + 1e-9 * max(1.0, value):
        bound = value  # rounding in the conversion back to seconds
    optimal = (solved and status == cp_model.OPTIMAL) or value <= bound
    starts, finishes = _serial_schedule(instance, search.order)
    records = {t.id: TaskRecord(t.id, starts[i], finishes[i]) for i, t in enumerate(tasks)}
    return Optimum(
        records, value, optimal, float(bound), time.perf_counter() - began, objective, tick
    )
