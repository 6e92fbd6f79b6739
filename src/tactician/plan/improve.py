"""A better start order for the ready tasks, found within a time budget at each planning tick.

The order is a priority list. `evaluate_order` predicts what it leads to by list scheduling: the
tasks, in list order, each start at the earliest time (from `now`) at which their pool has their
units free for their whole predicted run, given the running tasks and the tasks before them in
the list (the serial schedule-generation scheme; a later task may use a gap that an earlier one
leaves only if it fits there entirely). No preemption. When every task holds one unit this is
exactly what `plan_starts` does tick after tick; for multi-unit tasks it is the schedule with
reservations, which the greedy planner may beat or miss.

`improve_order` searches for a better list under one objective, computed with the predicted
durations:

    missed               tasks with a deadline predicted to finish after it (with `p90` when it
                         is known: a task counts as on time only if it is 90 % sure to be);
                         ties broken by weighted tardiness
    weighted_tardiness   Σ weight · max(0, start + p - due_at)
    slowdown             mean of max(1, (start + p - release_at) / max(p, 10 s))

Pools are independent (a task holds one pool), so each pool's list is improved on its own. The
search starts from the best of the given order and a few classic ones (earliest deadline,
weighted shortest first, least slack, shortest-first for slowdown); with few tasks CP-SAT then
looks for the best start times, hinted with that schedule, and its answer becomes a list by start
time; otherwise, or when CP-SAT finds nothing, or time is left, a local search (adjacent swaps,
then insertions) follows. The result is never worse than the given order under `evaluate_order`.

The budget is wall time: `time.perf_counter` is read here, and only to stop the search; CP-SAT
gets what is left as `max_time_in_seconds`. No other I/O.
"""

from __future__ import annotations

import heapq
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ortools.sat.python import cp_model

from tactician.errors import InvalidInput

OBJECTIVES = ("missed", "weighted_tardiness", "slowdown")
SLOWDOWN_TAU = 10.0
"""Seconds below which a run counts as this long in the bounded slowdown (as sim.metrics)."""
CP_SAT_MAX_TASKS = 40
"""CP-SAT is tried only when at most this many ready tasks share bounded pools."""
CP_SAT_MIN_BUDGET_S = 0.02
"""Below this much time left, CP-SAT could not even load the model: local search only."""
CP_SAT_TICKS = 100_000
"""The CP-SAT horizon is cut into at most this many ticks (and none shorter than 1 ms)."""
SEED = 0

_TOLERANCE = 1e-12
"""Relative differences below this are float noise (sums are exactly rounded)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadyTask:
    """A ready task as the improvement sees it."""

    id: str
    p: float
    """Predicted run time in seconds."""
    pool: str = ""
    """The pool it holds while running; "" or a pool missing from the capacities: unbounded."""
    units: int = 1
    due_at: float | None = None
    weight: float = 1.0
    p90: float | None = None
    """Predicted 90th percentile of the run time: the deadline test of `missed` uses it."""
    release_at: float | None = None
    """When it became ready, for the slowdown (None: now)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningTask:
    """A task holding units now, until its expected end (if that is past: until now)."""

    pool: str
    units: int
    ends_at: float


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What an order leads to under list scheduling with the predicted durations."""

    objective: str
    value: float
    """The objective: missed count, weighted tardiness, or mean bounded slowdown."""
    missed: int
    weighted_tardiness: float
    mean_slowdown: float
    starts: Mapping[str, float]

    @property
    def key(self) -> tuple[float, ...]:
        """What is minimised, most important first."""
        if self.objective == "missed":
            return (self.missed, self.weighted_tardiness)
        return (self.value,)


@dataclass(frozen=True, slots=True)
class Improvement:
    """The order to use, what it leads to, and how it was found."""

    order: tuple[str, ...]
    evaluation: Evaluation
    initial: Evaluation
    """The given order's evaluation: `evaluation.key` is never worse."""
    method: str
    """"given", "heuristic", "cp-sat" or "local-search": what produced the order."""
    cp_sat_optimal: bool
    """CP-SAT proved no start times better (on its tick grid)."""
    elapsed_s: float


