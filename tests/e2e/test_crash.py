"""Kill -9 workers and the planner mid-run: nothing is lost, re-executions stay bounded, and a
worker that comes back from a pause has its late result refused (fencing).

Each guarantee is also run once with its protection switched off, to show that the check can
see the fault it guards against.
"""

from __future__ import annotations

import math
import os
import random
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from tactician.domain import NewTask
from tests.integration.driving import lock_is_free

from .crash_app import build
from .procs import (
    Cluster,
    connect,
    last_effects,
    query,
    read_effects,
    wait_for_progress,
    wait_until,
)

FINAL = {"succeeded", "dead", "cancelled"}
REFUSAL = re.compile(r"result for task \S+ refused")
"""What a worker logs when the store refuses its result (fencing)."""


def states(url: str) -> dict[str, int]:
    with connect(url) as conn:
        rows = query(conn, "SELECT state, count(*) FROM tasks GROUP BY state")
    return {state: int(n) for state, n in rows}


def submit(url: str, tasks: list[NewTask]) -> list[str]:
    app = build(url)
    try:
        return app.submit_many(tasks)
    finally:
        app.close()


# --- kill -9 ------------------------------------------------------------------------------------


@dataclass
class CrashFigures:
    db: str
    tasks: int
    seconds: float
    counts: dict[str, int]
    executions: int
    """Handler runs that began (their side effect happened)."""
    missing: int
    """Tasks whose handler never ran."""
    duplicates: int
    """Runs beyond the first, summed over tasks."""
    interrupted: int
    """Runs that began but did not reach their end (killed mid-task)."""
    never_completed: int
    """Tasks none of whose runs reached its end."""
    worker_kills: int
    planner_kills: int
    attempts: dict[str, int]
    refused: int
    """Results a worker reported and the store refused (fencing), from the worker logs."""
    kill_log: list[str] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return self.worker_kills + self.planner_kills

    def summary(self) -> str:
        return (
            f"{self.db.split(':')[0]}: {self.tasks} tasks in {self.seconds:.1f}s, "
            f"counts={self.counts}, executions={self.executions}, missing={self.missing}, "
            f"duplicates={self.duplicates} (kills={self.kills}: {self.worker_kills} workers, "
            f"{self.planner_kills} planner), interrupted={self.interrupted}, "
            f"never_completed={self.never_completed}, "
            f"attempts={self.attempts}, refused={self.refused}"
        )


