"""KPIs over time for the console: SLA adherence, missed deadlines, queue depth and manual
interventions per time bucket, computed from the store and drawn as inline SVG by the template
(no script, so the console's Content-Security-Policy holds)."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from tactician.domain import Task, TaskState
from tactician.govern.audit import AuditRecord
from tactician.store.base import INTERVENTIONS
from tactician.store.protocol import Store, TaskFilter

OPEN_STATES = ("running", "leased", "ready", "retry_wait", "pending", "awaiting_approval", "held")
RUNNING_LOOKUPS = 200
"""Running tasks whose attempt is looked up for its start time, at most."""
KPI_WINDOWS = {"15m": 900.0, "1h": 3600.0, "6h": 6 * 3600.0, "24h": 24 * 3600.0}
"""The spans the KPI page offers; a span is shortened to the data it holds."""
KPI_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
"""Bucket widths in seconds: the smallest that keeps a chart within KPI_BUCKETS bars."""
KPI_BUCKETS = 60
KPI_TASKS = 50_000
"""Tasks read at most for the KPI charts (a page says so when it hit this)."""
ENDED = ("succeeded", "dead", "expired")
"""Ends that count for SLA adherence: an operator's cancel or reject is not the scheduler's."""
WITHDRAWN = ("cancelled", "rejected", "merged")


@dataclass(frozen=True)
class KpiData:
    """What the KPI charts are computed from, read from the store once per page."""

    tasks: list[Task]
    started: dict[str, float]
    """Task id → when its first attempt started."""
    interventions: list[AuditRecord]
    capped: bool = False


def _first_starts(store: Store, since: float, running: list[Task]) -> dict[str, float]:
    started: dict[str, float] = {}
    for outcome in store.outcomes(since=since):
        if outcome.task_id not in started or outcome.started_at < started[outcome.task_id]:
            started[outcome.task_id] = outcome.started_at
    for task in running[:RUNNING_LOOKUPS]:  # no outcome yet: its attempt in flight says when
        attempts = store.attempts(task.id)
        if attempts and task.id not in started:
            started[task.id] = min(a.started_at for a in attempts)
    return started


def kpi_data(store: Store, since: float) -> KpiData:
    """Tasks created since `since` (by their time-sortable ids) and tasks still open from
    before, when each first started, and the manual interventions since `since`."""
    tasks: dict[str, Task] = {}
    after = f"{max(0, int(since * 1000)):012x}"  # an id begins with its creation in ms
    capped = False
    while True:
        page = store.list_tasks(TaskFilter(limit=10_000, after_id=after))
        tasks.update((t.id, t) for t in page)
        if len(page) < 10_000:
            break
        if len(tasks) >= KPI_TASKS:
            capped = True
            break
        after = page[-1].id
    for state in OPEN_STATES:
        for task in store.list_tasks(TaskFilter(state=state, limit=10_000)):
            tasks.setdefault(task.id, task)
    running = [t for t in tasks.values() if t.state is TaskState.RUNNING]
    records = [r for r in store.audit_records(since=since) if r.action in INTERVENTIONS]
    return KpiData(list(tasks.values()), _first_starts(store, since, running), records, capped)


@dataclass(frozen=True)
class Buckets:
    start: float
    step: float
    count: int
    now: float

    @classmethod
    def spanning(cls, first: float, now: float) -> Buckets:
        first = min(first, now - 60.0)  # at least a minute, so a fresh database has an axis
        span = now - first
        step = next((s for s in KPI_STEPS if span / s <= KPI_BUCKETS), KPI_STEPS[-1])
        start = math.floor(first / step) * step
        return cls(start, float(step), max(1, math.ceil((now - start) / step)), now)

    def index(self, at: float) -> int | None:
        i = math.floor((at - self.start) / self.step)
        return i if 0 <= i < self.count else None

    def ends(self) -> list[float]:
        return [min(self.start + (i + 1) * self.step, self.now) for i in range(self.count)]


@dataclass(frozen=True)
class KpiSeries:
    key: str
    title: str
    description: str
    values: list[float | None]
    """One per bucket; None where there is nothing to measure."""
    unit: str = ""
    kind: str = "bars"
    """bars | line"""
    notes: list[str] = field(default_factory=list)
    """A tooltip per bucket beside its value (e.g. the interventions by action)."""


def _met(task: Task) -> bool:
    """Finished (succeeded, or withdrawn by a person) by its deadline."""
    return (
        task.due_at is not None
        and task.finished_at is not None
        and task.finished_at <= task.due_at
        and task.state.value in ("succeeded", *WITHDRAWN)
    )


def kpi_series(data: KpiData, buckets: Buckets) -> list[KpiSeries]:
    """SLA adherence, missed deadlines, queue depth and manual interventions per bucket."""
    n = buckets.count
    ended, met = [0] * n, [0] * n
    missed = [0] * n
    for task in data.tasks:
        if task.due_at is None:
            continue
        if task.state.value in ENDED and task.finished_at is not None:
            i = buckets.index(task.finished_at)
            if i is not None:
                ended[i] += 1
                met[i] += _met(task)
        if task.due_at <= buckets.now and not _met(task):
            if task.state.value in WITHDRAWN and (task.finished_at or math.inf) <= task.due_at:
                continue
            i = buckets.index(task.due_at)
            if i is not None:
                missed[i] += 1
    # Waiting: released and not yet started (approvals and holds included), or withdrawn.
    opened, closed = [], []
    for task in data.tasks:
        begin = max(task.created_at, task.release_at)
        end = data.started.get(task.id)
        if end is None and task.state.is_final:
            end = task.finished_at
        if end is None and task.state is TaskState.RUNNING:
            continue  # started before what was read: never seen waiting
        end = math.inf if end is None else end
        if end > begin:
            opened.append(begin)
            closed.append(end)
    opened.sort()
    closed.sort()
    depth: list[float | None] = [
        float(bisect.bisect_right(opened, t) - bisect.bisect_right(closed, t))
        for t in buckets.ends()
    ]
    acts: list[dict[str, int]] = [{} for _ in range(n)]
    for record in data.interventions:
        i = buckets.index(record.at)
        if i is not None:
            acts[i][record.action] = acts[i].get(record.action, 0) + 1
    return [
        KpiSeries(
            "sla",
            "SLA adherence",
            "Share of tasks with a deadline that ended in each interval and met it.",
            [100.0 * m / e if e else None for m, e in zip(met, ended, strict=True)],
            unit="%",
            kind="line",
            notes=[f"{m} of {e} on time" if e else "" for m, e in zip(met, ended, strict=True)],
        ),
        KpiSeries(
            "missed",
            "Missed deadlines",
            "Tasks whose deadline passed in each interval before they finished.",
            [float(m) for m in missed],
        ),
        KpiSeries(
            "depth",
            "Queue depth",
            "Tasks released and waiting to start (approvals and holds included), "
            "at the end of each interval.",
            depth,
            kind="line",
        ),
        KpiSeries(
            "interventions",
            "Manual interventions",
            "Overrides, holds, releases, cancels, retries, reprioritisations and approval votes "
            "in the audit chain.",
            [float(sum(a.values())) for a in acts],
            notes=[", ".join(f"{k} {v}" for k, v in sorted(a.items())) for a in acts],
        ),
    ]


CHART_W, CHART_H = 560.0, 180.0
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 40.0, 10.0, 10.0, 24.0


def _nice_ceiling(value: float) -> float:
    """The next of 2, 4, 6, 8, 10, 20, 40, … at or above `value` (halves stay integers)."""
    if value <= 2:
        return 2.0
    scale = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 4, 6, 8, 10):
        if m * scale >= value and (m > 1 or scale >= 10):
            return float(m * scale)
    return float(10 * scale)


def _clock(ts: float, step: float) -> str:
    import datetime as dt

    fmt = "%H:%M:%S" if step < 60 else "%H:%M"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime(fmt)


def _number(value: float, unit: str) -> str:
    return f"{value:.0f}{unit}" if unit == "%" or value == int(value) else f"{value:.1f}{unit}"


def chart(series: KpiSeries, buckets: Buckets) -> dict[str, Any]:
    """The SVG geometry of one series (drawn by the template: no script, no inline style)."""
    width = CHART_W - PLOT_LEFT - PLOT_RIGHT
    height = CHART_H - PLOT_TOP - PLOT_BOTTOM
    present = [v for v in series.values if v is not None]
    top = 100.0 if series.unit == "%" else _nice_ceiling(max(present, default=0.0))
    slot = width / buckets.count

    def x(i: int) -> float:
        return round(PLOT_LEFT + (i + 0.5) * slot, 1)

    def y(value: float) -> float:
        return round(PLOT_TOP + height * (1 - value / top), 1)

    marks = []
    for i, value in enumerate(series.values):
        if value is None:
            continue
        at = buckets.start + i * buckets.step
        note = series.notes[i] if i < len(series.notes) and series.notes[i] else ""
        label = f"{_clock(at, buckets.step)} UTC: {_number(value, series.unit)}"
        marks.append(
            {
                "x": x(i),
                "y": y(value),
                "left": round(PLOT_LEFT + i * slot + slot * 0.15, 1),
                "width": round(max(slot * 0.7, 1.0), 1),
                "height": round(PLOT_TOP + height - y(value), 1),
                "label": f"{label} ({note})" if note else label,
            }
        )
    lines: list[str] = []
    run: list[str] = []
    for i, value in enumerate(series.values):  # a gap in the data is a gap in the line
        if value is None:
            if run:
                lines.append(" ".join(run))
            run = []
        else:
            run.append(f"{x(i)},{y(value)}")
    if run:
        lines.append(" ".join(run))
    ticks = max(1, min(5, buckets.count))
    last = buckets.count - 1
    x_ticks = [  # the last label ends at its point, so it stays inside the chart
        {
            "x": x(i),
            "label": _clock(buckets.start + i * buckets.step, buckets.step),
            "anchor": "end" if i == last and last > 0 else "middle",
        }
        for i in sorted({round(k * last / max(1, ticks - 1)) for k in range(ticks)})
    ]
    y_ticks = [{"y": y(v), "label": _number(v, series.unit)} for v in (0.0, top / 2, top)]
    latest = next((v for v in reversed(series.values) if v is not None), None)
    if series.key in ("missed", "interventions"):
        headline = f"{sum(present):.0f} in all"
    else:
        headline = "no data yet" if latest is None else f"now {_number(latest, series.unit)}"
    return {
        "series": series,
        "width": CHART_W,
        "height": CHART_H,
        "plot": {"left": PLOT_LEFT, "right": CHART_W - PLOT_RIGHT, "bottom": PLOT_TOP + height},
        "marks": marks,
        "lines": lines,
        "x_ticks": x_ticks,
        "y_ticks": y_ticks,
        "headline": headline,
    }


def kpi_page(store: Store, window: str, now: float) -> dict[str, Any]:
    """The KPI charts over `window` (shortened to the data's span)."""
    span = KPI_WINDOWS.get(window, KPI_WINDOWS["1h"])
    since = now - span
    data = kpi_data(store, since)
    times = [t.created_at for t in data.tasks if t.created_at >= since]
    times += [r.at for r in data.interventions]
    buckets = Buckets.spanning(min(times, default=now - 60.0), now)
    charts = [chart(s, buckets) for s in kpi_series(data, buckets)]
    step = buckets.step
    every = f"{step / 60:g} min" if step >= 60 else f"{step:g} s"
    return {
        "charts": charts,
        "window": window if window in KPI_WINDOWS else "1h",
        "windows": list(KPI_WINDOWS),
        "every": every,
        "capped": data.capped,
        "tasks_read": len(data.tasks),
    }