# --- the problem -----------------------------------------------------------------------------

_Cost = tuple[int, float, float]
"""(missed, weighted tardiness, Σ bounded slowdown) of some tasks."""


class _Problem:
    """The ready tasks, checked, with each bounded pool's free units over time."""

    def __init__(
        self,
        ready: Sequence[ReadyTask],
        running: Sequence[RunningTask],
        capacity: Mapping[str, int],
        now: float,
        objective: str,
    ) -> None:
        if objective not in OBJECTIVES:
            raise InvalidInput(f"no objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if not math.isfinite(now):
            raise InvalidInput(f"now must be a finite number, got {now}")
        self.ready = ready
        self.now = now
        self.objective = objective
        self.index: dict[str, int] = {}
        for i, task in enumerate(ready):
            _check(task)
            if task.id in self.index:
                raise InvalidInput(f"task ids must be unique: {task.id!r} is given twice")
            self.index[task.id] = i
            cap = capacity.get(task.pool)
            if task.pool and cap is not None and task.units > cap:
                raise InvalidInput(
                    f"task {task.id}: needs {task.units} units of {task.pool}, which has {cap}"
                )
        for holder in running:
            if holder.units < 0 or not math.isfinite(holder.ends_at):
                raise InvalidInput("a running task needs units >= 0 and a finite expected end")
        self.bounded = {p: c for p, c in capacity.items() if p}
        self.deadline_run = [t.p if t.p90 is None else max(t.p, t.p90) for t in ready]
        self.due = [math.inf if t.due_at is None else t.due_at for t in ready]
        self.flow_base = [now - (now if t.release_at is None else t.release_at) for t in ready]
        self.members: dict[str, list[int]] = {}
        self.unbounded: list[int] = []
        for i, task in enumerate(ready):
            if task.pool in self.bounded:
                self.members.setdefault(task.pool, []).append(i)
            else:
                self.unbounded.append(i)
        self.profiles = {
            pool: _base_profile(cap, [r for r in running if r.pool == pool], now)
            for pool, cap in self.bounded.items()
            if pool in self.members
        }
        self.unit_pools = {
            pool
            for pool, members in self.members.items()
            if all(ready[i].units == 1 for i in members)
        }

    def starts(self, pool: str, sequence: Sequence[int]) -> list[float]:
        """Serial list schedule of `sequence` (tasks of `pool`, in order): one start per task."""
        times, free = self.profiles[pool]
        ready = self.ready
        if pool in self.unit_pools:
            # Unit demands: free units only grow with time, so each task takes the unit that
            # frees first (a heap of unit release times) — the same as the general case.
            lanes = _lanes(times, free, self.bounded[pool])
            out = []
            for i in sequence:
                start = heapq.heappop(lanes)
                out.append(start)
                heapq.heappush(lanes, start + ready[i].p)
            return out
        times, free = list(times), list(free)
        # Placing a task only lowers free units, so the first time `units` are free only moves
        # later: each search starts there, not at `now`.
        frontier: dict[int, float] = {}
        out = []
        for i in sequence:
            units, run = ready[i].units, ready[i].p
            k = bisect_left(times, frontier.get(units, times[0]))
            while free[k] < units:
                k += 1
            frontier[units] = times[k]
            while True:
                if free[k] < units:
                    k += 1
                    continue
                end = times[k] + run
                j = k
                while j + 1 < len(times) and times[j + 1] < end and free[j + 1] >= units:
                    j += 1
                if j + 1 < len(times) and times[j + 1] < end:
                    k = j + 1  # segment j + 1 is too full: start after it
                    continue
                break
            start = times[k]
            out.append(start)
            stop = bisect_left(times, start + run)
            if stop == len(times) or times[stop] != start + run:
                times.insert(stop, start + run)
                free.insert(stop, free[stop - 1])
            for segment in range(k, stop):
                free[segment] -= units
        return out

    def cost(self, indices: Sequence[int], starts: Sequence[float]) -> _Cost:
        missed = 0
        tardiness: list[float] = []
        slowdown: list[float] = []
        for i, start in zip(indices, starts, strict=True):
            task = self.ready[i]
            end = start + task.p
            if start + self.deadline_run[i] > self.due[i]:
                missed += 1
            if end > self.due[i]:
                tardiness.append(task.weight * (end - self.due[i]))
            slowdown.append(
                max(1.0, (end - self.now + self.flow_base[i]) / max(task.p, SLOWDOWN_TAU))
            )
        # Exactly rounded sums: a huge term (a task overdue for ages) then hides no change.
        return missed, math.fsum(tardiness), math.fsum(slowdown)

    def key(self, cost: _Cost) -> tuple[float, ...]:
        if self.objective == "missed":
            return (cost[0], cost[1])
        if self.objective == "weighted_tardiness":
            return (cost[1],)
        return (cost[2],)

    def pool_key(self, pool: str, sequence: Sequence[int]) -> tuple[float, ...]:
        return self.key(self.cost(sequence, self.starts(pool, sequence)))

    def evaluate(self, sequences: Mapping[str, Sequence[int]]) -> Evaluation:
        """The evaluation of per-pool sequences (and the unbounded tasks, at `now`)."""
        starts: dict[str, float] = {}
        total: _Cost = (0, 0.0, 0.0)
        for pool, sequence in sequences.items():
            pool_starts = self.starts(pool, sequence)
            total = _add(total, self.cost(sequence, pool_starts))
            starts.update((self.ready[i].id, s) for i, s in zip(sequence, pool_starts, strict=True))
        total = _add(total, self.cost(self.unbounded, [self.now] * len(self.unbounded)))
        starts.update((self.ready[i].id, self.now) for i in self.unbounded)
        count = len(self.ready)
        value = {
            "missed": float(total[0]),
            "weighted_tardiness": total[1],
            "slowdown": total[2] / count if count else 0.0,
        }[self.objective]
        ordered = {t.id: starts[t.id] for t in self.ready}
        return Evaluation(
            self.objective, value, total[0], total[1], total[2] / count if count else 0.0, ordered
        )

    def split(self, order: Sequence[str]) -> dict[str, list[int]]:
        """An order of ids as per-pool sequences of indices; it must hold each ready id once."""
        if len(order) != len(self.ready) or set(order) != set(self.index):
            raise InvalidInput("the order must list every ready task exactly once")
        sequences: dict[str, list[int]] = {pool: [] for pool in self.members}
        for task_id in order:
            i = self.index[task_id]
            pool = self.ready[i].pool
            if pool in sequences:
                sequences[pool].append(i)
        return sequences


def _check(task: ReadyTask) -> None:
    numbers = [task.p, task.weight, task.due_at, task.p90, task.release_at]
    if not all(v is None or math.isfinite(v) for v in numbers):
        raise InvalidInput(f"task {task.id}: times and weights must be finite numbers")
    if task.p < 0 or task.weight < 0 or (task.p90 is not None and task.p90 < 0):
        raise InvalidInput(f"task {task.id}: p, p90 and weight must be >= 0")
    if task.pool and task.units < 1:
        raise InvalidInput(f"task {task.id}: units must be >= 1, got {task.units}")


def _add(a: _Cost, b: _Cost) -> _Cost:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _base_profile(
    capacity: int, running: Sequence[RunningTask], now: float
) -> tuple[list[float], list[int]]:
    """Free units as steps: free[k] from times[k] on; the last step (all free) lasts forever.

    May be negative while running tasks overcommit the pool.
    """
    ends = sorted({max(now, r.ends_at) for r in running} - {now})
    times = [now, *ends]
    free = [capacity - sum(r.units for r in running if max(now, r.ends_at) > at) for at in times]
    return times, free


def _lanes(times: Sequence[float], free: Sequence[int], capacity: int) -> list[float]:
    """When each unit of the pool is first free: a heap."""
    lanes = []
    for unit in range(1, capacity + 1):
        lanes.append(next(at for at, units in zip(times, free, strict=True) if units >= unit))
    heapq.heapify(lanes)
    return lanes


def _better(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """a < b lexicographically, ignoring float noise."""
    for x, y in zip(a, b, strict=True):
        slack = _TOLERANCE * max(1.0, abs(x), abs(y))
        if x < y - slack:
            return True
        if x > y + slack:
            return False
    return False


# --- the list ------------------------------------------------------------------------------


def evaluate_order(
    order: Sequence[str],
    ready: Sequence[ReadyTask],
    running: Sequence[RunningTask],
    capacity: Mapping[str, int],
    now: float,
    objective: str,
) -> Evaluation:
    """What list-scheduling `ready` in `order` leads to, with the predicted durations."""
    problem = _Problem(ready, running, capacity, now, objective)
    return problem.evaluate(problem.split(order))


def _by_start(problem: _Problem, sequences: Mapping[str, Sequence[int]]) -> tuple[str, ...]:
    """One list: tasks by predicted start, each pool's sequence kept in its order on ties."""
    evaluation = problem.evaluate(sequences)
    position = {i: n for sequence in sequences.values() for n, i in enumerate(sequence)}
    ready = problem.ready
    ranked = sorted(
        range(len(ready)),
        key=lambda i: (evaluation.starts[ready[i].id], position.get(i, -1), i),
    )
    return tuple(ready[i].id for i in ranked)


def _heuristics(problem: _Problem) -> list[Callable[[int], tuple[float, ...]]]:
    ready = problem.ready
    inf = math.inf

    def edf(i: int) -> tuple[float, ...]:
        return (problem.due[i], i)

    def wspt(i: int) -> tuple[float, ...]:
        return (ready[i].p / ready[i].weight if ready[i].weight > 0 else inf, i)

    def slack(i: int) -> tuple[float, ...]:
        return (problem.due[i] - problem.deadline_run[i], i)

    def shortest(i: int) -> tuple[float, ...]:
        return (ready[i].p * max(ready[i].p, SLOWDOWN_TAU), i)

    return [edf, wspt, slack, shortest]


# --- CP-SAT ----------------------------------------------------------------------------------


def _cp_sat(
    problem: _Problem,
    hint: Mapping[str, Sequence[int]],
    seconds: float,
    workers: int,
) -> tuple[dict[str, list[int]], bool] | None:
    """Per-pool sequences by CP-SAT's start times, and whether it proved them optimal."""
    ready, now = problem.ready, problem.now
    indices = [i for members in problem.members.values() for i in members]
    profile_end = max((times[-1] for times, _ in problem.profiles.values()), default=now)
    span = profile_end - now + sum(ready[i].p for i in indices)
    tick = max(1e-3, span / CP_SAT_TICKS)

    def ticks(seconds_from_now: float) -> int:
        return round(seconds_from_now / tick)

    run = {i: ticks(ready[i].p) for i in indices}
    horizon = ticks(profile_end - now) + sum(run.values()) + len(indices)
    hinted_starts = problem.evaluate(hint).starts
    hinted = {i: min(horizon - run[i], ticks(hinted_starts[ready[i].id] - now)) for i in indices}
    model = cp_model.CpModel()
    start: dict[int, cp_model.IntVar] = {}
    for pool, members in problem.members.items():
        intervals = []
        demands = []
        times, free = problem.profiles[pool]
        cap = problem.bounded[pool]
        for k, at in enumerate(times[1:], start=1):
            held = max(free[k], 0) - max(free[k - 1], 0)
            if held > 0:
                # Units that running tasks hold from now until `at`.
                intervals.append(model.new_fixed_size_interval_var(0, ticks(at - now), "held"))
                demands.append(held)
        for i in members:
            start[i] = model.new_int_var(0, horizon - run[i], f"s{i}")
            intervals.append(model.new_fixed_size_interval_var(start[i], run[i], f"i{i}"))
            demands.append(ready[i].units)
            model.add_hint(start[i], hinted[i])
        model.add_cumulative(intervals, demands, cap)
        if len(members) > 1 and 2 * min(ready[i].units for i in members) > cap:
            model.add_no_overlap(intervals[-len(members) :])
    _cp_sat_objective(problem, model, start, hinted, run, ticks, horizon)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = seconds
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = SEED
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    sequences = {
        pool: sorted(members, key=lambda i: (solver.value(start[i]), members.index(i)))
        for pool, members in hint.items()
    }
    return sequences, status == cp_model.OPTIMAL


def _cp_sat_objective(
    problem: _Problem,
    model: cp_model.CpModel,
    start: Mapping[int, cp_model.IntVar],
    hinted: Mapping[int, int],
    run: Mapping[int, int],
    ticks: Callable[[float], int],
    horizon: int,
) -> None:
    """The objective in ticks; every auxiliary variable hinted (CP-SAT uses a complete hint)."""
    ready, now = problem.ready, problem.now
    terms: list[cp_model.LinearExprT] = []
    if problem.objective == "slowdown":
        scale = {i: max(1, ticks(max(ready[i].p, SLOWDOWN_TAU))) for i in start}
        big = 1000 * max(scale.values(), default=1)
        for i in start:
            waited = ticks(problem.flow_base[i])
            if run[i] + waited >= scale[i]:
                terms.append((big // scale[i]) * start[i])  # the slowdown never falls below 1
                continue
            bounded = model.new_int_var(scale[i], max(scale[i], horizon + waited), f"f{i}")
            model.add(bounded >= start[i] + run[i] + waited)
            model.add_hint(bounded, max(scale[i], hinted[i] + run[i] + waited))
            terms.append((big // scale[i]) * bounded)
        model.minimize(cp_model.LinearExpr.sum(terms))
        return
    top_weight = max((ready[i].weight for i in start), default=0.0) or 1.0
    weight = {i: round(1000 * ready[i].weight / top_weight) for i in start}
    # Deadlines beyond the horizon never bind; long past ones only shift a constant.
    due = {
        i: min(max(ticks(problem.due[i] - now), -horizon), horizon)
        for i in start
        if problem.due[i] < math.inf
    }
    for i in due:
        tardy = model.new_int_var(0, max(0, horizon - due[i]), f"t{i}")
        model.add(tardy >= start[i] + run[i] - due[i])
        model.add_hint(tardy, max(0, hinted[i] + run[i] - due[i]))
        terms.append(weight[i] * tardy)
    if problem.objective == "weighted_tardiness":
        model.minimize(cp_model.LinearExpr.sum(terms))
        return
    # missed: one miss costs more than any tardiness.
    miss_cost = 1 + sum(weight[i] * max(0, horizon - due[i]) for i in due)
    lates = []
    for i in due:
        late = model.new_bool_var(f"late{i}")
        deadline_run = ticks(problem.deadline_run[i])
        model.add(start[i] + deadline_run <= due[i]).only_enforce_if(~late)
        model.add_hint(late, hinted[i] + deadline_run > due[i])
        lates.append(late)
    model.minimize(miss_cost * cp_model.LinearExpr.sum(lates) + cp_model.LinearExpr.sum(terms))


# --- local search ----------------------------------------------------------------------------


def _local_search_pass(
    problem: _Problem, pool: str, sequence: list[int], deadline: float
) -> tuple[list[int], bool]:
    """One first-improvement pass: adjacent swaps, then insertions; stops at the deadline."""
    best = problem.pool_key(pool, sequence)
    improved = False
    for k in range(len(sequence) - 1):
        if time.perf_counter() >= deadline:
            return sequence, improved
        trial = [*sequence[:k], sequence[k + 1], sequence[k], *sequence[k + 2 :]]
        key = problem.pool_key(pool, trial)
        if _better(key, best):
            sequence, best, improved = trial, key, True
    for k in range(len(sequence)):
        # Targets next to k are the swaps above.
        for target in [*range(k - 2, -1, -1), *range(k + 2, len(sequence))]:
            if time.perf_counter() >= deadline:
                return sequence, improved
            moved = sequence[:k] + sequence[k + 1 :]
            moved.insert(target, sequence[k])
            key = problem.pool_key(pool, moved)
            if _better(key, best):
                sequence, best, improved = moved, key, True
                break
    return sequence, improved


def _local_search(problem: _Problem, sequences: dict[str, list[int]], deadline: float) -> bool:
    """Improve every pool's sequence in place, a pass per pool in turn; True if any changed."""
    changed = False
    pending = set(sequences)
    while pending and time.perf_counter() < deadline:
        for pool in sorted(pending):
            sequences[pool], improved = _local_search_pass(problem, pool, sequences[pool], deadline)
            if not improved:
                pending.discard(pool)
            changed = changed or improved
    return changed


# --- the entry point -------------------------------------------------------------------------


def improve_order(
    ready: Sequence[ReadyTask],
    running: Sequence[RunningTask],
    capacity: Mapping[str, int],
    now: float,
    objective: str,
    budget_s: float,
    *,
    cp_sat_max_tasks: int = CP_SAT_MAX_TASKS,
    workers: int = 1,
) -> Improvement:
    """A list of the ready ids (given in `ready`'s order) at least as good as that order."""
    began = time.perf_counter()
    if not (budget_s >= 0 and math.isfinite(budget_s)) or workers < 1:
        raise InvalidInput("budget_s must be a finite number >= 0 and workers >= 1")
    deadline = began + budget_s
    problem = _Problem(ready, running, capacity, now, objective)
    given = problem.split([t.id for t in ready])
    initial = problem.evaluate(given)

    # Per pool, the best of the given order and the classic ones.
    best: dict[str, list[int]] = {}
    method = "given"
    for pool, sequence in given.items():
        best[pool] = sequence
        best_key = problem.pool_key(pool, sequence)
        for rule in _heuristics(problem):
            if time.perf_counter() >= deadline:
                break
            candidate = sorted(sequence, key=rule)
            key = problem.pool_key(pool, candidate)
            if _better(key, best_key):
                best[pool], best_key, method = candidate, key, "heuristic"

    proven = False
    searched = sum(len(s) for s in best.values())
    left = deadline - time.perf_counter()
    if 1 < searched <= cp_sat_max_tasks and left >= CP_SAT_MIN_BUDGET_S:
        found = _cp_sat(problem, best, 0.8 * left, workers)
        if found is not None:
            sequences, proven = found
            for pool, sequence in sequences.items():
                if _better(problem.pool_key(pool, sequence), problem.pool_key(pool, best[pool])):
                    best[pool], method = sequence, "cp-sat"
    if not proven and _local_search(problem, best, deadline):
        method = "local-search"

    order = tuple(t.id for t in ready)
    evaluation = initial
    if method != "given":
        # By start time, which is no worse: list scheduling the starts' order of a schedule
        # never starts a task later than that schedule does.
        resorted = _by_start(problem, best)
        resorted_evaluation = problem.evaluate(problem.split(resorted))
        if not _better(initial.key, resorted_evaluation.key):
            order, evaluation = resorted, resorted_evaluation
        else:  # float noise at the tolerance: keep the given order
            method = "given"
    return Improvement(order, evaluation, initial, method, proven, time.perf_counter() - began)
