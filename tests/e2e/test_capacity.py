"""Capacity across processes: a pool is never over-committed, and a rate limit holds.

Both are checked twice, independently of the code under test: from the database (a sampler on a
connection of its own) and from what the handlers did (intervals and start times they record).
"""

from __future__ import annotations

import bisect
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tactician.domain import NewTask

from .crash_app import TRUCKS, build
from .procs import Cluster, connect, query, read_effects, wait_for_progress


def submit(url: str, tasks: list[NewTask]) -> None:
    app = build(url)
    try:
        app.submit_many(tasks)
    finally:
        app.close()


def succeeded(url: str) -> int:
    with connect(url) as conn:
        ((n,),) = query(conn, "SELECT count(*) FROM tasks WHERE state = 'succeeded'")
    return int(n)


def states(url: str) -> dict[str, int]:
    with connect(url) as conn:
        return dict(query(conn, "SELECT state, count(*) FROM tasks GROUP BY state"))


# --- a pool of 3 trucks -----------------------------------------------------------------------


class Sampler(threading.Thread):
    """Reads the units held in pool trucks (granted or running) over and over, on a database
    connection of its own, until stopped."""

    SQL = (
        "SELECT coalesce(sum(units), 0) FROM tasks "
        "WHERE pool = 'trucks' AND state IN ('leased', 'running')"
    )

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[int] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with connect(self.url) as conn:
                while not self._halt.is_set():
                    ((units,),) = query(conn, self.SQL)
                    self.samples.append(int(units))
                    time.sleep(0.001)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> list[int]:
        self._halt.set()
        self.join(10)
        assert not self.is_alive(), "the sampler did not stop"
        if self.error is not None:
            raise self.error
        return self.samples


def max_overlap(intervals: list[tuple[float, float, int]]) -> tuple[int, float]:
    """The most units held at once by intervals (start, end, units), and for how long (s) that
    peak held in all. At equal times an end comes before a start: a handler that begins as
    another ends does not overlap it."""
    events = sorted([(s, 1, u) for s, _, u in intervals] + [(e, 0, -u) for _, e, u in intervals])
    held = peak = 0
    at_peak = 0.0
    for i, (when, _, delta) in enumerate(events):
        held += delta
        if held > peak:
            peak, at_peak = held, 0.0
        if held == peak and i + 1 < len(events):
            at_peak += events[i + 1][0] - when
    return peak, at_peak


@dataclass
class CapacityFigures:
    db: str
    tasks: int
    seconds: float
    samples: int
    sampled_max: int
    sampled_at_capacity: float
    """Share of samples that saw the pool full."""
    overlap_max: int
    overlap_at_max: float
    """Seconds the handlers held `overlap_max` units at once, in all."""
    runs: int
    units_mismatch: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.db.split(':')[0]}: {self.tasks} tasks in {self.seconds:.1f}s over a pool of "
            f"{TRUCKS}; sampled max {self.sampled_max} in {self.samples} samples "
            f"({self.sampled_at_capacity:.0%} at {TRUCKS}); handlers' max overlap "
            f"{self.overlap_max} (held {self.overlap_at_max:.2f}s); {self.runs} runs"
        )


def run_capacity_scenario(
    url: str, workdir: Path, *, tasks: int = 1000, workers: int = 3, concurrency: int = 3
) -> CapacityFigures:
    rng = random.Random()
    units = {f"h{i}": rng.choice((1, 2)) for i in range(tasks)}
    submit(
        url,
        [
            NewTask(
                "haul",
                {"key": k, "units": n, "seconds": rng.uniform(0.005, 0.03)},
                idempotency_key=k,
                resources={"trucks": n},
            )
            for k, n in units.items()
        ],
    )
    sampler = Sampler(url)
    with Cluster(url, workdir) as cluster:
        sampler.start()
        began = time.monotonic()
        cluster.planner().start()
        for i in range(workers):
            cluster.worker(f"worker-{i}", concurrency=concurrency).start()
        try:
            wait_for_progress(lambda: succeeded(url), tasks, lambda: f"{states(url)}")
        finally:
            samples = sampler.stop()
        seconds = time.monotonic() - began
    assert states(url) == {"succeeded": tasks}, states(url)
    runs = [f for f in read_effects(cluster.effects) if f[0] == "haul"]
    assert {f[1] for f in runs} == set(units), "some haul tasks never ran"
    with connect(url) as conn:
        stored = dict(query(conn, "SELECT idempotency_key, units FROM tasks"))
    overlap, at_max = max_overlap([(float(f[3]), float(f[4]), int(f[2])) for f in runs])
    figures = CapacityFigures(
        db=url,
        tasks=tasks,
        seconds=seconds,
        samples=len(samples),
        sampled_max=max(samples),
        sampled_at_capacity=samples.count(TRUCKS) / len(samples),
        overlap_max=overlap,
        overlap_at_max=at_max,
        runs=len(runs),
        units_mismatch=[f[1] for f in runs if not stored[f[1]] == int(f[2]) == units[f[1]]],
    )
    print(f"\n[capacity] {figures.summary()}")
    return figures


