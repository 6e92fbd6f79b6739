"""The planner service: the one active planner moves work along.

Each tick: keep leadership; promote pending and retry_wait tasks whose time came; reap expired
leases; fire due schedules; then grant capacity to ready tasks, best first, in batches, until
nothing more fits. Standby planners only try to take the lead.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tactician.domain import KindSpec
from tactician.plan.capacity import plan_starts
from tactician.settings import Settings
from tactician.store.protocol import Planner, Store

log = logging.getLogger("tactician.planner")

LEADER_TTL_S = 5.0
KINDS_REFRESH_S = 2.0
MIN_IDLE_WAIT_S = 0.001


@dataclass(frozen=True)
class TickReport:
    leading: bool
    promoted: int = 0
    reaped: int = 0
    started: int = 0
    fired: int = 0


TickHook = Callable[[float], int]
"""Extra work for the leader each tick (firing schedules); returns how much it did."""


class PlannerService:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        planner: Planner = plan_starts,
        hooks: tuple[TickHook, ...] = (),
        holder: str | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.planner = planner
        self.hooks = hooks
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._kinds: Mapping[str, KindSpec] = {}
        self._kinds_at = -1e9
        self._leading = False

    def kinds(self) -> Mapping[str, KindSpec]:
        if time.monotonic() - self._kinds_at > KINDS_REFRESH_S:
            self._kinds = self.store.kinds()
            self._kinds_at = time.monotonic()
        return self._kinds

    def tick(self) -> TickReport:
        leading = self.store.try_lead(self.holder, LEADER_TTL_S)
        if leading != self._leading:
            log.info("planner %s is %s", self.holder, "active" if leading else "standing by")
            self._leading = leading
        if not leading:
            return TickReport(False)
        promoted = self.store.promote()
        reap = self.store.reap()
        if reap.returned or reap.dead or reap.cancelled:
            log.warning(
                "reaped expired leases: %d back to ready, %d dead, %d cancelled",
                reap.returned, reap.dead, reap.cancelled,
            )
        fired = sum(hook(self.store.db_now()) for hook in self.hooks) if self.hooks else 0
        kinds = self.kinds()
        started = 0
        while True:
            report = self.store.plan(self.planner, kinds)
            started += report.started
            if report.started < max(1, min(report.considered, self.settings.plan_batch) // 2):
                break
        return TickReport(True, promoted, reap.returned + reap.dead + reap.cancelled, started,
                          fired)

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        listen = getattr(self.store, "listen", None)
        if listen is not None:
            listen("tactician_planner")
        log.info("planner %s started on %s", self.holder, self.store.url)
        try:
            idle_wait = MIN_IDLE_WAIT_S
            while not should_stop():
                report = self.tick()
                if not report.leading:
                    time.sleep(min(1.0, LEADER_TTL_S / 5))
                elif report.started or report.promoted or report.reaped or report.fired:
                    idle_wait = MIN_IDLE_WAIT_S
                else:
                    self.store.wait_for_work(idle_wait)
                    idle_wait = min(self.settings.poll_interval, idle_wait * 2)
        finally:
            if self._leading:
                self.store.resign(self.holder)
