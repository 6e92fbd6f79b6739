"""Runner processes: where handlers run, so that a hard timeout or a cancel can always kill them.

The worker hands a runner a batch of jobs over a pipe. The runner writes the index and start
time of the job it is running into shared memory, so the worker can see a job overstay its
timeout without any message per job, and kills the whole process (SIGKILL stops CPU-bound code
too). Results go back in chunks. A killed runner is replaced and the rest of its batch goes on.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from tactician.errors import HandlerError, TargetOverloaded
from tactician.observe import traces
from tactician.run.context import TaskContext, set_current

PR_SET_PDEATHSIG = 1  # prctl(2)
SEND_EVERY_S = 0.02  # results are sent at least this often while a batch runs
SKIP_FLAGS = 2  # progress holds [job index, start (monotonic), then a skip flag per job]
_CTX = multiprocessing.get_context("fork")
_WORKER_ENDS: set[Connection] = set()
"""This process's ends of its runners' pipes. A forked runner inherits copies of them all and
closes them first: holding one, it would never see EOF when its worker dies, and live on (and
keep the worker's other inherited handles, such as the store's write lock, alive with it)."""


class Job(NamedTuple):
    """One attempt to run (a tuple: it crosses the pipe by the thousand)."""

    task_id: str
    token: int
    kind: str
    attempt: int
    payload: str  # JSON text: decoded in the runner
    timeout: float
    trace_context: str | None = None  # the traceparent its run span continues


# What a runner sends back for one job:
# (task_id, token, ok, started_at, duration, error, traceback, retryable, overloaded)
RawResult = tuple[str, int, bool, float, float, str | None, str | None, bool, bool]

ExecutorFactory = Callable[[], Any]  # returns an object with .run(kind, payload, timeout)


def _die_with_worker(worker_pid: int) -> None:
    """On Linux the kernel SIGKILLs this runner when its worker dies, even in the middle of a
    long handler: the task's lease will expire and another worker runs it, so an orphan that
    went on would only run it twice at once."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere the runner notices between jobs, when its pipe reaches EOF
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0 and os.getppid() != worker_pid:
        os._exit(0)  # the worker died before the request took effect


def _runner_main(
    conn: Connection, progress: Any, make_executors: ExecutorFactory, worker_pid: int
) -> None:
    _die_with_worker(worker_pid)
    for worker_end in _WORKER_ENDS:
        worker_end.close()
    _WORKER_ENDS.clear()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when runners stop
    os.setpgid(0, 0)  # a group of its own: a kill also reaches the commands it started
    if traces.enabled():
        traces.in_runner()  # spans go to the worker with the results
    executors = make_executors()
    try:
        while True:
            try:
                batch: list[Job] | None = conn.recv()
            except EOFError:
                break
            if batch is None:
                break
            out: list[RawResult] = []
            last_send = time.monotonic()
            for index, job in enumerate(batch):
                if SKIP_FLAGS + index < len(progress) and progress[SKIP_FLAGS + index]:
                    continue  # cancelled while it waited; the worker has reported it
                started_mono = time.monotonic()
                progress[0] = index
                progress[1] = started_mono
                out.append(_run_one(executors, job, started_mono))
                progress[1] = 0.0
                if time.monotonic() - last_send >= SEND_EVERY_S:
                    _send(conn, out)
                    out, last_send = [], time.monotonic()
            _send(conn, out)
            conn.send(None)  # batch done
    finally:
        executors.close()
        conn.close()
        os._exit(0)  # never run the parent's finalisers (open database handles) here


def _send(conn: Connection, results: list[RawResult]) -> None:
    if traces.enabled():
        spans = traces.take_spans()
        if spans is not None:  # before the results: the worker has them when a task is done
            conn.send(spans)
    conn.send(results)


def _run_one(executors: Any, job: Job, started_mono: float) -> RawResult:
    if not traces.enabled():
        return _execute(executors, job, started_mono)
    with traces.run_span(job.task_id, job.kind, job.attempt, job.trace_context) as span:
        result = _execute(executors, job, started_mono)
        traces.end_run(span, ok=result[2], error=result[5], stack=result[6])
        return result


def _execute(executors: Any, job: Job, started_mono: float) -> RawResult:
    started_at = time.time()
    set_current(TaskContext(job.task_id, job.kind, job.attempt, job.token))
    try:
        executors.run(job.kind, json.loads(job.payload), job.timeout)
    except TargetOverloaded as exc:
        return _failure(job, started_at, started_mono, exc, retryable=True, overloaded=True)
    except HandlerError as exc:
        return _failure(job, started_at, started_mono, exc, retryable=exc.retryable)
    except Exception as exc:
        return _failure(job, started_at, started_mono, exc, retryable=True)
    finally:
        set_current(None)
    duration = time.monotonic() - started_mono
    return (job.task_id, job.token, True, started_at, duration, None, None, True, False)


def _failure(
    job: Job,
    started_at: float,
    started_mono: float,
    exc: BaseException,
    *,
    retryable: bool,
    overloaded: bool = False,
) -> RawResult:
    message = f"{type(exc).__name__}: {exc}"
    trace = traceback.format_exc(limit=30)
    duration = time.monotonic() - started_mono
    return (
        job.task_id,
        job.token,
        False,
        started_at,
        duration,
        message,
        trace,
        retryable,
        overloaded,
    )