def run_crash_scenario(
    url: str,
    workdir: Path,
    *,
    workers: int,
    tasks: int = 5000,
    worker_kills: int = 5,
    planner_kills: int = 2,
    lease: float = 2.0,
    task_seconds: tuple[float, float] = (0.001, 0.002),
    heartbeat_every: float | None = None,
) -> CrashFigures:
    """Run `tasks` tasks through `workers` workers and a planner, SIGKILLing and restarting a
    random worker `worker_kills` times and the planner `planner_kills` times, at random points
    of the run. Returns what happened, counted from the side effects and the database."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(tasks)]
    submit(
        url,
        [
            NewTask("work", {"key": k, "seconds": rng.uniform(*task_seconds)}, idempotency_key=k)
            for k in keys
        ],
    )
    env = {"TACTICIAN_LEASE_SECONDS": str(lease)}
    if heartbeat_every is not None:
        env["E2E_HEARTBEAT_EVERY"] = str(heartbeat_every)
    # Kill at random points of progress (fractions of tasks finished), so every kill lands
    # while work is going on, however fast this machine is.
    # Some worker kills are aimed at a moment a handler is running (its side effect done, its
    # result not yet recorded: the worst moment); the others land wherever they land.
    aimed = (worker_kills + 1) // 2
    victims = ["aimed"] * aimed + ["worker"] * (worker_kills - aimed) + ["planner"] * planner_kills
    rng.shuffle(victims)
    points = sorted(rng.uniform(0.05, 0.9) for _ in victims)
    kill_log: list[str] = []
    with Cluster(url, workdir, env) as cluster:
        planner = cluster.planner().start()
        pool = [cluster.worker(f"worker-{i}").start() for i in range(workers)]
        began = time.monotonic()

        def finished() -> int:
            return sum(n for s, n in states(url).items() if s in FINAL)

        def progress() -> str:
            return (
                f"seed={seed} counts={states(url)} after {time.monotonic() - began:.1f}s, "
                f"kills so far: {kill_log}"
            )

        for point, victim in zip(points, victims, strict=True):
            wait_for_progress(finished, math.ceil(point * tasks), progress)
            time.sleep(rng.uniform(0.0, 0.05))
            if victim == "planner":
                proc = planner
            else:  # "worker" or "aimed"
                # A worker still starting up holds no task: killing it would prove nothing.
                wait_until(lambda: any(w.uptime() >= 1.0 for w in pool), 10.0, progress)
                proc = rng.choice([w for w in pool if w.uptime() >= 1.0])
            done = finished()
            mark = ""
            kill = proc.kill
            if victim == "aimed":
                kill = proc.aim()
                runners = {str(pid) for pid in proc.descendants()}
                try:
                    wait_until(
                        partial(in_handler, cluster.effects, runners), 10.0, progress, every=0.0002
                    )
                    mark = "*"
                except AssertionError:  # a starved worker on a loaded machine: kill it anyway
                    mark = "?"
            kill()
            proc.start()
            kill_log.append(f"{proc.name}@{done}{mark}")
        wait_for_progress(finished, tasks, progress)
        seconds = time.monotonic() - began
        cluster.stop_all()
        refused = sum(len(REFUSAL.findall(w.text())) for w in pool)

    effects = read_effects(cluster.effects)
    starts = [(f[1], f[2]) for f in effects if f[0] == "start"]
    ends = {(f[1], f[2]) for f in effects if f[0] == "done"}
    runs = Counter(key for key, _ in starts)
    assert set(runs) <= set(keys), f"unknown keys ran: {sorted(set(runs) - set(keys))[:5]}"
    with connect(url) as conn:
        attempts = dict(query(conn, "SELECT outcome, count(*) FROM attempts GROUP BY outcome"))
    figures = CrashFigures(
        db=url,
        tasks=tasks,
        seconds=seconds,
        counts=states(url),
        executions=len(starts),
        missing=sum(1 for k in keys if runs[k] == 0),
        duplicates=sum(n - 1 for n in runs.values() if n > 1),
        interrupted=sum(1 for s in starts if s not in ends),
        never_completed=len(set(keys) - {key for key, _ in ends}),
        worker_kills=worker_kills,
        planner_kills=planner_kills,
        attempts={k: int(v) for k, v in attempts.items()},
        refused=refused,
        kill_log=kill_log,
    )
    print(
        f"\n[crash seed={seed}] {figures.summary()}\n  kills (victim@tasks finished, "
        f"*: aimed mid-handler): {' '.join(kill_log)}"
    )
    return figures


def in_handler(effects: Path, runners: set[str]) -> bool:
    """Is one of these runner processes inside a handler (its last line a 'start')?"""
    last: dict[str, str] = {}
    for line in last_effects(effects, 1024):
        if len(line) >= 4 and line[3] in runners:
            last[line[3]] = line[0]
    return "start" in last.values()


def assert_survived(f: CrashFigures) -> None:
    assert f.counts == {"succeeded": f.tasks}, f.summary()
    assert f.missing == 0, f"{f.missing} tasks never ran: {f.summary()}"
    assert f.never_completed == 0, f"succeeded without a complete run: {f.summary()}"
    assert f.duplicates <= f.kills, f"more re-executions than kills: {f.summary()}"
    # Tighter, by design: with --batch 1 a killed worker leaves at most one task executed but
    # unrecorded, and a killed planner none.
    assert f.duplicates <= f.worker_kills, f"a planner kill re-executed work: {f.summary()}"
    # Only killed workers lose leases (at most one claim each): a live worker never does.
    assert f.attempts.get("lost", 0) <= f.worker_kills, f"a live worker lost a lease: {f.summary()}"
    assert f.refused == 0, f"a live worker's result was refused: {f.summary()}"


def without_protection(url: str, workdir: Path, workers: int) -> CrashFigures:
    """The same run with leases shorter than a task and no heartbeats: the reaper hands tasks
    that live workers are still running to other workers."""
    return run_crash_scenario(
        url,
        workdir,
        workers=workers,
        lease=0.002,
        task_seconds=(0.003, 0.004),
        heartbeat_every=3600.0,
    )


@pytest.mark.slow
def test_kill_9_on_sqlite_loses_nothing(sqlite_url: str, tmp_path: Path) -> None:
    assert_survived(run_crash_scenario(sqlite_url, tmp_path, workers=2))


@pytest.mark.slow
def test_kill_9_check_sees_re_execution_on_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    figures = without_protection(sqlite_url, tmp_path, workers=2)
    assert figures.duplicates > figures.kills, figures.summary()


@pytest.mark.slow
@pytest.mark.postgres
def test_kill_9_on_postgres_loses_nothing(pg_url: str, tmp_path: Path) -> None:
    assert_survived(run_crash_scenario(pg_url, tmp_path, workers=3))


@pytest.mark.slow
@pytest.mark.postgres
def test_kill_9_check_sees_re_execution_on_postgres(pg_url: str, tmp_path: Path) -> None:
    figures = without_protection(pg_url, tmp_path, workers=3)
    assert figures.duplicates > figures.kills, figures.summary()


# --- kill -9 of the worker process alone ---------------------------------------------------------
# The OOM killer, or `kill -9 <pid>`, takes the worker process and leaves its runners be.


def lock_holders(lock_file: Path) -> set[int]:
    """Pids that took a flock on this file, from /proc/locks (waiters are marked '->')."""
    inode = str(lock_file.stat().st_ino)
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == inode:
            holders.add(int(f[4]))
    return holders


@pytest.mark.slow
def test_runners_die_with_their_worker(sqlite_url: str, tmp_path: Path) -> None:
    """A runner must notice its worker is gone (it once held a copy of the worker's end of its
    own pipe, so it never saw EOF, and in a group of its own it outlived a group kill)."""
    with Cluster(sqlite_url, tmp_path) as cluster:
        worker = cluster.worker("worker", concurrency=2).start()
        wait_until(lambda: len(worker.descendants()) == 2, 30.0, worker.tail)
        worker.kill_only_the_process()
        wait_until(
            lambda: not worker.strays(),
            5.0,
            lambda: f"runners {worker.strays()} outlived their worker",
        )


@pytest.mark.slow
def test_kill_9_of_a_worker_inside_a_transaction_blocks_nothing(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Runners are forked from a worker that has the store open. flock belongs to the open file
    description, so a runner that kept the worker's '<db>-lock' description would keep the
    write lock of a worker killed inside a transaction, and every process would block on it."""
    tasks = 2000
    submit(
        sqlite_url,
        [NewTask("work", {"key": f"k{i}"}, idempotency_key=f"k{i}") for i in range(tasks)],
    )
    lock_file = Path(sqlite_url.removeprefix("sqlite:///") + "-lock")
    with Cluster(sqlite_url, tmp_path, {"TACTICIAN_LEASE_SECONDS": "2"}) as cluster:
        cluster.planner().start()
        worker = cluster.worker("worker").start()
        wait_until(
            lambda: states(sqlite_url).get("succeeded", 0) >= 100,
            60.0,
            lambda: f"{states(sqlite_url)}",
        )
        worker.descendants()  # remember its runner
        # Freeze the worker alone until it is caught holding the store's write lock (inside a
        # transaction), then kill it there: deterministic, whatever the timing.
        for _ in range(1000):
            os.kill(worker.pid, signal.SIGSTOP)
            time.sleep(0.001)
            if worker.pid in lock_holders(lock_file):
                break
            os.kill(worker.pid, signal.SIGCONT)
            time.sleep(random.uniform(0.0, 0.003))
        else:
            raise RuntimeError("never caught the worker inside a transaction")
        worker.kill_only_the_process()
        cluster.worker("worker-2").start()

        def why() -> str:
            return (
                f"{states(sqlite_url)}; the write lock is free: {lock_is_free(lock_file)}; "
                f"runners that outlived the killed worker: {worker.strays()}"
            )

        wait_until(lambda: lock_is_free(lock_file), 10.0, why)
        wait_until(lambda: states(sqlite_url) == {"succeeded": tasks}, 60.0, why, every=0.1)


