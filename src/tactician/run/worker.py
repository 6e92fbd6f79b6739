"""A worker: claims granted tasks, runs them in runner processes, reports results, heartbeats.

Delivery is at least once. A worker killed with SIGKILL loses its leases when they expire; the
planner's reaper puts those tasks back. A worker that comes back from a pause finds its late
results refused by the store (fencing), because another worker now holds a newer lease token.
At most `concurrency * batch` tasks are in flight per worker: that bounds how many tasks a
killed worker can leave executed-but-unrecorded (re-executed later).

A worker that loses its database connection keeps its runners going and its results in hand,
waits for the database (the store reconnects with backoff), registers again, and sends the
results: the store refuses any whose lease was lost meanwhile (fencing), so a worker never
completes a task another worker may now hold.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import wait

from tactician.domain import Claim, KindSpec, Result
from tactician.errors import StoreUnavailable
from tactician.observe import counters
from tactician.run.executors import Executors, Handler, preload
from tactician.run.runner import CANCEL_MARK, TIMEOUT_MARK, Job, RawResult, Runner
from tactician.store.protocol import Finish, HeartbeatReply, Store

log = logging.getLogger("tactician.worker")
MIN_IDLE_WAIT_S = 0.001
"""After work, poll again soon; the wait doubles up to the poll interval while idle."""
OUTAGE_STEP_S = 0.5
"""While the database is away, how often results are collected and timeouts enforced."""


@dataclass(frozen=True)
class WorkerOptions:
    concurrency: int = 1
    """Runner processes: tasks that run at the same time."""
    batch: int = 1
    """Tasks claimed per runner at once. 1 keeps re-execution after a crash to one task per
    runner; larger batches trade that for throughput."""
    heartbeat_every: float | None = None
    """Seconds between heartbeats; default a third of the lease."""
    poll_interval: float = 0.05


class Worker:
    def __init__(
        self,
        store: Store,
        kinds: Mapping[str, KindSpec],
        handlers: Mapping[str, Handler],
        options: WorkerOptions,
        lease_seconds: float,
        *,
        worker_id: str | None = None,
    ) -> None:
        self.store = store
        self.kinds = dict(kinds)
        self.handlers = dict(handlers)
        self.options = options
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.heartbeat_every = options.heartbeat_every or lease_seconds / 3
        self._rng = random.Random()
        self._claimed: dict[str, Claim] = {}
        self._runners: list[Runner] = []
        self.finished = 0
        self.refused = 0
        self._idle_wait = MIN_IDLE_WAIT_S
        self._lost: set[str] = set()
        self._unsent: list[Finish] = []
        """Results not yet acknowledged by the store (sent again after a lost connection)."""
        self._adopted: list[Claim] = []
        """Claims committed while the connection broke, found again after it came back."""
        counters.configure(store.settings.metrics)

    def _make_executors(self) -> Executors:
        return Executors(self.kinds, self.handlers)

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Work until should_stop() is true; then finish what is in hand and return."""
        preload(self.kinds.values())
        self._runners = [
            Runner(self._make_executors, self.options.batch)
            for _ in range(self.options.concurrency)
        ]
        kinds = sorted(self.kinds)
        self.store.register_worker(self.id, socket.gethostname(), os.getpid(), kinds)
        listen = getattr(self.store, "listen", None)
        if listen is not None:
            listen("tactician_workers")
        log.info("worker %s started: kinds=%s concurrency=%d", self.id, kinds, len(self._runners))
        next_beat = time.monotonic() + self.heartbeat_every
        rejoin = False
        try:
            while True:
                stopping = should_stop()
                if stopping and not self._claimed and not self._unsent:
                    break
                try:
                    if rejoin:
                        self._rejoin(kinds)
                        rejoin = False
                        next_beat = time.monotonic() + self.heartbeat_every
                    claimed = self._finish_and_claim(self._collect(), [] if stopping else kinds)
                    self._wait(claimed)
                    if time.monotonic() >= next_beat:
                        self._heartbeat()
                        next_beat = time.monotonic() + self.heartbeat_every
                    counters.flush_due(self.store)
                except StoreUnavailable as exc:
                    self._wait_for_database(exc, should_stop)
                    rejoin = True
        finally:
            for runner in self._runners:
                runner.stop()
            counters.flush(self.store)
            log.info(
                "worker %s stopped: %d finished, %d refused", self.id, self.finished, self.refused
            )

    def _finish_and_claim(self, raw: list[RawResult], kinds: list[str]) -> int:
        """Report results and take new work for idle runners in one transaction."""
        resent = len(self._unsent)
        finishes = self._unsent + self._finishes(raw)
        self._unsent = finishes  # until the store has answered
        idle = [r for r in self._runners if not r.busy] if kinds else []
        size = self.options.batch
        if not finishes and not idle:
            return 0
        adopted = self._adopted[: len(idle) * size]
        accepted, claims = self.store.finish_and_claim(
            self.id, finishes, self.kinds, kinds, len(idle) * size - len(adopted)
        )
        self._unsent = []
        del self._adopted[: len(adopted)]
        accepted = [
            ok or (i < resent and self._recorded_before(finishes[i]))
            for i, ok in enumerate(accepted)
        ]
        self._count(finishes, accepted)
        counters.DEFAULT.claimed(claims)
        claims = adopted + claims
        for claim in claims:
            self._claimed[claim.task_id] = claim
        for i, runner in enumerate(idle):
            part = claims[i * size : (i + 1) * size]
            if part:
                runner.start([self._job(c) for c in part])
        return len(claims)

    def _job(self, claim: Claim) -> Job:
        timeout = self.kinds[claim.kind].timeout
        return Job(
            claim.task_id,
            claim.token,
            claim.kind,
            claim.attempt,
            claim.payload,
            timeout,
            claim.trace_context,
        )

    def _wait(self, claimed: int) -> None:
        busy = [r.conn for r in self._runners if r.busy]
        if busy:
            self._idle_wait = MIN_IDLE_WAIT_S
            wait(busy, timeout=min(self.options.poll_interval, self.heartbeat_every))
        elif claimed:
            self._idle_wait = MIN_IDLE_WAIT_S
        else:
            self.store.wait_for_work(self._idle_wait)
            self._idle_wait = min(self.options.poll_interval, self._idle_wait * 2)

    def _collect(self) -> list[RawResult]:
        results: list[RawResult] = []
        now = time.monotonic()
        for runner in self._runners:
            results.extend(runner.collect())
            results.extend(runner.check_timeout(now))
        return results

    def _report(self, raw: list[RawResult]) -> None:
        self._unsent.extend(self._finishes(raw))  # sent with the next claim

    def _finishes(self, raw: list[RawResult]) -> list[Finish]:
        """Results as the store records them, each with its retry decision."""
        finishes = []
        for task_id, token, ok, started_at, duration, error, trace, retryable, overloaded in raw:
            claim = self._claimed.pop(task_id, None)
            self._lost.discard(task_id)
            if claim is None or claim.token != token:
                continue
            kind = self.kinds[claim.kind]
            cancelled = bool(error and error.startswith(CANCEL_MARK))
            timed_out = bool(error and error.startswith(TIMEOUT_MARK))
            result = Result(
                task_id,
                token,
                ok,
                started_at,
                duration,
                error=error,
                traceback=trace,
                retryable=retryable and not cancelled,
                overloaded=overloaded,
                timed_out=timed_out,
                cancelled=cancelled,
            )
            delay = None
            if not ok and not cancelled:
                delay = kind.retry.next_delay(claim.attempt, retryable=retryable, rng=self._rng)
                log.warning(
                    "task %s (%s) attempt %d failed: %s", task_id, kind.name, claim.attempt, error
                )
            finishes.append(Finish(result, kind.name, claim.attempt, delay))
        return finishes

    def _count(self, finishes: list[Finish], accepted: list[bool]) -> None:
        for finish, ok in zip(finishes, accepted, strict=True):
            if ok:
                self.finished += 1
            else:
                self.refused += 1
                log.warning(
                    "result for task %s refused: lease token %d is stale (fencing)",
                    finish.result.task_id,
                    finish.result.token,
                )

    def _wait_for_database(self, exc: StoreUnavailable, should_stop: Callable[[], bool]) -> None:
        """Wait for the database while the runners finish their tasks (their results wait in
        `_unsent`; timeouts are still enforced). Told to stop meanwhile, give up with `exc`:
        the tasks whose results are unreported run again once their leases expire."""
        reconnect = getattr(self.store, "reconnect", None)
        if reconnect is None:  # SQLite: no connection to lose; a busy timeout ends the run
            raise exc
        while not reconnect(OUTAGE_STEP_S):
            self._unsent.extend(self._finishes(self._collect()))
            if should_stop():
                log.warning(
                    "worker %s stops while the database is away; %d results unreported",
                    self.id,
                    len(self._unsent),
                )
                raise exc

    def _rejoin(self, kinds: list[str]) -> None:
        """Back after a lost connection: register again, learn which leases this worker still
        holds (a result for a lease lost meanwhile is refused when sent), and adopt the tasks
        claimed by a commit whose answer never came (its heartbeat would keep them forever)."""
        self.store.register_worker(self.id, socket.gethostname(), os.getpid(), kinds)
        reply = self._heartbeat()
        known = set(self._claimed) | {c.task_id for c in self._adopted}
        known |= {f.result.task_id for f in self._unsent}
        for task_id in sorted(set(reply.held) - known):
            task = self.store.get(task_id)
            if task.lease_token == reply.held[task_id] and task.kind in self.kinds:
                payload, token = json.dumps(task.payload), reply.held[task_id]
                claim = Claim(task_id, task.kind, payload, token, task.attempt, task.trace_context)
                self._adopted.append(claim)
        log.warning(
            "worker %s registered again after a database outage: %d results to send, "
            "%d claims adopted, %d leases lost",
            self.id,
            len(self._unsent),
            len(self._adopted),
            len(self._lost),
        )

    def _recorded_before(self, finish: Finish) -> bool:
        """A result sent again after an outage may have been committed the first time."""
        r = finish.result
        return any(
            a.token == r.token and a.worker_id == self.id and a.outcome != "lost"
            for a in self.store.attempts(r.task_id)
        )

    def _heartbeat(self) -> HeartbeatReply:
        reply = self.store.heartbeat(self.id)
        for task_id, claim in list(self._claimed.items()):
            if reply.held.get(task_id) != claim.token and task_id not in self._lost:
                self._lost.add(task_id)  # say it once, not at every heartbeat
                log.warning("lease on task %s lost; another worker may run it", task_id)
        for task_id in reply.cancel:
            for runner in self._runners:
                self._report(runner.kill_job(task_id, "cancelled by an operator"))
        return reply
