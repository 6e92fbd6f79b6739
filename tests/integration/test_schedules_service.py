"""ScheduleService and the planner: ticks become tasks, once each, on SQLite and PostgreSQL.

Most tests drive `fire_due(now)` with explicit times after setting the stored high-water mark,
instead of waiting for real time to pass.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tactician.app import Tactician
from tactician.domain import Task, TaskState
from tactician.errors import InvalidSchedule, UnknownKind
from tactician.plan.schedules import ScheduleSpec, tick_key
from tactician.run.schedules import ScheduleService
from tactician.settings import Settings
from tactician.store.protocol import TaskFilter

pytestmark = pytest.mark.timeout(60)

T0 = 1_749_999_600.0  # 2025-06-15T15:00:00Z (in the past: tasks are ready at once)
NAME = "digest"


def report(to: str) -> None:
    """The kind schedules create (no worker runs it here)."""


def make_app(url: str) -> Tactician:
    app = Tactician(settings=Settings(db=url, poll_interval=0.01))
    app.task(report)
    return app


@pytest.fixture
def app(db_url: str) -> Iterator[Tactician]:
    the_app = make_app(db_url)
    yield the_app
    the_app.close()


@pytest.fixture
def service(app: Tactician) -> ScheduleService:
    return ScheduleService(app.store, app)


def save(service: ScheduleService, last_tick: float | None = T0, **fields: Any) -> ScheduleSpec:
    fields.setdefault("every", 10.0)
    spec = ScheduleSpec(
        name=fields.pop("name", NAME), kind="report", payload={"to": "ops"}, **fields
    )
    service.save(spec)
    if last_tick is not None:
        service.store.advance_schedule(spec.name, last_tick, None)
    return spec


def scheduled(app: Tactician, name: str = NAME) -> list[Task]:
    tasks = app.tasks(TaskFilter(source=f"schedule:{name}", limit=10_000))
    return sorted(tasks, key=lambda t: (t.release_at, t.id))


def ticks(app: Tactician, name: str = NAME) -> list[float]:
    return [t.release_at for t in scheduled(app, name)]


def row(app: Tactician, name: str = NAME) -> Any:
    return {r.name: r for r in app.store.schedules()}[name]


def utc(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# --- firing -----------------------------------------------------------------------------------


def test_an_interval_schedule_fires_through_the_planner(app: Tactician) -> None:
    service = ScheduleService(app.store, app)
    saved_at = app.store.db_now()
    save(service, last_tick=None, every=1.0, overlap="allow_all")
    planner = app.planner()
    fired = 0
    deadline = time.monotonic() + 2.6
    while time.monotonic() < deadline:
        fired += planner.tick().fired
        time.sleep(0.05)
    app.store.resign(planner.holder)

    tasks = scheduled(app)
    assert 2 <= len(tasks) <= 3
    assert fired == len(tasks)
    releases = [t.release_at for t in tasks]
    assert all(r == int(r) and r > saved_at for r in releases)  # ticks of k * 1 s, none before
    assert [b - a for a, b in itertools.pairwise(releases)] == [1.0] * (len(tasks) - 1)
    for task in tasks:
        assert task.idempotency_key == tick_key(NAME, task.release_at)
        assert task.payload == {"to": "ops"}
        assert task.kind == "report"


def test_unknown_kind_is_refused(service: ScheduleService) -> None:
    with pytest.raises(UnknownKind):
        service.save(ScheduleSpec(name="x", kind="nope", payload={}, every=1.0))
    assert service.store.schedules() == []


def test_firing_the_same_ticks_twice_creates_nothing_new(app: Tactician) -> None:
    service = ScheduleService(app.store, app)
    save(service, overlap="allow_all")
    assert service.fire_due(T0 + 30) == 3
    # Another planner that still saw the old mark (a failover) fires the same ticks again.
    app.store.advance_schedule(NAME, T0, None)
    service.fire_due(T0 + 30)
    assert ticks(app) == [T0 + 10, T0 + 20, T0 + 30]


def test_two_planners_on_postgres_create_one_task_per_tick(pg_url: str) -> None:
    first, second = make_app(pg_url), make_app(pg_url)
    services = [ScheduleService(first.store, first), ScheduleService(second.store, second)]
    save(services[0], overlap="allow_all", catchup_window=1_000.0)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def fire(service: ScheduleService, now: float) -> None:
        try:
            barrier.wait(5)
            service.fire_due(now)
        except BaseException as exc:
            errors.append(exc)

    for step in range(1, 6):
        now = T0 + step * 50
        threads = [threading.Thread(target=fire, args=(s, now)) for s in services]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        # Both also fire once more from the old mark, as if each had read it before the other
        # advanced it.
        first.store.advance_schedule(NAME, now - 50, None)
        services[1].fire_due(now)

    assert errors == []
    assert ticks(first) == [T0 + 10 * k for k in range(1, 26)]
    keys = [t.idempotency_key for t in scheduled(first)]
    assert len(set(keys)) == len(keys) == 25

    # Through PlannerService, only one of two planners leads and fires.
    first.store.delete_schedule(NAME)  # only the live schedule fires from here on
    save(services[0], name="live", every=1.0, overlap="allow_all", last_tick=None)
    planners = [first.planner(), second.planner()]
    reports = []
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        reports.extend(p.tick() for p in planners)
        time.sleep(0.05)
    assert {r.leading for r in reports[0::2]} != {r.leading for r in reports[1::2]}
    live = scheduled(first, "live")
    assert 1 <= len(live) <= 2
    assert sum(r.fired for r in reports) == len(live)
    assert len({t.idempotency_key for t in live}) == len(live)
    for planner, app in zip(planners, (first, second), strict=True):
        app.store.resign(planner.holder)
    first.close()
    second.close()


def test_pause_stops_ticks_and_resume_does_not_replay_them(
    app: Tactician, service: ScheduleService
) -> None:
    save(service, overlap="allow_all")
    assert service.fire_due(T0 + 10) == 1
    app.store.set_schedule_paused(NAME, True)
    assert service.fire_due(T0 + 20) == 0
    assert service.fire_due(T0 + 30) == 0
    assert ticks(app) == [T0 + 10]
    app.store.set_schedule_paused(NAME, False)
    assert service.fire_due(T0 + 40) == 1
    assert ticks(app) == [T0 + 10, T0 + 40]


# --- overlap policies --------------------------------------------------------------------------


def test_overlap_skip(app: Tactician, service: ScheduleService) -> None:
    save(service, overlap="skip")
    assert service.fire_due(T0 + 10) == 1
    assert service.fire_due(T0 + 20) == 0  # the first run is unfinished
    [first] = scheduled(app)
    app.cancel(first.id)
    assert service.fire_due(T0 + 30) == 1
    assert ticks(app) == [T0 + 10, T0 + 30]


def test_overlap_skip_within_one_catch_up(app: Tactician, service: ScheduleService) -> None:
    save(service, overlap="skip")
    assert service.fire_due(T0 + 40) == 1
    assert ticks(app) == [T0 + 10]


def test_overlap_buffer_one(app: Tactician, service: ScheduleService) -> None:
    save(service, overlap="buffer_one")
    assert service.fire_due(T0 + 10) == 1
    assert service.fire_due(T0 + 20) == 0
    assert row(app).buffered_tick == T0 + 20
    assert service.fire_due(T0 + 30) == 0  # one is buffered already: this one is dropped
    assert row(app).buffered_tick == T0 + 20
    assert ticks(app) == [T0 + 10]

    app.cancel(scheduled(app)[0].id)
    assert service.fire_due(T0 + 35) == 1  # no new tick: the buffered one starts
    assert ticks(app) == [T0 + 10, T0 + 20]
    assert scheduled(app)[1].idempotency_key == tick_key(NAME, T0 + 20)
    assert row(app).buffered_tick is None

    assert service.fire_due(T0 + 40) == 0  # the buffered run is now the unfinished one
    assert row(app).buffered_tick == T0 + 40


def test_a_buffered_tick_waits_while_paused(app: Tactician, service: ScheduleService) -> None:
    save(service, overlap="buffer_one")
    service.fire_due(T0 + 10)
    service.fire_due(T0 + 20)
    assert row(app).buffered_tick == T0 + 20
    app.store.set_schedule_paused(NAME, True)
    app.cancel(scheduled(app)[0].id)
    assert service.fire_due(T0 + 25) == 0
    assert ticks(app) == [T0 + 10]
    app.store.set_schedule_paused(NAME, False)
    assert service.fire_due(T0 + 26) == 1
    assert ticks(app) == [T0 + 10, T0 + 20]


def test_overlap_allow_all(app: Tactician, service: ScheduleService) -> None:
    save(service, overlap="allow_all")
    for step in (1, 2, 3):
        assert service.fire_due(T0 + 10 * step) == 1
    assert ticks(app) == [T0 + 10, T0 + 20, T0 + 30]
    assert all(not t.state.is_final for t in scheduled(app))


def test_overlap_cancel_running(app: Tactician, service: ScheduleService) -> None:
    save(service, overlap="cancel_running")
    assert service.fire_due(T0 + 10) == 1
    [first] = scheduled(app)
    assert service.fire_due(T0 + 20) == 1
    first, second = scheduled(app)
    assert first.state is TaskState.CANCELLED
    assert second.state is TaskState.READY
    assert second.idempotency_key == tick_key(NAME, T0 + 20)

    # A running task is asked to stop (its worker kills it); the new tick starts at once.
    assert app.store.plan(app.planner().planner, app.known_kinds()).started == 1
    [claim] = app.store.claim("w", ["report"], 1)
    assert claim.task_id == second.id
    assert service.fire_due(T0 + 30) == 1
    _, running, third = scheduled(app)
    assert running.state is TaskState.RUNNING and running.cancel_requested
    assert third.state is TaskState.READY
    assert third.release_at == T0 + 30


def test_cancel_running_tolerates_a_run_that_just_finished(
    app: Tactician, service: ScheduleService, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(service, overlap="cancel_running")
    service.fire_due(T0 + 10)
    assert len(scheduled(app)) == 1
    cancel = app.store.cancel

    def finish_first_then_cancel(task_id: str) -> Task:
        cancel(task_id)  # it reaches a final state between the listing and this cancel
        return cancel(task_id)  # -> Conflict: already cancelled

    monkeypatch.setattr(app.store, "cancel", finish_first_then_cancel)
    assert service.fire_due(T0 + 20) == 1
    assert ticks(app) == [T0 + 10, T0 + 20]
    assert row(app).last_tick == T0 + 20


# --- catch-up, backfill, time zones ------------------------------------------------------------


def test_catch_up_after_downtime_fires_only_inside_the_window(
    app: Tactician, service: ScheduleService
) -> None:
    save(service, every=60.0, catchup_window=300.0, overlap="allow_all")
    assert service.fire_due(T0 + 3600) == 6
    assert ticks(app) == [T0 + 3600 - 60 * k for k in range(5, -1, -1)]
    assert row(app).last_tick == T0 + 3600
    assert service.fire_due(T0 + 3600) == 0  # nothing is due twice


def test_a_new_schedule_does_not_fire_for_earlier_ticks(
    app: Tactician, service: ScheduleService
) -> None:
    save(service, last_tick=None, every=10.0, overlap="allow_all", catchup_window=3600.0)
    created = row(app).last_tick
    assert created is not None
    service.fire_due(created + 25)
    assert ticks(app) and all(t > created for t in ticks(app))


def test_backfill_is_one_task_per_tick_and_idempotent(
    app: Tactician, service: ScheduleService
) -> None:
    save(service, every=3600.0, overlap="skip", paused=True)
    first = service.backfill(NAME, T0, T0 + 5 * 3600)
    assert len(first) == len(set(first)) == 6
    again = service.backfill(NAME, T0, T0 + 5 * 3600)
    assert again == first
    wider = service.backfill(NAME, T0 - 3600, T0 + 3600)
    assert wider[1:] == first[:2]
    tasks = scheduled(app)
    assert len(tasks) == 7
    assert sorted(t.idempotency_key for t in tasks) == sorted(
        tick_key(NAME, T0 + 3600 * k) for k in range(-1, 6)
    )
    with pytest.raises(InvalidSchedule):
        service.backfill("nope", T0, T0 + 10)
    with pytest.raises(InvalidSchedule):
        service.backfill(NAME, T0 + 10, T0)


def test_backfill_reuses_a_tick_the_planner_fired(app: Tactician, service: ScheduleService) -> None:
    save(service, every=10.0, overlap="allow_all")
    service.fire_due(T0 + 20)
    fired = {t.release_at: t.id for t in scheduled(app)}
    ids = service.backfill(NAME, T0 + 10, T0 + 30)
    assert ids[:2] == [fired[T0 + 10], fired[T0 + 20]]
    assert len(scheduled(app)) == 3


@pytest.mark.parametrize(
    ("last_tick", "now", "expected"),
    [
        (  # summer time starts on 2026-03-29: 09:00 CET is 08:00Z, then 09:00 CEST is 07:00Z
            "2026-03-27T12:00+00:00",
            "2026-03-31T12:00+00:00",
            ["2026-03-28T08:00", "2026-03-29T07:00", "2026-03-30T07:00", "2026-03-31T07:00"],
        ),
        (  # and ends on 2026-10-25
            "2026-10-23T12:00+00:00",
            "2026-10-27T12:00+00:00",
            ["2026-10-24T07:00", "2026-10-25T08:00", "2026-10-26T08:00", "2026-10-27T08:00"],
        ),
    ],
)
def test_cron_in_a_time_zone_fires_at_the_right_utc_instants(
    app: Tactician, service: ScheduleService, last_tick: str, now: str, expected: list[str]
) -> None:
    save(
        service,
        last_tick=utc(last_tick),
        every=None,
        cron="0 9 * * *",
        timezone="Europe/Paris",
        catchup_window=7 * 86_400.0,
        overlap="allow_all",
    )
    assert service.fire_due(utc(now)) == len(expected)
    assert ticks(app) == [utc(f"{e}+00:00") for e in expected]
