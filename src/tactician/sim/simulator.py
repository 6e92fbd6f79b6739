"""A discrete-event simulator: a workload through a scorer and the real planner, on a virtual clock.

Events (arrivals at `submit_at`, releases at `release_at`, completions) sit in a heap. After all
events of one instant are applied, the ready tasks of every pool that changed are ranked by the
scorer and handed, best first, to the same `plan_starts` the live service uses; what it starts
runs for its true `duration`. Only the simulated executor reads `duration`: the scheduler's path
(ranking and planning) sees a `ScoredTask`, which has no such field. No preemption.

Each task holds units of one pool while it runs (no resources: nothing is held); pools missing
from `capacity` are unbounded. A task waits until everything it depends on has finished.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from tactician.decide.scorers import Bounded, ScoredTask, Scorer
from tactician.errors import InvalidInput
from tactician.plan.capacity import Candidate, CapacityView, plan_starts
from tactician.sim.workload import WorkloadTask

MAX_CANDIDATES = 2000
"""Candidates handed to the planner per pool per instant, best first."""

_DONE, _ARRIVE, _RELEASE, _REPLAN = 0, 1, 2, 3
_NO_POOL = ""


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """When a task started and finished on the virtual clock (None: it never did)."""

    id: str
    start: float | None
    finish: float | None


@dataclass(frozen=True)
class SimResult:
    policy: str
    records: dict[str, TaskRecord]
    """Task id → record, in the order of the input."""
    planning_calls: int
    decide_cpu_s: float
    """Process CPU time spent ranking and planning (the scheduler's part only)."""

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


class _Run:
    """The state of one simulation."""

    def __init__(
        self,
        tasks: Sequence[WorkloadTask],
        capacity: Mapping[str, int],
        scorer: Scorer,
        max_candidates: int,
    ) -> None:
        self.tasks = tasks
        self.capacity: dict[str, int | None] = dict(capacity)
        self.scorer = scorer
        self.max_candidates = max_candidates
        order = sorted(range(len(tasks)), key=lambda i: (tasks[i].submit_at, i))
        seq = [0] * len(tasks)
        for position, i in enumerate(order):
            seq[i] = position
        self.seq = seq
        self.pools = [_pool_of(t) for t in tasks]
        self.seen = [
            ScoredTask(
                id=t.id,
                kind=t.kind,
                seq=seq[i],
                submit_at=t.submit_at,
                release_at=t.release_at,
                due_at=t.due_at,
                weight=t.weight,
                estimate=t.estimate,
                units=self.pools[i][1],
            )
            for i, t in enumerate(tasks)
        ]
        index = {t.id: i for i, t in enumerate(tasks)}
        if len(index) != len(tasks):
            raise InvalidInput("task ids must be unique")
        self.children: list[list[int]] = [[] for _ in tasks]
        self.missing = [0] * len(tasks)
        for i, t in enumerate(tasks):
            for dep in set(t.depends_on):
                if dep not in index:
                    raise InvalidInput(f"task {t.id}: depends_on names unknown task {dep!r}")
                self.children[index[dep]].append(i)
                self.missing[i] += 1
        self.released = [False] * len(tasks)
        self.start: list[float | None] = [None] * len(tasks)
        self.finish: list[float | None] = [None] * len(tasks)
        self.used: dict[str, int] = {}
        # Ready tasks per pool. Heaps of (key, seq, index) by units held: the key is the rank
        # when ranks do not move with time, the rank's floor for a Bounded scorer; otherwise a
        # set of indices, all ranked afresh at each instant.
        self.bounded = scorer if isinstance(scorer, Bounded) and scorer.time_dependent else None
        self.scan = scorer.time_dependent and self.bounded is None
        self.key = [0.0] * len(tasks)
        self.heaps: dict[str, dict[int, list[tuple[float, int, int]]]] = {}
        self.waiting: dict[str, dict[int, None]] = {}
        self.dirty: set[str] = set()
        self.events: list[tuple[float, int, int, int]] = []
        self.counter = 0
        self.cpu = 0.0
        self.calls = 0

    def push(self, at: float, what: int, i: int) -> None:
        self.counter += 1
        heapq.heappush(self.events, (at, self.counter, what, i))

    def run(self) -> SimResult:
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
        return SimResult(self.scorer.name, records, self.calls, self.cpu)

    def apply(self, what: int, i: int, now: float) -> None:
        if what == _ARRIVE:
            if self.tasks[i].release_at <= now:
                self.release(i, now)
            else:
                self.push(self.tasks[i].release_at, _RELEASE, i)
        elif what == _RELEASE:
            self.release(i, now)
        elif what == _DONE:
            self.finish[i] = now
            pool, units = self.pools[i]
            self.used[pool] -= units
            self.dirty.add(pool)
            for child in self.children[i]:
                self.missing[child] -= 1
                if self.missing[child] == 0 and self.released[child]:
                    self.ready(child, now)
        # _REPLAN only marks the instant: the pools are already dirty.

    def release(self, i: int, now: float) -> None:
        self.released[i] = True
        if self.missing[i] == 0:
            self.ready(i, now)

    def ready(self, i: int, now: float) -> None:
        pool = self.pools[i][0]
        self.dirty.add(pool)
        if self.scan:
            self.waiting.setdefault(pool, {})[i] = None
            return
        began = time.process_time()
        if self.bounded is not None:
            key = self.bounded.floor(self.seen[i])
        else:
            key = self.scorer.rank(self.seen[i], now)
        self.cpu += time.process_time() - began
        self.key[i] = key
        by_units = self.heaps.setdefault(pool, {})
        heapq.heappush(by_units.setdefault(self.pools[i][1], []), (key, self.seq[i], i))

    def plan(self, now: float) -> None:
        began = time.process_time()
        view = CapacityView(pool_capacity=self.capacity, pool_used=dict(self.used))
        taken: list[int] = []
        capped: set[str] = set()
        sources = [
            self.candidates(pool, now, view, taken, capped)
            for pool in sorted(self.dirty)
            if self.has_room(pool) and self.has_waiting(pool)
        ]
        self.dirty.clear()
        if not sources:
            self.cpu += time.process_time() - began
            return
        merged = heapq.merge(*sources, key=lambda c: c.rank)
        plan = plan_starts(merged, view, now, len(self.tasks))
        self.cpu += time.process_time() - began
        self.calls += 1
        started = {int(c.id) for c in plan.starts}
        for i in taken:
            pool, units = self.pools[i]
            if self.scan:
                if i in started:
                    del self.waiting[pool][i]
            elif i not in started:
                heapq.heappush(self.heaps[pool][units], (self.key[i], self.seq[i], i))
        for c in plan.starts:
            i = int(c.id)
            self.used[c.pool] = self.used.get(c.pool, 0) + c.units
            cap = self.capacity.get(c.pool)
            assert cap is None or self.used[c.pool] <= cap, f"pool {c.pool} over capacity"
            self.start[i] = now
            self.push(now + self.tasks[i].duration, _DONE, i)
        for pool in capped:
            if any(self.pools[int(c.id)][0] == pool for c in plan.starts):
                self.dirty.add(pool)
                self.push(now, _REPLAN, -1)

    def has_room(self, pool: str) -> bool:
        cap = self.capacity.get(pool)
        return cap is None or self.used.get(pool, 0) < cap

    def has_waiting(self, pool: str) -> bool:
        if self.scan:
            return bool(self.waiting.get(pool))
        return any(self.heaps.get(pool, {}).values())

    def lane(
        self,
        heap: list[tuple[float, int, int]],
        units: int,
        pool: str,
        now: float,
        view: CapacityView,
        taken: list[int],
    ) -> Iterator[tuple[float, int, int]]:
        """Tasks holding `units`, best rank first, while that many units are free.

        For a Bounded scorer only tasks whose floor could beat the best rank found are ranked.
        """
        cap = self.capacity.get(pool)
        exact: list[tuple[float, int, int]] = []
        while cap is None or view.pool_used.get(pool, 0) + units <= cap:
            if self.bounded is None:
                if not heap:
                    return
                entry = heapq.heappop(heap)
                taken.append(entry[2])
                yield entry
                continue
            while heap and (not exact or heap[0][:2] < exact[0][:2]):
                _, seq, i = heapq.heappop(heap)
                taken.append(i)
                heapq.heappush(exact, (self.bounded.rank(self.seen[i], now), seq, i))
            if not exact:
                return
            yield heapq.heappop(exact)

    def candidates(
        self,
        pool: str,
        now: float,
        view: CapacityView,
        taken: list[int],
        capped: set[str],
    ) -> Iterator[Candidate]:
        """The pool's ready tasks best first, while they may fit, up to the cap.

        Tasks that cannot fit the units left are not offered (the planner would skip them):
        this only saves work, it does not change what starts.
        """
        cap = self.capacity.get(pool)
        if self.scan:
            ranked = [
                (self.scorer.rank(self.seen[i], now), self.seq[i], i) for i in self.waiting[pool]
            ]
            if cap is not None:
                free = cap - self.used.get(pool, 0)
                ranked = [e for e in ranked if self.pools[e[2]][1] <= free]
            best = (
                heapq.nsmallest(self.max_candidates, ranked)
                if len(ranked) > self.max_candidates
                else sorted(ranked)
            )
            entries: Iterator[tuple[float, int, int]] = iter(best)
        else:
            room = None if cap is None else cap - self.used.get(pool, 0)
            entries = heapq.merge(
                *(
                    self.lane(heap, units, pool, now, view, taken)
                    for units, heap in sorted(self.heaps[pool].items())
                    if heap and (room is None or units <= room)
                )
            )
        count = 0
        for entry in entries:
            i = entry[2]
            units = self.pools[i][1]
            if self.scan:
                taken.append(i)
            if cap is not None and view.pool_used.get(pool, 0) + units > cap:
                continue
            if count >= self.max_candidates:
                capped.add(pool)
                return
            count += 1
            task = self.seen[i]
            yield Candidate(str(i), task.kind, pool, units, None, f"sim:{task.kind}", entry[0])


def simulate(
    tasks: Sequence[WorkloadTask],
    capacity: Mapping[str, int],
    scorer: Scorer,
    *,
    max_candidates: int = MAX_CANDIDATES,
) -> SimResult:
    """Run the tasks to completion with `scorer` choosing the order; one record per task."""
    return _Run(tasks, capacity, scorer, max_candidates).run()