# --- fencing ------------------------------------------------------------------------------------


@dataclass
class FencingFigures:
    task_id: str
    state: str
    attempts: list[tuple[int, str, str]]
    """(token, worker, outcome) of each recorded attempt."""
    runs: list[tuple[str, str]]
    """(token, what) lines the handler left: 'start' and 'done' per run."""
    late_log: str
    late_accepted: int
    late_refused: int
    other_accepted: int
    paused_for: float
    paused: int
    """Processes paused: the worker and its runner."""

    @property
    def succeeded_attempts(self) -> int:
        return sum(1 for a in self.attempts if a[2] == "succeeded")

    @property
    def accepted(self) -> int:
        return self.late_accepted + self.other_accepted

    @property
    def late_refusal_logged(self) -> bool:
        """The worker's own words for a refused result (not its 'lease lost' warning)."""
        return any(self.task_id in m for m in REFUSAL.findall(self.late_log))

    def summary(self) -> str:
        return (
            f"state={self.state} attempts={self.attempts} runs={self.runs} paused "
            f"{self.paused} processes for {self.paused_for:.1f}s; "
            f"late worker: {self.late_accepted} accepted, "
            f"{self.late_refused} refused; other worker: {self.other_accepted} accepted"
        )


def _stopped_counts(log: str) -> tuple[int, int]:
    """(finished, refused) from a worker's last words: 'stopped: N finished, M refused'."""
    for line in reversed(log.splitlines()):
        if " stopped: " in line:
            words = line.split(" stopped: ", 1)[1].replace(",", "").split()
            return int(words[0]), int(words[2])
    raise AssertionError(f"the worker did not stop cleanly:\n{log[-2000:]}")


