"""A discrete-event simulator: a workload through a scorer and the real planner, on a virtual clock.

Events (arrivals at `submit_at`, releases at `release_at`, completions) sit in a heap. After all
events of one instant are applied, the ready tasks of every pool that changed are ranked by the
scorer and handed, best first, to the same `plan_starts` the live service uses; what it starts
runs for its true `duration`. Only the simulated executor reads `duration`: the scheduler's path
(the backlog, ranking, planning) sees a `ScoredTask`, which has no such field. A scorer that
learns is told a task's duration when it finishes, as a live system records an outcome. No
preemption.

Each task holds units of one pool while it runs; pools missing from `capacity` are unbounded. A
task waits until everything it depends on has finished. With `failure_rate`, an attempt fails
(after a random part of its run) with that probability and the task is ready again after
`retry_delay`; the seeded draw is the same for every policy.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tactician.decide.features import Backlog, ScoredTask
from tactician.decide.scorers import Learner, PoolView, RankRequest, Scorer, expected_runs
from tactician.errors import InvalidInput
from tactician.plan.capacity import HOLD_BELOW, Candidate, CapacityView, plan_starts
from tactician.sim.workload import WorkloadTask

MAX_CANDIDATES = 2000
"""Candidates handed to the planner per pool per instant, best first."""

_SHIFT, _DONE, _ARRIVE, _RELEASE, _REPLAN, _FAIL, _RETRY = -1, 0, 1, 2, 3, 4, 5
Calendar = Mapping[str, Sequence[tuple[float, int]]]
"""Per pool: (from this time, capacity) change points, e.g. on-call shifts."""
_NO_POOL = ""


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """When a task started and finished on the virtual clock (None: it never did)."""

    id: str
    start: float | None
    finish: float | None


@dataclass(frozen=True)
class SimOptions:
    max_candidates: int = MAX_CANDIDATES
    reserve: bool = False
    """EASY backfilling: the first task of a pool that does not fit gets a reservation at the
    time the scorer's expected durations free enough units, and later tasks may start only if
    they do not delay it."""
    failure_rate: float = 0.0
    retry_delay: float = 30.0
    seed: int = 0


@dataclass(frozen=True)
class SimResult:
    policy: str
    records: dict[str, TaskRecord]
    """Task id → record, in the order of the input."""
    planning_calls: int
    decide_cpu_s: float
    """Process CPU time spent ranking and planning (the scheduler's part only)."""
    attempts: int = 0
    escalations: int = 0

    @property
    def decide_cpu_us(self) -> float:
        """Scheduler CPU time per planning call, in microseconds."""
        return 1e6 * self.decide_cpu_s / self.planning_calls if self.planning_calls else 0.0


def _pool_of(task: WorkloadTask) -> tuple[str, int]:
    if len(task.resources) > 1:
        raise InvalidInput(
            f"task {task.id}: holds {len(task.resources)} pools; the simulator supports one"
        )
    for pool, units in task.resources.items():
        if pool == _NO_POOL:
            raise InvalidInput(f"task {task.id}: a pool needs a name")
        return pool, units
    return _NO_POOL, 0


def scored(task: WorkloadTask, seq: int) -> ScoredTask:
    """What the scheduler may know of a workload task (everything but `duration`)."""
    pool, units = _pool_of(task)
    return ScoredTask(
        id=task.id,
        kind=task.kind,
        seq=seq,
        submit_at=task.submit_at,
        release_at=task.release_at,
        due_at=task.due_at,
        weight=task.weight,
        estimate=task.estimate,
        units=units,
        pool=pool,
        features=task.features,
    )


class _Waiting:
    """The ready rows of one pool as a numpy array (swap-remove), for vectorised ranking."""

    def __init__(self) -> None:
        self.rows = np.empty(64, dtype=np.int64)
        self.size = 0
        self.at: dict[int, int] = {}

    def add(self, row: int) -> None:
        if self.size == len(self.rows):
            self.rows = np.concatenate([self.rows, np.empty(self.size, dtype=np.int64)])
        self.rows[self.size] = row
        self.at[row] = self.size
        self.size += 1

    def remove(self, row: int) -> None:
        index = self.at.pop(row)
        self.size -= 1
        last = int(self.rows[self.size])
        if index != self.size:
            self.rows[index] = last
            self.at[last] = index

    def view(self) -> np.ndarray:
        return self.rows[: self.size]


class _RunningEnds(Mapping[str, Iterator[tuple[float, int]]]):
    """Per pool, (expected end, units) of its running tasks, earliest first, produced lazily
    from a heap: a reservation reads only as far as it needs."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def __getitem__(self, pool: str) -> Iterator[tuple[float, int]]:
        if pool not in self.run.end_heaps:
            raise KeyError(pool)
        return self._ends(pool)

    def _ends(self, pool: str) -> Iterator[tuple[float, int]]:
        heap = list(self.run.end_heaps[pool])
        running = self.run.running.get(pool, {})
        while heap:
            end, units, i = heapq.heappop(heap)
            if i in running and self.run.expected_end[i] == end:
                yield end, units

    def __iter__(self) -> Iterator[str]:
        return iter(self.run.end_heaps)

    def __len__(self) -> int:
        return len(self.run.end_heaps)


class _Run:
    """The state of one simulation."""

    def __init__(
        self,
        tasks: Sequence[WorkloadTask],
        capacity: Mapping[str, int],
        scorer: Scorer,
        options: SimOptions,
    ) -> None:
        self.tasks = tasks
        self.capacity: dict[str, int | None] = dict(capacity)
        self.scorer = scorer
        self.options = options
        self.learner = scorer if isinstance(scorer, Learner) else None
        order = sorted(range(len(tasks)), key=lambda i: (tasks[i].submit_at, i))
        self.seq = [0] * len(tasks)
        for position, i in enumerate(order):
            self.seq[i] = position
        self.pools = [_pool_of(t) for t in tasks]
        index = {t.id: i for i, t in enumerate(tasks)}
        if len(index) != len(tasks):
            raise InvalidInput("task ids must be unique")
        self.children: list[list[int]] = [[] for _ in tasks]
        self.parents: list[list[int]] = [[] for _ in tasks]
        self.missing = [0] * len(tasks)
        for i, t in enumerate(tasks):
            for dep in set(t.depends_on):
                if dep not in index:
                    raise InvalidInput(f"task {t.id}: depends_on names unknown task {dep!r}")
                self.children[index[dep]].append(i)
                self.parents[i].append(index[dep])
                self.missing[i] += 1
        self.backlog = Backlog()
        history = getattr(scorer, "history", None)
        self.history = history
        self.row = [-1] * len(tasks)
        self.index_of: list[int] = []
        self.released = [False] * len(tasks)
        self.start: list[float | None] = [None] * len(tasks)
        self.finish: list[float | None] = [None] * len(tasks)
        self.expected_end = [0.0] * len(tasks)
        self.used: dict[str, int] = {}
        self.end_sum: dict[str, float] = {}
        """Per pool: Σ units x expected end of the tasks running in it."""
        self.running: dict[str, dict[int, None]] = {}
        self.end_heaps: dict[str, list[tuple[float, int, int]]] = {}
        """Per pool, (expected end, units, task) of started tasks (stale entries are skipped
        and pruned), kept only with reservations."""
        # Ready tasks per pool: heaps of (rank, seq, i) per units held when ranks do not move
        # with time; otherwise the ready rows, ranked afresh at each instant.
        self.scan = scorer.time_dependent or options.reserve
        self.rank_of = [0.0] * len(tasks)
        self.heaps: dict[str, dict[int, list[tuple[float, int, int]]]] = {}
        self.waiting: dict[str, _Waiting] = {}
        self.dirty: set[str] = set()
        self.events: list[tuple[float, int, int, int]] = []
        self.counter = 0
        self.cpu = 0.0
        self.calls = 0
        self.attempts = 0
        self.random = random.Random(options.seed)
        self.fails: Callable[[], bool] = (
            (lambda: self.random.random() < options.failure_rate)
            if options.failure_rate > 0
            else (lambda: False)
        )

    def push(self, at: float, what: int, i: int) -> None:
        self.counter += 1
        heapq.heappush(self.events, (at, self.counter, what, i))

    def run(self, calendar: Calendar) -> SimResult:
        self.shifts: list[tuple[str, int]] = []
        for pool, changes in calendar.items():
            for at, cap in changes:
                self.shifts.append((pool, cap))
                self.push(at, _SHIFT, len(self.shifts) - 1)
        for i, t in enumerate(self.tasks):
            self.push(t.submit_at, _ARRIVE, i)
        while self.events:
            now = self.events[0][0]
            while self.events and self.events[0][0] == now:
                _, _, what, i = heapq.heappop(self.events)
                self.apply(what, i, now)
            if self.dirty:
                self.plan(now)
        records = {
            t.id: TaskRecord(t.id, self.start[i], self.finish[i]) for i, t in enumerate(self.tasks)
        }
        return SimResult(self.scorer.name, records, self.calls, self.cpu, self.attempts)

    def apply(self, what: int, i: int, now: float) -> None:
        if what == _SHIFT:
            pool, cap = self.shifts[i]
            self.capacity[pool] = cap
            self.dirty.add(pool)
        elif what == _ARRIVE:
            began = time.process_time()
            self.row[i] = self.backlog.add(scored(self.tasks[i], self.seq[i]), self.history)
            self.index_of.append(i)
            for parent in self.parents[i]:
                if self.row[parent] >= 0 and self.finish[parent] is None:
                    self.backlog.dependents[self.row[parent]] += self.tasks[i].weight
            self.cpu += time.process_time() - began
            if self.tasks[i].release_at <= now:
                self.release(i, now)
            else:
                self.push(self.tasks[i].release_at, _RELEASE, i)
        elif what == _RELEASE:
            self.release(i, now)
        elif what in (_DONE, _FAIL):
            self.stopped(i, now)
            if what == _FAIL:
                self.push(now + self.options.retry_delay, _RETRY, i)
                return
            self.finish[i] = now
            if self.learner is not None:
                began = time.process_time()
                self.learner.observe(
                    self.backlog,
                    self.row[i],
                    self.tasks[i].duration,
                    failed=False,
                    started_at=self.start[i] or now,
                    finished_at=now,
                )
                self.cpu += time.process_time() - began
            for child in self.children[i]:
                self.missing[child] -= 1
                if self.missing[child] == 0 and self.released[child]:
                    self.ready(child, now)
        elif what == _RETRY:
            self.ready(i, now)
        # _REPLAN only marks the instant: the pools are already dirty.

    def stopped(self, i: int, now: float) -> None:
        pool, units = self.pools[i]
        self.used[pool] -= units
        self.end_sum[pool] -= units * self.expected_end[i]
        del self.running[pool][i]
        self.dirty.add(pool)

    def release(self, i: int, now: float) -> None:
        self.released[i] = True
        if self.missing[i] == 0:
            self.ready(i, now)

    def ready(self, i: int, now: float) -> None:
        pool = self.pools[i][0]
        self.dirty.add(pool)
        if self.scan:
            self.waiting.setdefault(pool, _Waiting()).add(self.row[i])
            return
        began = time.process_time()
        request = RankRequest(self.backlog, np.array([self.row[i]], dtype=np.int64), now)
        rank = float(self.scorer.rank(request)[0])
        self.cpu += time.process_time() - began
        self.rank_of[i] = rank
        by_units = self.heaps.setdefault(pool, {})
        heapq.heappush(by_units.setdefault(self.pools[i][1], []), (rank, self.seq[i], i))

    def views(self, now: float) -> dict[int, PoolView]:
        code = self.backlog.vocabulary.code
        return {
            code("pool", pool): PoolView(
                capacity=cap,
                busy_units=self.used.get(pool, 0),
                busy_work=max(0.0, self.end_sum.get(pool, 0.0) - now * self.used.get(pool, 0)),
            )
            for pool, cap in self.capacity.items()
        }

    def plan(self, now: float) -> None:
        began = time.process_time()
        view = CapacityView(pool_capacity=self.capacity, pool_used=dict(self.used))
        if self.options.reserve:
            view.reserve = True
            view.running_ends = _RunningEnds(self)
        taken: list[int] = []
        capped: set[str] = set()
        pools = self.views(now) if self.scan else {}
        sources = [
            self.candidates(pool, now, view, taken, capped, pools)
            for pool in sorted(self.dirty)
            if self.has_room(pool) and self.has_waiting(pool)
        ]
        self.dirty.clear()
        if not sources:
            self.cpu += time.process_time() - began
            return
        merged = heapq.merge(*sources, key=lambda c: c.rank)
        plan = plan_starts(merged, view, now, len(self.tasks))
        self.calls += 1
        started = {int(c.id) for c in plan.starts}
        expected = {}
        if plan.starts:
            rows = np.array([self.row[int(c.id)] for c in plan.starts], dtype=np.int64)
            guess = expected_runs(self.backlog, rows)
            expected = {int(c.id): float(g) for c, g in zip(plan.starts, guess, strict=True)}
        for i in taken:
            if self.scan:
                if i in started:
                    self.waiting[self.pools[i][0]].remove(self.row[i])
            elif i not in started:
                pool, units = self.pools[i]
                heapq.heappush(self.heaps[pool][units], (self.rank_of[i], self.seq[i], i))
        self.cpu += time.process_time() - began
        for c in plan.starts:
            i = int(c.id)
            self.used[c.pool] = self.used.get(c.pool, 0) + c.units
            cap = self.capacity.get(c.pool)
            assert cap is None or self.used[c.pool] <= cap, f"pool {c.pool} over capacity"
            if self.start[i] is None:
                self.start[i] = now
            self.attempts += 1
            self.expected_end[i] = now + expected[i]
            self.end_sum[c.pool] = self.end_sum.get(c.pool, 0.0) + c.units * self.expected_end[i]
            self.running.setdefault(c.pool, {})[i] = None
            if self.options.reserve:
                self._push_end(c.pool, i, c.units)
            duration = self.tasks[i].duration
            if self.fails():
                self.push(now + duration * self.random.random(), _FAIL, i)
            else:
                self.push(now + duration, _DONE, i)
        for pool in capped:
            if any(self.pools[int(c.id)][0] == pool for c in plan.starts):
                self.dirty.add(pool)
                self.push(now, _REPLAN, -1)

    def _fitting(
        self, rows: np.ndarray, ranks: np.ndarray, seqs: np.ndarray, free: int, limit: int
    ) -> np.ndarray:
        """Positions worth offering, best first: greedy first fit starts at most free // u
        tasks of u units, and those are the best of their size."""
        units = self.backlog.units[rows]
        sizes = [units[0]] if len(units) and units.min() == units.max() else np.unique(units)
        lanes = [
            _best(np.flatnonzero(units == u), ranks, seqs, min(limit, free // int(u)))
            for u in sizes
            if u <= free
        ]
        if not lanes:
            return np.empty(0, dtype=np.int64)
        chosen = np.concatenate(lanes)
        return chosen[np.lexsort((seqs[chosen], ranks[chosen]))]

    def _may_start(self, order: np.ndarray, rows: np.ndarray, free: int) -> np.ndarray:
        """With reservations: the ordered positions that fit the free units, then the first
        that does not once those before it have started (the head, which gets the
        reservation), then only those that fit what the head leaves."""
        units = self.backlog.units[rows[order]]
        before = np.cumsum(units)
        over = np.flatnonzero(before > free)
        if len(over) == 0:
            return order
        head = int(over[0])
        left = free - (before[head] - units[head])
        tail = order[head + 1 :][units[head + 1 :] <= left]
        return np.concatenate([order[: head + 1], tail[: max(0, int(left))]])

    def _push_end(self, pool: str, i: int, units: int) -> None:
        heap = self.end_heaps.setdefault(pool, [])
        if len(heap) > 2 * len(self.running[pool]) + 64:  # mostly finished: prune
            running = self.running[pool]
            heap[:] = [e for e in heap if e[2] in running and self.expected_end[e[2]] == e[0]]
            heapq.heapify(heap)
        heapq.heappush(heap, (self.expected_end[i], units, i))

    def has_room(self, pool: str) -> bool:
        cap = self.capacity.get(pool)
        return cap is None or self.used.get(pool, 0) < cap

    def has_waiting(self, pool: str) -> bool:
        if self.scan:
            waiting = self.waiting.get(pool)
            return waiting is not None and waiting.size > 0
        return any(self.heaps.get(pool, {}).values())

    def lane(
        self,
        heap: list[tuple[float, int, int]],
        units: int,
        pool: str,
        view: CapacityView,
        taken: list[int],
    ) -> Iterator[tuple[float, int, int]]:
        """Tasks holding `units`, best rank first, while that many units are free."""
        cap = self.capacity.get(pool)
        while heap and (cap is None or view.pool_used.get(pool, 0) + units <= cap):
            entry = heapq.heappop(heap)
            taken.append(entry[2])
            yield entry

    def candidates(
        self,
        pool: str,
        now: float,
        view: CapacityView,
        taken: list[int],
        capped: set[str],
        pools: Mapping[int, PoolView],
    ) -> Iterator[Candidate]:
        """The pool's ready tasks best first, while they may fit, up to the cap.

        Without reservations, tasks that cannot fit the units left are not offered (the planner
        would skip them): this only saves work, it does not change what starts.
        """
        cap = self.capacity.get(pool)
        reserve = self.options.reserve
        expected: dict[int, float] = {}
        """Task index -> expected run time, for reservations."""
        entries: Iterator[tuple[float, int, int]]
        if self.scan:
            rows = self.waiting[pool].view()
            ranks = self.scorer.rank(RankRequest(self.backlog, rows, now, pools))
            seqs = self.backlog.seq[rows]
            limit = self.options.max_candidates
            held = (
                None
                if cap is None
                else _held(rows, ranks, seqs, self.backlog.units, cap - self.used.get(pool, 0))
            )
            if held is not None:  # offered up to the task that holds the pool, no further
                order = held
            elif cap is not None and not reserve:
                order = self._fitting(rows, ranks, seqs, cap - self.used.get(pool, 0), limit)
            else:
                order = _best(np.arange(len(rows)), ranks, seqs, limit)
                if cap is not None:
                    order = self._may_start(order, rows, cap - self.used.get(pool, 0))
            if len(order) >= limit and len(rows) > len(order):
                capped.add(pool)  # more may fit than were offered: plan again at this instant
            if reserve:
                for k, value in zip(
                    order.tolist(), expected_runs(self.backlog, rows[order]).tolist(), strict=True
                ):
                    expected[self.index_of[int(rows[k])]] = value
            entries = ((float(ranks[k]), int(seqs[k]), self.index_of[int(rows[k])]) for k in order)
        else:
            room = None if cap is None else cap - self.used.get(pool, 0)
            entries = heapq.merge(
                *(
                    self.lane(heap, units, pool, view, taken)
                    for units, heap in sorted(self.heaps[pool].items())
                    if heap and (room is None or units <= room)
                )
            )
        count = 0
        for rank, _, i in entries:
            units = self.pools[i][1]
            if self.scan:
                taken.append(i)
            if not reserve and cap is not None and view.pool_used.get(pool, 0) + units > cap:
                continue
            if count >= self.options.max_candidates:
                capped.add(pool)
                return
            count += 1
            task = self.tasks[i]
            yield Candidate(
                str(i), task.kind, pool, units, None, f"sim:{task.kind}", rank, expected.get(i)
            )


def _held(
    rows: np.ndarray, ranks: np.ndarray, seqs: np.ndarray, units: np.ndarray, free: int
) -> np.ndarray | None:
    """With a task ranked below HOLD_BELOW (aged) that does not fit the free units: the
    positions up to it in rank order, it last (the planner starts what fits before it and
    holds the pool for it); None without one."""
    urgent = np.flatnonzero(ranks < HOLD_BELOW)
    if not len(urgent):
        return None
    urgent = urgent[np.lexsort((seqs[urgent], ranks[urgent]))]
    wide = urgent[units[rows[urgent]] > free]
    if not len(wide):
        return None
    return urgent[: int(np.flatnonzero(urgent == wide[0])[0]) + 1]


def _best(positions: np.ndarray, ranks: np.ndarray, seqs: np.ndarray, k: int) -> np.ndarray:
    """The k positions with the lowest (rank, seq), best first; in O(n) when k is small."""
    if k <= 0 or len(positions) == 0:
        return positions[:0]
    if len(positions) > k:
        values = ranks[positions]
        kth = np.partition(values, k - 1)[k - 1]
        below = positions[values < kth]
        tied = positions[values == kth]
        tied = tied[np.argsort(seqs[tied], kind="stable")][: k - len(below)]
        positions = np.concatenate([below, tied])
    return positions[np.lexsort((seqs[positions], ranks[positions]))]


def simulate(
    tasks: Sequence[WorkloadTask],
    capacity: Mapping[str, int],
    scorer: Scorer,
    options: SimOptions | None = None,
    *,
    calendar: Calendar | None = None,
    backlog: Backlog | None = None,
) -> SimResult:
    """Run the tasks to completion with `scorer` choosing the order; one record per task.

    `calendar`: capacity changes over time (shifts); `backlog`: rows to continue from (a
    learner's history); a new one by default."""
    options = options or SimOptions()
    if not 0.0 <= options.failure_rate < 1.0 or math.isnan(options.failure_rate):
        raise InvalidInput(f"failure rate must be in [0, 1), got {options.failure_rate}")
    run = _Run(tasks, capacity, scorer, options)
    if backlog is not None:
        run.backlog = backlog
        run.index_of = [-1] * len(backlog)
    return run.run(calendar or {})
