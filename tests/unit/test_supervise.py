"""The supervisor of `tactician serve`'s children: a child that keeps exiting is started again
after a doubling backoff, capped; one that ran long enough starts again at once; once told
to stop it starts nothing. Real forked processes (they exit at once)."""

from __future__ import annotations

import time

from tactician.run.supervise import Supervisor


def exits_at_once() -> None:
    return None


def waits(supervisor: Supervisor, count: int) -> list[float]:
    """The backoffs of the first `count` restarts, as the supervisor set them."""
    slot = supervisor.slots[0]
    seen: list[float] = []
    deadline = time.monotonic() + 20
    while len(seen) < count and time.monotonic() < deadline:
        now = time.monotonic()
        due_before = slot.due
        supervisor.check(now)
        if due_before is None and slot.due is not None:
            seen.append(round(slot.due - now, 3))
        time.sleep(0.005)
    return seen


def test_a_child_that_keeps_exiting_backs_off_doubling_up_to_the_cap() -> None:
    supervisor = Supervisor([("quick", exits_at_once)], first_wait=0.05, max_wait=0.2, steady=60)
    supervisor._start(supervisor.slots[0])
    assert waits(supervisor, 4) == [0.05, 0.1, 0.2, 0.2]
    supervisor.stopping.set()
    supervisor.stop_children()


def test_a_child_that_ran_long_enough_starts_again_after_the_first_wait() -> None:
    supervisor = Supervisor([("quick", exits_at_once)], first_wait=0.05, max_wait=0.2, steady=0.0)
    supervisor._start(supervisor.slots[0])
    assert waits(supervisor, 3) == [0.05, 0.05, 0.05]
    supervisor.stopping.set()
    supervisor.stop_children()


def test_nothing_starts_once_stopping() -> None:
    supervisor = Supervisor([("quick", exits_at_once)], first_wait=0.0)
    slot = supervisor.slots[0]
    supervisor._start(slot)
    assert slot.process is not None
    slot.process.join(10)
    supervisor.stopping.set()
    assert supervisor.check(time.monotonic()) == 0
    assert supervisor.check(time.monotonic() + 1) == 0
    assert not slot.process.is_alive()