@pytest.mark.slow
def test_pool_is_never_over_committed(db_url: str, tmp_path: Path) -> None:
    f = run_capacity_scenario(db_url, tmp_path)
    assert not f.units_mismatch, f"tasks ran with other units than submitted: {f.units_mismatch}"
    assert f.samples >= 1000, f.summary()
    assert f.sampled_max <= TRUCKS, f.summary()
    assert f.overlap_max <= TRUCKS, f.summary()
    # Not vacuous: the pool did fill up, as seen from both sides.
    assert f.sampled_max == TRUCKS, f.summary()
    assert f.overlap_max == TRUCKS, f.summary()


def test_max_overlap_counts_units_and_touching_intervals() -> None:
    assert max_overlap([(0, 2, 1), (1, 3, 2), (2, 4, 1)]) == (3, 2.0)
    assert max_overlap([(0, 1, 2), (1, 2, 2)]) == (2, 2.0)  # touching: never 4
    assert max_overlap([(0, 10, 1), (1, 2, 1), (1.5, 3, 2)])[0] == 4


# --- a rate limit of 10/s -------------------------------------------------------------------------

RATE = 10.0
WINDOW = 10.0


@dataclass
class RateFigures:
    db: str
    tasks: int
    seconds: float
    starts: list[float]
    """Handler start times (wall clock), sorted."""
    attempt_starts: list[float]
    """attempts.started_at as the store recorded them, sorted."""

    def busiest_window(self, times: list[float] | None = None) -> int:
        """Most starts in any WINDOW seconds (a busiest window begins at some start)."""
        times = self.starts if times is None else times
        return max(bisect.bisect_left(times, t + WINDOW) - i for i, t in enumerate(times))

    def quietest_full_window(self) -> int:
        """Fewest starts in a WINDOW that lies wholly inside the run."""
        t = self.starts
        return min(
            bisect.bisect_left(t, s + WINDOW) - i for i, s in enumerate(t) if s + WINDOW <= t[-1]
        )

    @property
    def rate(self) -> float:
        return (len(self.starts) - 1) / (self.starts[-1] - self.starts[0])

    def summary(self) -> str:
        return (
            f"{self.db.split(':')[0]}: {self.tasks} tasks in {self.seconds:.1f}s; starts per "
            f"{WINDOW:g}s window: max {self.busiest_window()} (attempts table: "
            f"{self.busiest_window(self.attempt_starts)}), min over full windows "
            f"{self.quietest_full_window()}; overall {self.rate:.2f}/s"
        )


def run_rate_scenario(
    url: str, workdir: Path, *, tasks: int = 150, workers: int = 3
) -> RateFigures:
    submit(url, [NewTask("tick", {"key": f"t{i}"}, idempotency_key=f"t{i}") for i in range(tasks)])
    with Cluster(url, workdir) as cluster:
        began = time.monotonic()
        cluster.planner().start()
        for i in range(workers):
            cluster.worker(f"worker-{i}").start()
        wait_for_progress(lambda: succeeded(url), tasks, lambda: f"{states(url)}", stall=30.0)
        seconds = time.monotonic() - began
    assert states(url) == {"succeeded": tasks}, states(url)
    ticks = [f for f in read_effects(cluster.effects) if f[0] == "tick"]
    assert sorted(f[1] for f in ticks) == sorted(f"t{i}" for i in range(tasks)), "runs != tasks"
    with connect(url) as conn:
        started = [float(r[0]) for r in query(conn, "SELECT started_at FROM attempts")]
    figures = RateFigures(
        db=url,
        tasks=tasks,
        seconds=seconds,
        starts=sorted(float(f[3]) for f in ticks),
        attempt_starts=sorted(started),
    )
    print(f"\n[rate] {figures.summary()}")
    return figures


@pytest.mark.slow
def test_rate_limit_holds_across_workers(db_url: str, tmp_path: Path) -> None:
    f = run_rate_scenario(db_url, tmp_path)
    most = RATE * WINDOW * 1.1
    assert f.busiest_window() <= most, f.summary()
    assert f.busiest_window(f.attempt_starts) <= most, f.summary()
    assert f.rate <= RATE * 1.1, f.summary()


@pytest.mark.slow
def test_rate_limit_delivers_its_rate(sqlite_url: str, tmp_path: Path) -> None:
    f = run_rate_scenario(sqlite_url, tmp_path)
    assert f.quietest_full_window() >= RATE * WINDOW * 0.9, f.summary()
    assert f.rate >= RATE * 0.9, f.summary()


def test_busiest_and_quietest_windows() -> None:
    f = RateFigures("sqlite:///x", 4, 0.0, [0.0, 9.9, 10.0, 25.0], [])
    assert f.busiest_window() == 2  # [0, 10) holds 0.0 and 9.9; 10.0 starts the next one
    assert f.quietest_full_window() == 1  # [10, 20) holds only 10.0
    assert f.rate == pytest.approx(3 / 25)
