"""Firing schedules: the active planner turns due ticks into tasks.

Each tick's task carries the idempotency key `tick_key(name, tick)`, so a tick creates exactly
one task even when two planners fire it (on PostgreSQL, during a failover).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from tactician.domain import KindSpec, NewTask
from tactician.errors import Conflict, InvalidSchedule, UnknownKind
from tactician.govern.roles import SYSTEM, Actor
from tactician.plan.schedules import (
    ScheduleSpec,
    backfill_ticks,
    due_ticks,
    fire_at,
    overlap_action,
    tick_key,
)
from tactician.store.protocol import ScheduleRow, Store

log = logging.getLogger("tactician.schedules")


class KindSource(Protocol):
    def known_kinds(self) -> Mapping[str, KindSpec]: ...


def spec_from_row(row: ScheduleRow) -> ScheduleSpec:
    return ScheduleSpec(**{**row.spec, "paused": row.paused})


class ScheduleService:
    def __init__(self, store: Store, kinds: KindSource) -> None:
        self.store = store
        self.kind_source = kinds

    def save(self, spec: ScheduleSpec) -> None:
        if spec.kind not in self.kind_source.known_kinds():
            raise UnknownKind(f"schedule {spec.name}: unknown kind {spec.kind!r}")
        self.store.save_schedule(spec.name, dataclasses.asdict(spec), spec.paused)

    def fire_due(self, now: float) -> int:
        """Create the tasks of every due tick; returns how many ticks fired."""
        rows = self.store.schedules()
        if not rows:
            return 0
        kinds = self.kind_source.known_kinds()
        fired = 0
        for row in rows:
            try:
                fired += self._fire(row, now, kinds)
            except (InvalidSchedule, UnknownKind, Conflict) as exc:
                log.error("schedule %s cannot fire: %s", row.name, exc)
        return fired

    def _fire(self, row: ScheduleRow, now: float, kinds: Mapping[str, KindSpec]) -> int:
        spec = spec_from_row(row)
        due = due_ticks(spec, row.last_tick, now)
        buffered = row.buffered_tick
        fired = 0
        # A paused schedule starts nothing; its buffered tick waits for the resume.
        if (
            buffered is not None
            and not spec.paused
            and not self.store.schedule_unfinished(spec.name)
        ):
            self._start(spec, buffered, kinds)
            buffered, fired = None, 1
        for tick in due.fire:
            unfinished = self.store.schedule_unfinished(spec.name)
            action = overlap_action(spec.overlap, len(unfinished), int(buffered is not None))
            if action == "skip":
                log.info(
                    "schedule %s: tick %.0f skipped (previous run unfinished)", spec.name, tick
                )
                continue
            if action == "buffer":
                buffered = tick
                continue
            if action == "cancel_running_then_start":
                for task_id in unfinished:
                    with contextlib.suppress(Conflict):  # it finished since it was listed
                        self.store.cancel(task_id)
            self._start(spec, tick, kinds)
            fired += 1
        if due.skipped:
            log.warning(
                "schedule %s: %d ticks older than the catch-up window were skipped",
                spec.name,
                due.skipped,
            )
        if due.last_tick != row.last_tick or buffered != row.buffered_tick:
            self.store.advance_schedule(spec.name, due.last_tick, buffered)
        return fired

    def _start(self, spec: ScheduleSpec, tick: float, kinds: Mapping[str, KindSpec]) -> str:
        return self.store.submit([self._task(spec, tick)], kinds)[0]

    def _task(self, spec: ScheduleSpec, tick: float) -> NewTask:
        payload: dict[str, Any] = {**spec.payload}
        return NewTask(
            kind=spec.kind,
            payload=payload,
            release_at=fire_at(spec, tick),
            idempotency_key=tick_key(spec.name, tick),
            source=f"schedule:{spec.name}",
            schedule=spec.name,
        )

    def backfill(self, name: str, start: float, end: float, actor: Actor = SYSTEM) -> list[str]:
        """One task per nominal tick in [start, end], whatever the overlap policy says."""
        rows = {row.name: row for row in self.store.schedules()}
        if name not in rows:
            raise InvalidSchedule(f"no schedule is named {name!r}")
        spec = spec_from_row(rows[name])
        ticks = backfill_ticks(spec, start, end)
        tasks = [dataclasses.replace(self._task(spec, t), release_at=None) for t in ticks]
        return self.store.submit(tasks, self.kind_source.known_kinds(), actor=actor)