class Runner:
    """One runner process and the batch it is working through."""

    def __init__(self, make_executors: ExecutorFactory, batch_size: int = 1) -> None:
        self._make_executors = make_executors
        self._batch_size = batch_size
        self.batch: list[Job] = []
        self.done: set[str] = set()
        self._spawn()

    def _spawn(self) -> None:
        self.conn, child = _CTX.Pipe()
        _WORKER_ENDS.add(self.conn)
        self.progress: Any = _CTX.RawArray("d", SKIP_FLAGS + self._batch_size)
        self.process = _CTX.Process(
            target=_runner_main,
            args=(child, self.progress, self._make_executors, os.getpid()),
            daemon=True,
        )
        self.process.start()
        child.close()

    @property
    def busy(self) -> bool:
        return bool(self.batch)

    def start(self, batch: list[Job]) -> None:
        self.batch = batch
        self.done = set()
        for slot in range(len(self.progress)):
            self.progress[slot] = 0.0
        try:
            self.conn.send(batch)
        except OSError:  # it died while idle (the OOM killer, an operator): replace it
            self.process.join(5)
            self._close_conn()
            self._spawn()
            self.conn.send(batch)

    def collect(self) -> list[RawResult]:
        """Results that arrived; the batch ends when the runner says so."""
        results: list[RawResult] = []
        try:
            while self.batch and self.conn.poll():
                message = self.conn.recv()
                if message is None:
                    self.batch = []
                    break
                if type(message) is traces.SpanBatch:
                    traces.emit(message)
                    continue
                results.extend(message)
                self.done.update(r[0] for r in message)
        except (EOFError, OSError):
            results.extend(self._replace("runner process died"))
        return results

    def current(self) -> tuple[Job, float] | None:
        """The job running now and when it started (monotonic), if any."""
        started = self.progress[1]
        index = int(self.progress[0])
        if not self.batch or started == 0.0 or index >= len(self.batch):
            return None
        return self.batch[index], started

    def check_timeout(self, now_mono: float) -> list[RawResult]:
        running = self.current()
        if running is None:
            return []
        job, started = running
        if job.task_id in self.done:  # cancelled while it waited in the batch: stop it now
            return self._replace("cancelled before it started", job)
        if now_mono - started <= job.timeout:
            return []
        return self._replace(f"timed out after {job.timeout:g}s", job, timed_out=True)

    def kill_job(self, task_id: str, reason: str) -> list[RawResult]:
        """Stop this task: kill the runner if it is running it, else drop it from the batch."""
        running = self.current()
        if running is not None and running[0].task_id == task_id:
            return self._replace(reason, running[0], cancelled=True)
        waiting = [j for j in self.batch if j.task_id == task_id and j.task_id not in self.done]
        if not waiting:
            return []
        # The runner holds the whole batch and reports progress by index into it, so the job
        # stays in self.batch. Its skip flag tells the runner to pass it by; should the runner
        # have just started it, check_timeout stops it (it is done, yet running).
        job = waiting[0]
        slot = SKIP_FLAGS + self.batch.index(job)
        if slot < len(self.progress):
            self.progress[slot] = 1.0
        self.done.add(task_id)
        return [_cancelled(job, reason)]

    def _replace(
        self,
        reason: str,
        victim: Job | None = None,
        *,
        timed_out: bool = False,
        cancelled: bool = False,
    ) -> list[RawResult]:
        """Kill the process, report the victim, and restart the rest of the batch."""
        results = self.collect_quietly()
        running = self.current()
        self._kill()
        self.process.join(5)
        self._close_conn()
        now = time.time()
        if victim is None:  # died on its own: blame the job it was running
            victim = running[0] if running else None
        if victim is not None and victim.task_id not in self.done:
            error = f"TimeoutError: {reason}" if timed_out else reason
            ran = time.monotonic() - running[1] if running and running[0] == victim else 0.0
            if cancelled:
                results.append(_cancelled(victim, reason))
            else:
                results.append(
                    (victim.task_id, victim.token, False, now - ran, ran, error, None, True, False)
                )
            if traces.enabled():
                outcome = "timeout" if timed_out else "cancelled" if cancelled else "lost"
                traces.lost_run(
                    victim.task_id,
                    victim.kind,
                    victim.attempt,
                    victim.trace_context,
                    started_at=now - ran,
                    duration=ran,
                    outcome=outcome,
                    error=error,
                )
            self.done.add(victim.task_id)
        rest = [j for j in self.batch if j.task_id not in self.done]
        self.batch = []
        self._spawn()
        if rest:
            self.start(rest)
        return results

    def _kill(self) -> None:
        """SIGKILL the runner and its process group (shell commands, their children)."""
        try:
            # The group is the runner's pid; the runner is not reaped yet, so it is still ours.
            os.killpg(self.process.pid, signal.SIGKILL)  # type: ignore[arg-type]
        except (ProcessLookupError, PermissionError):  # not in its own group yet
            self.process.kill()

    def collect_quietly(self) -> list[RawResult]:
        results: list[RawResult] = []
        try:
            while self.conn.poll():
                message = self.conn.recv()
                if message is None:
                    break
                if type(message) is traces.SpanBatch:
                    traces.emit(message)
                    continue
                results.extend(message)
                self.done.update(r[0] for r in message)
        except (EOFError, OSError):
            pass
        return results

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # already gone: nothing to tell it
            self.conn.send(None)
        self.process.join(2)
        if self.process.is_alive():
            self._kill()
            self.process.join(2)
        self._close_conn()

    def _close_conn(self) -> None:
        self.conn.close()
        _WORKER_ENDS.discard(self.conn)


def _cancelled(job: Job, reason: str) -> RawResult:
    return (
        job.task_id,
        job.token,
        False,
        time.time(),
        0.0,
        f"cancelled: {reason}",
        None,
        False,
        False,
    )


CANCEL_MARK = "cancelled: "
TIMEOUT_MARK = "TimeoutError: "
