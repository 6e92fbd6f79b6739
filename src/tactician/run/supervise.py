"""The child processes of `tactician serve` (workers, bus ingestion), kept running.

A supervisor process is forked once, before the planner opens its database connection, so
that no child ever inherits a connection it could close under its parent. It starts each
child and, when one exits without being asked (a crash, the OOM killer, a SIGKILL), logs one
line and starts it again after a backoff: 1 s, doubling up to 60 s, back to 1 s once a child
has run for a minute. SIGTERM stops the restarts, passes SIGTERM on to every child, waits for
them (30 s, then SIGKILL) and exits; so does the death of the planner's process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.context import ForkContext, ForkProcess

log = logging.getLogger("tactician.serve")

FIRST_WAIT_S = 1.0
MAX_WAIT_S = 60.0
STEADY_S = 60.0
"""A child that ran this long before it exited starts again after FIRST_WAIT_S."""
CHECK_EVERY_S = 0.2
STOP_WAIT_S = 30.0
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

Child = tuple[str, Callable[[], None]]
"""A child's name and what it runs."""


@dataclass
class _Slot:
    name: str
    run: Callable[[], None]
    process: ForkProcess | None = None
    started_at: float = 0.0
    wait: float = FIRST_WAIT_S
    due: float | None = None
    """When to start it again (None: running, or never started)."""


class Supervisor:
    def __init__(
        self,
        children: Sequence[Child],
        *,
        first_wait: float = FIRST_WAIT_S,
        max_wait: float = MAX_WAIT_S,
        steady: float = STEADY_S,
    ) -> None:
        self.ctx: ForkContext = multiprocessing.get_context("fork")
        self.slots = [_Slot(name, run, wait=first_wait) for name, run in children]
        self.first_wait, self.max_wait, self.steady = first_wait, max_wait, steady
        self.stopping = threading.Event()

    def run(self) -> None:
        """Start every child and keep them running until SIGTERM/SIGINT (the main thread)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        parent = os.getppid()
        for slot in self.slots:
            self._start(slot)
        try:
            while not self.stopping.wait(CHECK_EVERY_S):
                if os.getppid() != parent:  # the planner's process died without stopping us
                    log.error("serve's planner (pid %d) is gone: stopping its children", parent)
                    break
                self.check(time.monotonic())
        finally:
            self.stop_children()

    def check(self, now: float) -> int:
        """Start again each child that exited and whose backoff is over; how many started."""
        started = 0
        for slot in self.slots:
            process = slot.process
            if process is not None and slot.due is None and not process.is_alive():
                ran = now - slot.started_at
                slot.wait = self.first_wait if ran >= self.steady else slot.wait
                slot.due = now + slot.wait
                log.error(
                    "%s (pid %s) exited with code %s after %.1f s: starting it again in %.0f s",
                    slot.name,
                    process.pid,
                    process.exitcode,
                    ran,
                    slot.wait,
                )
                process.join(0)
                slot.wait = min(self.max_wait, slot.wait * 2)
            if slot.due is not None and now >= slot.due and not self.stopping.is_set():
                self._start(slot)
                started += 1
        return started

    def stop_children(self) -> None:
        alive = [s.process for s in self.slots if s.process is not None and s.process.is_alive()]
        for process in alive:
            process.terminate()
        deadline = time.monotonic() + STOP_WAIT_S
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("%s (pid %s) ignored SIGTERM: killed", process.name, process.pid)
                process.kill()
                process.join(5)

    def _start(self, slot: _Slot) -> None:
        slot.process = self.ctx.Process(target=_child, args=(slot.run,), name=slot.name)
        # Blocked across the fork: a SIGTERM meant for the child waits for its own handlers.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            slot.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        slot.started_at = time.monotonic()
        slot.due = None
        log.info("%s started (pid %s)", slot.name, slot.process.pid)


def _child(run: Callable[[], None]) -> None:
    for sig in _STOP_SIGNALS:  # until the child sets its own
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    run()
