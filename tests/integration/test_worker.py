"""A real worker with forked runner processes, driven in-process on SQLite and PostgreSQL.

Handlers run in runner processes, so they are module-level functions and report through files.
The planner ticks inside the worker's `should_stop`, in the same thread, so one store serves both.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from tactician.app import Tactician
from tactician.domain import TaskState
from tactician.run.context import current_task
from tactician.run.worker import WorkerOptions
from tests.integration.driving import final, make_app, pid_alive, run_until

pytestmark = pytest.mark.timeout(60)


# --- handlers (module level: they run in forked runner processes) -------------------------


def record(path: str, value: str) -> None:
    context = current_task()
    with open(path, "a") as out:
        out.write(f"{value}:{context.kind}:{context.attempt}\n")


async def record_async(path: str, value: str, delay: float = 0.01) -> None:
    await asyncio.sleep(delay)
    record(path, value)


def flaky(path: str, failures: int) -> None:
    """Fails `failures` times, then succeeds; counts attempts in a file."""
    with open(path, "a") as out:
        out.write("attempt\n")
    attempts = len(Path(path).read_text().splitlines())
    if attempts <= failures:
        raise RuntimeError(f"attempt {attempts} fails")


def always_fails(message: str) -> None:
    raise ValueError(message)


def spin(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        pass


def sleep_for(pid_file: str, seconds: float) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)


def mark_and_sleep(path: str, value: str, seconds: float) -> None:
    with open(path, "a") as out:
        out.write(f"{value}\n")
    time.sleep(seconds)


def crash(code: int) -> None:
    os._exit(code)


class AsyncRecorder:
    """A callable object whose __call__ is async (not a coroutine function itself)."""

    async def __call__(self, path: str, value: str) -> None:
        await asyncio.sleep(0)
        record(path, value)


async_recorder = AsyncRecorder()


# --- driving ---------------------------------------------------------------------------------


@pytest.fixture
def app(db_url: str) -> Tactician:
    the_app = make_app(db_url)
    yield the_app  # type: ignore[misc]
    the_app.close()


# --- success and payload binding -------------------------------------------------------------


def test_sync_and_async_handlers_succeed(app: Tactician, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    app.task(record)
    app.task(record_async)
    sync_id = app.submit("record", {"path": str(out), "value": "sync"})
    async_id = app.submit("record_async", {"path": str(out), "value": "async", "delay": 0.02})

    assert run_until(app, final(app, sync_id, async_id))

    for task_id in (sync_id, async_id):
        task = app.get(task_id)
        assert task.state is TaskState.SUCCEEDED, task.last_error
        assert task.attempt == 1
        assert [a.outcome for a in app.store.attempts(task_id)] == ["succeeded"]
    assert sorted(out.read_text().splitlines()) == ["async:record_async:1", "sync:record:1"]


def test_an_async_callable_object_is_awaited(app: Tactician, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    app.task(async_recorder, name="async_object")
    task_id = app.submit("async_object", {"path": str(out), "value": "awaited"})

    assert run_until(app, final(app, task_id))

    assert app.get(task_id).state is TaskState.SUCCEEDED
    assert out.read_text().splitlines() == ["awaited:async_object:1"]


def test_many_tasks_on_several_runners(app: Tactician, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    app.task(record)
    ids = [app.submit("record", {"path": str(out), "value": str(i)}) for i in range(20)]

    assert run_until(app, final(app, *ids), options=WorkerOptions(concurrency=3, batch=2))

    assert app.store.counts() == {"succeeded": 20}
    assert sorted(line.split(":")[0] for line in out.read_text().splitlines()) == sorted(
        str(i) for i in range(20)
    )


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"value": "x"}, "missing a required argument: 'path'"),
        ({"path": "p", "value": "x", "extra": 1}, "unexpected keyword argument 'extra'"),
    ],
)
def test_a_payload_that_does_not_fit_is_dead_at_once(
    app: Tactician, payload: dict[str, object], problem: str
) -> None:
    app.task(record, retries=5, backoff=0.01)
    task_id = app.submit("record", payload)

    assert run_until(app, final(app, task_id))

    task = app.get(task_id)
    assert task.state is TaskState.DEAD
    assert task.attempt == 1  # not retried
    assert task.last_error is not None
    assert "payload does not fit record" in task.last_error
    assert problem in task.last_error


# --- retries and dead letters ------------------------------------------------------------------


def test_a_handler_that_fails_twice_then_succeeds(app: Tactician, tmp_path: Path) -> None:
    counter = tmp_path / "attempts.txt"
    app.task(flaky, retries=3, backoff=0.05)
    task_id = app.submit("flaky", {"path": str(counter), "failures": 2})

    assert run_until(app, final(app, task_id))

    task = app.get(task_id)
    assert task.state is TaskState.SUCCEEDED
    assert task.attempt == 3
    assert task.last_error is None
    attempts = app.store.attempts(task_id)
    assert [(a.attempt, a.outcome) for a in attempts] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert attempts[0].error == "RuntimeError: attempt 1 fails"
    assert attempts[1].error == "RuntimeError: attempt 2 fails"
    assert len(counter.read_text().splitlines()) == 3


def test_exhausted_retries_leave_a_dead_letter(app: Tactician) -> None:
    app.task(always_fails, retries=2, backoff=0.02)
    task_id = app.submit("always_fails", {"message": "the disk is full"})

    assert run_until(app, final(app, task_id))

    task = app.get(task_id)
    assert task.state is TaskState.DEAD
    assert task.attempt == 3
    assert task.last_error == "ValueError: the disk is full"
    assert task.last_traceback is not None
    assert "Traceback" in task.last_traceback
    assert "always_fails" in task.last_traceback
    assert [a.outcome for a in app.store.attempts(task_id)] == ["failed"] * 3
    assert app.tasks()[0].state is TaskState.DEAD


def test_retry_waits_for_the_backoff(app: Tactician) -> None:
    app.task(always_fails, retries=1, backoff=0.5, max_backoff=0.5)
    task_id = app.submit("always_fails", {"message": "later"})
    seen: set[TaskState] = set()

    assert run_until(app, final(app, task_id), each=lambda: seen.add(app.get(task_id).state))

    assert TaskState.RETRY_WAIT in seen
    attempts = app.store.attempts(task_id)
    assert len(attempts) == 2
    assert attempts[1].started_at >= attempts[0].finished_at


def test_a_runner_that_dies_is_replaced(app: Tactician, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    app.task(crash, retries=0)
    app.task(record)
    crashed = app.submit("crash", {"code": 3})
    after = app.submit("record", {"path": str(out), "value": "after"})

    assert run_until(app, final(app, crashed, after))

    task = app.get(crashed)
    assert task.state is TaskState.DEAD
    assert task.last_error is not None and "runner process died" in task.last_error
    assert app.get(after).state is TaskState.SUCCEEDED


def test_a_runner_killed_while_idle_is_replaced(sqlite_url: str, tmp_path: Path) -> None:
    app = make_app(sqlite_url)
    out = tmp_path / "out.txt"
    app.task(record)
    first = app.submit("record", {"path": str(out), "value": "first"})
    planner = app.planner()
    worker = app.worker(WorkerOptions(poll_interval=0.01))
    deadline = time.monotonic() + 8
    later: list[str] = []

    def should_stop() -> bool:
        planner.tick()
        runner = worker._runners[0]
        if not later and app.get(first).state.is_final and not runner.busy:
            os.kill(runner.process.pid, 9)  # e.g. the OOM killer, while the runner is idle
            runner.process.join(5)
            later.append(app.submit("record", {"path": str(out), "value": "later"}))
        return (bool(later) and app.get(later[0]).state.is_final) or time.monotonic() > deadline

    worker.run(should_stop)

    assert later and app.get(later[0]).state is TaskState.SUCCEEDED
    assert out.read_text().splitlines() == ["first:record:1", "later:record:1"]
    app.close()


def test_a_batch_runs_in_the_planned_order(sqlite_url: str, tmp_path: Path) -> None:
    app = make_app(sqlite_url)
    out = tmp_path / "order.txt"
    app.task(mark_and_sleep)
    ids = []
    for hours in (3, 2, 1):  # later submissions (larger ids) are due sooner
        payload = {"path": str(out), "value": f"due+{hours}h", "seconds": 0}
        ids.append(app.submit("mark_and_sleep", payload, due_at=hours * 3600.0 + time.time()))
        time.sleep(0.003)  # ids carry milliseconds: make their order certain

    assert run_until(app, final(app, *ids), options=WorkerOptions(batch=3, poll_interval=0.01))

    assert out.read_text().split() == ["due+1h", "due+2h", "due+3h"]


def serve_worker(url: str, concurrency: int) -> None:
    """A worker process of its own (forked by the test), until it is killed."""
    app = make_app(url)
    app.task(record)
    app.task(sleep_for)
    app.worker(WorkerOptions(concurrency=concurrency)).run()


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def test_runners_die_with_their_worker(sqlite_url: str) -> None:
    make_app(sqlite_url).store.close()  # migrate before the worker starts
    worker = multiprocessing.get_context("fork").Process(target=serve_worker, args=(sqlite_url, 2))
    worker.start()
    assert worker.pid is not None
    deadline = time.monotonic() + 10
    while len(runners := children(worker.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    if len(runners) < 2:
        worker.kill()
        worker.join(5)
    assert len(runners) == 2

    os.kill(worker.pid, signal.SIGKILL)  # the worker alone, as the OOM killer would
    worker.join(5)

    deadline = time.monotonic() + 5
    while any(map(pid_alive, runners)) and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = [pid for pid in runners if pid_alive(pid)]
    for pid in alive:  # leave nothing behind, then fail
        os.kill(pid, signal.SIGKILL)
    assert alive == [], "runners outlived their worker"


def test_a_busy_runner_dies_with_its_worker(sqlite_url: str, tmp_path: Path) -> None:
    app = make_app(sqlite_url)
    app.task(record)
    app.task(sleep_for)
    pid_file = tmp_path / "sleep.pid"
    app.submit("sleep_for", {"pid_file": str(pid_file), "seconds": 60})
    planner = app.planner()
    worker = multiprocessing.get_context("fork").Process(target=serve_worker, args=(sqlite_url, 1))
    worker.start()
    assert worker.pid is not None
    deadline = time.monotonic() + 10
    while not pid_file.exists() and time.monotonic() < deadline:
        planner.tick()
        time.sleep(0.05)
    app.store.resign(planner.holder)
    if not pid_file.exists():
        worker.kill()
        worker.join(5)
    runner = int(pid_file.read_text())  # the handler runs in the runner process
    assert pid_alive(runner)

    os.kill(worker.pid, signal.SIGKILL)  # mid-handler: the runner must not run on alone
    worker.join(5)

    deadline = time.monotonic() + 5
    while pid_alive(runner) and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = pid_alive(runner)
    if alive:
        os.kill(runner, signal.SIGKILL)
    app.close()
    assert not alive, "a runner busy in a handler outlived its worker"


# --- hard timeouts ------------------------------------------------------------------------------


def test_a_hard_timeout_stops_cpu_bound_code(app: Tactician, tmp_path: Path) -> None:
    pid_file = tmp_path / "spin.pid"
    out = tmp_path / "out.txt"
    app.task(spin, timeout=1.0, retries=0)
    app.task(record)
    spinning = app.submit("spin", {"pid_file": str(pid_file)})
    marks: dict[str, float] = {}

    def watch() -> None:
        if "started" not in marks and pid_file.exists():
            marks["started"] = time.monotonic()
        if "ended" not in marks and app.get(spinning).state.is_final:
            marks["ended"] = time.monotonic()

    assert run_until(app, final(app, spinning), each=watch)

    assert marks["ended"] - marks["started"] <= 1.0 + 1.0
    task = app.get(spinning)
    assert task.state is TaskState.DEAD
    assert task.last_error is not None and task.last_error.startswith("TimeoutError")
    assert "timed out after 1s" in task.last_error
    [attempt] = app.store.attempts(spinning)
    assert attempt.outcome == "timeout"
    assert 0.9 <= attempt.finished_at - attempt.started_at <= 3.0
    assert not pid_alive(int(pid_file.read_text()))

    # The runner was replaced: the worker goes on with the next task.
    after = app.submit("record", {"path": str(out), "value": "after"})
    assert run_until(app, final(app, after))
    assert app.get(after).state is TaskState.SUCCEEDED


def test_a_timed_out_attempt_is_retried(sqlite_url: str, tmp_path: Path) -> None:
    app = make_app(sqlite_url)
    pid_file = tmp_path / "spin.pid"
    app.task(spin, timeout=0.5, retries=1, backoff=0.01)
    task_id = app.submit("spin", {"pid_file": str(pid_file)})
    seen: set[TaskState] = set()

    assert run_until(app, final(app, task_id), each=lambda: seen.add(app.get(task_id).state))

    assert TaskState.RETRY_WAIT in seen
    assert [a.outcome for a in app.store.attempts(task_id)] == ["timeout", "timeout"]
    assert app.get(task_id).state is TaskState.DEAD
    app.close()


# --- cancellation --------------------------------------------------------------------------------


def test_cancelling_a_running_task_kills_its_handler(db_url: str, tmp_path: Path) -> None:
    app = make_app(db_url, lease_seconds=1.0)  # heartbeats every 1/3 s
    pid_file = tmp_path / "sleep.pid"
    out = tmp_path / "out.txt"
    app.task(sleep_for, retries=3)
    app.task(record)
    task_id = app.submit("sleep_for", {"pid_file": str(pid_file), "seconds": 30})
    marks: dict[str, float] = {}

    def cancel_once_running() -> None:
        if "cancelled" in marks or not pid_file.exists():
            return
        if app.get(task_id).state is TaskState.RUNNING:
            assert app.cancel(task_id).cancel_requested
            marks["cancelled"] = time.monotonic()

    assert run_until(
        app, lambda: app.get(task_id).state.is_final, each=cancel_once_running, timeout=8.0
    )
    elapsed = time.monotonic() - marks["cancelled"]

    task = app.get(task_id)
    assert task.state is TaskState.CANCELLED
    assert elapsed < 2.0  # a few heartbeats of 1/3 s
    assert task.attempt == 1  # a cancel is not retried
    assert [a.outcome for a in app.store.attempts(task_id)] == ["cancelled"]
    assert not pid_alive(int(pid_file.read_text()))

    after = app.submit("record", {"path": str(out), "value": "after"})
    assert run_until(app, final(app, after))
    assert app.get(after).state is TaskState.SUCCEEDED
    app.close()


def test_cancelling_a_task_waiting_in_a_runner_batch(db_url: str, tmp_path: Path) -> None:
    app = make_app(db_url, lease_seconds=1.0)
    out = tmp_path / "started.txt"
    app.task(mark_and_sleep)
    ids = {
        name: app.submit("mark_and_sleep", {"path": str(out), "value": name, "seconds": 1.0})
        for name in ("a", "b", "c")
    }
    cancelled: list[str] = []

    def cancel_one_still_waiting() -> None:
        started = out.read_text().split() if out.exists() else []
        if not cancelled and len(started) == 1:  # one runs; two wait in the runner's batch
            victim = min(set(ids) - set(started))
            app.cancel(ids[victim])
            cancelled.append(victim)

    options = WorkerOptions(concurrency=1, batch=3, poll_interval=0.01)
    assert run_until(app, final(app, *ids.values()), options=options, each=cancel_one_still_waiting)

    [victim] = cancelled
    assert app.get(ids[victim]).state is TaskState.CANCELLED
    assert sorted(out.read_text().split()) == sorted(set(ids) - {victim})  # it never started
    for name in set(ids) - {victim}:
        assert app.get(ids[name]).state is TaskState.SUCCEEDED

    # The runner's batch bookkeeping is intact: it takes and finishes new work.
    after = app.submit("mark_and_sleep", {"path": str(out), "value": "after", "seconds": 0})
    assert run_until(app, final(app, after), options=options)
    assert app.get(after).state is TaskState.SUCCEEDED
    app.close()


def test_cancelling_a_waiting_task_never_runs_it(app: Tactician, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    app.task(record)
    task_id = app.submit("record", {"path": str(out), "value": "never"})
    assert app.cancel(task_id).state is TaskState.CANCELLED
    other = app.submit("record", {"path": str(out), "value": "other"})

    assert run_until(app, final(app, other))

    assert app.get(task_id).state is TaskState.CANCELLED
    assert out.read_text().splitlines() == ["other:record:1"]
