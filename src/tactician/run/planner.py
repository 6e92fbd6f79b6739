"""The planner service: the one active planner moves work along.

Each tick: keep leadership; promote pending and retry_wait tasks whose time came; reap expired
leases; fire due schedules; then grant capacity to ready tasks, best first, in batches, until
nothing more fits. Standby planners only try to take the lead, every STANDBY_POLL_S.

When the database goes away the planner stops planning, waits for it (the store reconnects with
backoff), and asks again whether it leads before its next pass: on PostgreSQL the lock lives in
a session, and a lost connection is a lost lock.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass

from tactician.domain import KindSpec
from tactician.errors import StoreUnavailable
from tactician.observe import counters, traces
from tactician.plan.capacity import plan_starts
from tactician.settings import Settings, redact_url
from tactician.store.protocol import Planner, Ranker, Store

log = logging.getLogger("tactician.planner")

LEADER_TTL_S = 5.0
KINDS_REFRESH_S = 2.0
MIN_IDLE_WAIT_S = 0.001
# How often the running planner does its periodic chores; promote and plan run every pass.
CHORE_EVERY_S = {"lead": LEADER_TTL_S / 5, "reap": 0.25, "hooks": 0.5}
STANDBY_POLL_S = 0.25
"""How often a standby asks for the lead: with the lock freed when the leader's connection
closes, this bounds the take-over after a leader dies (one cheap query on PostgreSQL)."""
OUTAGE_STEP_S = 1.0
"""While the database is away, how often the planner looks up to see whether it should stop."""


@dataclass(frozen=True)
class TickReport:
    leading: bool
    promoted: int = 0
    reaped: int = 0
    started: int = 0
    fired: int = 0
    wake_in: float | None = None  # a rate-limited task can start this many seconds from now


TickHook = Callable[[float], int]
"""Extra work for the leader each tick (firing schedules); returns how much it did."""


class PlannerService:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        planner: Planner = plan_starts,
        ranker: Ranker | None = None,
        hooks: tuple[TickHook, ...] = (),
        holder: str | None = None,
        limits: Callable[[Mapping[str, KindSpec]], Mapping[str, KindSpec]] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.planner = planner
        self.ranker = ranker
        """The decision service's scorer; None: earliest deadline first, as read."""
        self.hooks = hooks
        self.limits = limits
        """The registered kinds under the live bundle's `limits` (None: as registered)."""
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._kinds: Mapping[str, KindSpec] = {}
        self._kinds_at = -1e9
        self._leading = False
        counters.configure(settings.metrics)

    def kinds(self) -> Mapping[str, KindSpec]:
        if time.monotonic() - self._kinds_at > KINDS_REFRESH_S:
            self._kinds = self.store.kinds()
            self._kinds_at = time.monotonic()
        return self._kinds if self.limits is None else self.limits(self._kinds)

    def tick(self) -> TickReport:
        """One pass with every chore: leadership, promote, reap, schedules, plan."""
        return self._tick(lead=True, reap=True, hooks=True)

    def _tick(self, *, lead: bool, reap: bool, hooks: bool) -> TickReport:
        if lead or not self._leading:
            leading = self.store.try_lead(self.holder, LEADER_TTL_S)
            if leading != self._leading:
                log.info("planner %s is %s", self.holder, "active" if leading else "standing by")
                self._leading = leading
        if not self._leading:
            return TickReport(False)
        promoted = self.store.promote()
        reaped = 0
        if reap:
            report = self.store.reap()
            reaped = report.returned + report.dead + report.cancelled
            if reaped:
                log.warning(
                    "reaped expired leases: %d back to ready, %d dead, %d cancelled",
                    report.returned,
                    report.dead,
                    report.cancelled,
                )
        fired = 0
        if hooks and self.hooks:
            now = self.store.db_now()
            fired = sum(hook(now) for hook in self.hooks)
        kinds = self.kinds()
        started = 0
        provenance = getattr(self.ranker, "provenance", None)
        reserve = getattr(self.ranker, "reserve", False)  # the policy's EASY reservations
        expected = getattr(self.ranker, "expected_runs", None) if reserve else None
        while True:
            if traces.enabled():  # a plan span per pass that started tasks
                plan = traces.traced_plan(
                    self.store, self.planner, kinds, self.ranker, provenance, expected
                )
            else:
                plan = self.store.plan(self.planner, kinds, self.ranker, provenance, expected)
            started += plan.started
            counters.DEFAULT.rate_limited(plan.blocked)
            wake_in = plan.wake_in
            if plan.started < max(1, min(plan.considered, self.settings.plan_batch) // 2):
                break
        return TickReport(True, promoted, reaped, started, fired, wake_in)

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        listen = getattr(self.store, "listen", None)
        if listen is not None:
            listen("tactician_planner")
        log.info("planner %s started on %s", self.holder, redact_url(self.store.url))
        try:
            idle_wait = MIN_IDLE_WAIT_S
            last = {"lead": -1e9, "reap": -1e9, "hooks": -1e9}
            while not should_stop():
                now = time.monotonic()
                due = {chore: now - at >= CHORE_EVERY_S[chore] for chore, at in last.items()}
                for chore, is_due in due.items():
                    if is_due:
                        last[chore] = now
                try:
                    report = self._tick(**due)
                    counters.flush_due(self.store)
                except StoreUnavailable as exc:
                    if not self._wait_for_database(exc, should_stop):
                        break
                    continue
                if not report.leading:
                    time.sleep(STANDBY_POLL_S)
                elif report.started or report.promoted or report.reaped or report.fired:
                    idle_wait = MIN_IDLE_WAIT_S
                else:
                    wait = idle_wait if report.wake_in is None else min(idle_wait, report.wake_in)
                    self.store.wait_for_work(wait)
                    idle_wait = min(self.settings.poll_interval, idle_wait * 2)
        finally:
            counters.flush(self.store)
            if self._leading:
                with suppress(StoreUnavailable):  # a lost session has freed the lock already
                    self.store.resign(self.holder)

    def _wait_for_database(self, exc: StoreUnavailable, should_stop: Callable[[], bool]) -> bool:
        """Stop leading, wait for the database, and ask again before the next pass (a session
        lock does not outlive its connection). False when told to stop meanwhile."""
        reconnect = getattr(self.store, "reconnect", None)
        if reconnect is None:  # SQLite: no connection to lose; a busy timeout ends the run
            raise exc
        if self._leading:
            log.warning("planner %s stops planning until it leads again: %s", self.holder, exc)
            self._leading = False
        while not reconnect(OUTAGE_STEP_S):
            if should_stop():
                return False
        return True