def run_fencing_scenario(url: str, workdir: Path, *, fencing: bool) -> FencingFigures:
    """Pause (SIGSTOP) the worker running a 3 s task for twice the 1 s lease, let another worker
    take the task over, then let the paused one finish and report late."""
    lease = 1.0
    env = {"TACTICIAN_LEASE_SECONDS": str(lease), "TACTICIAN_FENCING": str(fencing).lower()}
    (task_id,) = submit(
        url, [NewTask("work", {"key": "fence", "seconds": 3.0}, idempotency_key="fence")]
    )
    with Cluster(url, workdir, env) as cluster:

        def runs() -> list[tuple[str, str]]:
            return [(f[2], f[0]) for f in read_effects(cluster.effects)]

        def progress() -> str:
            return f"runs={runs()} counts={states(url)}"

        cluster.planner().start()
        late = cluster.worker("late").start()
        wait_until(lambda: ("1", "start") in runs(), 30.0, progress, every=0.005)
        late.signal_family(signal.SIGSTOP)  # the worker and its runner, mid-task
        paused_at = time.monotonic()
        wait_until(
            lambda: set(late.family_states()) == {"T"},
            5.0,
            lambda: f"not all paused: {late.family_states()}",
        )
        paused = len(late.family_states())
        other = cluster.worker("other").start()
        wait_until(lambda: ("2", "start") in runs(), 30.0, progress)
        time.sleep(max(0.0, paused_at + 2 * lease - time.monotonic()))
        paused_for = time.monotonic() - paused_at
        late.signal_family(signal.SIGCONT)
        wait_until(lambda: {("1", "done"), ("2", "done")} <= set(runs()), 30.0, progress)
        # Stopping cleanly makes each worker report what it holds, then log its totals.
        assert late.stop() == 0, late.tail()
        assert other.stop() == 0, other.tail()
        late_log, other_log = late.text(), other.text()

    with connect(url) as conn:
        attempts = query(
            conn,
            "SELECT token, worker_id, outcome FROM attempts WHERE task_id = ? ORDER BY token",
            (task_id,),
        )
        ((state,),) = query(conn, "SELECT state FROM tasks WHERE id = ?", (task_id,))
    late_accepted, late_refused = _stopped_counts(late_log)
    other_accepted, _ = _stopped_counts(other_log)
    figures = FencingFigures(
        task_id=task_id,
        state=state,
        attempts=[(int(t), str(w), str(o)) for t, w, o in attempts],
        runs=runs(),
        late_log=late_log,
        late_accepted=late_accepted,
        late_refused=late_refused,
        other_accepted=other_accepted,
        paused_for=paused_for,
        paused=paused,
    )
    print(f"\n[fencing={fencing}] {figures.summary()}")
    return figures


@pytest.fixture(scope="module")
def fenced(tmp_path_factory: pytest.TempPathFactory) -> FencingFigures:
    workdir = tmp_path_factory.mktemp("fenced")
    return run_fencing_scenario(f"sqlite:///{workdir}/tactician.db", workdir, fencing=True)


@pytest.fixture(scope="module")
def unfenced(tmp_path_factory: pytest.TempPathFactory) -> FencingFigures:
    workdir = tmp_path_factory.mktemp("unfenced")
    return run_fencing_scenario(f"sqlite:///{workdir}/tactician.db", workdir, fencing=False)


BOTH_RAN = [("1", "start"), ("2", "start"), ("1", "done"), ("2", "done")]
"""The paused run began, the other worker took over, then both ran to their end."""


@pytest.mark.slow
def test_late_result_of_a_paused_worker_is_refused(fenced: FencingFigures) -> None:
    f = fenced
    assert f.runs == BOTH_RAN, f.summary()
    assert f.paused_for >= 2.0 and f.paused == 2, f.summary()
    assert f.state == "succeeded", f.summary()
    assert f.late_refusal_logged, f.summary()
    assert (f.late_accepted, f.late_refused, f.other_accepted) == (0, 1, 1), f.summary()
    assert f.succeeded_attempts == 1, f.summary()
    assert [(t, o) for t, _, o in f.attempts] == [(1, "lost"), (2, "succeeded")], f.summary()


@pytest.mark.slow
def test_without_fencing_the_late_result_is_accepted(unfenced: FencingFigures) -> None:
    f = unfenced
    assert f.runs == BOTH_RAN, f.summary()
    assert not f.late_refusal_logged, f.summary()
    assert (f.late_accepted, f.late_refused, f.other_accepted) == (1, 0, 1), f.summary()


@pytest.mark.slow
def test_without_fencing_the_attempts_table_shows_two_successes(unfenced: FencingFigures) -> None:
    """The attempts table must see the fault too (it once kept the reaper's 'lost' row and
    dropped the late success: ON CONFLICT DO NOTHING)."""
    assert unfenced.succeeded_attempts == 2, unfenced.summary()
