"""The KPI report: what the scheduler achieved over a window, from the store, as Markdown and HTML
with PNG charts (`tactician report --since 7d`).

    report.md, report.html   summary, definitions, tables by kind, action, tier and bucket
    sla.png                  SLA adherence per bucket
    missed.png               missed deadlines per bucket, by kind
    interventions.png        manual interventions per bucket, by action
    queue.png                queue depth at each bucket edge, and its peak in each bucket
    tiers.png                start decisions per bucket, by decision tier

Drift events (`drift.detected`, `drift.fallback`, `drift.cleared` in the audit chain) are listed
and marked on every chart's time axis. The definitions, stated in the report as well:

- SLA adherence: of the tasks with a deadline that ended in the bucket by running (succeeded,
  dead or expired), the share that succeeded by the deadline. A task a person withdrew
  (cancelled, rejected, merged) is left out, as on the console's KPI page.
- Missed deadline: counted in the bucket where the deadline fell, when the task had not
  succeeded by then and had not been withdrawn before it (including tasks still waiting).
- Manual intervention: an audit record of one of the actions `metrics_snapshot` counts
  (`tactician.store.base.INTERVENTIONS`, passed in by the caller) by a person.
- Queue depth: tasks submitted and not yet started (first attempt), waiting for approval or
  held included; a task that ended without starting leaves then. At each bucket edge, and the
  most at any moment of each bucket.
- Decision tiers: each start in a `task.granted` record, by what ranked it: an operator's
  override (pin, run now) in force at that moment, tier-2 LLM advice (when the grant records
  it), the drift fallback's heuristic, the A/B experiment's bundle, a learned model, or a
  heuristic scorer.

Charts use matplotlib's object-oriented API on an Agg canvas, in the simulation report's style
(`tactician.sim.report`): no pyplot, no "Software" entry, so the same data writes the same bytes.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jinja2
import matplotlib.dates as mdates
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tactician.errors import InvalidInput
from tactician.govern.audit import AuditRecord
from tactician.observe.drift import DRIFT_ACTIONS
from tactician.store.reports import Grant, Grid, ReportStore, Waits

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SLA_PNG = "sla.png"
MISSED_PNG = "missed.png"
INTERVENTIONS_PNG = "interventions.png"
QUEUE_PNG = "queue.png"
TIERS_PNG = "tiers.png"
FORMATS = ("md", "html", "both")
FIGSIZE = (9.0, 4.0)
DPI = 110
STACKED = 6
"""Kinds or actions drawn apart in a stacked chart; the rest are drawn as "other"."""
PALETTE = ("tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
"""Bar colours: none of the drift marks' red, orange and green."""
OTHER_COLOR = "tab:gray"

OVERRIDE_ACTIONS = ("override.set", "override.cleared", "override.expired")
RUN_ENDS = ("succeeded", "dead", "expired")
"""Ends the scheduler owns: the base of SLA adherence and of the success rate."""
DRIFT_COLORS = {"drift.detected": "tab:red", "drift.fallback": "tab:orange"}
DRIFT_COLORS["drift.cleared"] = "tab:green"

HUMAN = "human override"
LLM = "tier 2: LLM"
FALLBACK = "tier 1: drift fallback"
EXPERIMENT = "tier 1: experiment"
MODEL = "tier 1: model"
HEURISTIC = "tier 1: heuristic"
TIERS = (HUMAN, LLM, FALLBACK, EXPERIMENT, MODEL, HEURISTIC)
TIER_COLORS = dict(zip(reversed(TIERS), PALETTE, strict=True))

BUCKET_STEPS = (
    (15 * 60.0, 60.0),
    (3 * 3600.0, 300.0),
    (12 * 3600.0, 900.0),
    (2 * 86400.0, 3600.0),
    (92 * 86400.0, 86400.0),
    (2 * 365 * 86400.0, 7 * 86400.0),
)
"""(longest window, bucket): hourly up to two days, daily up to a quarter, then weekly."""
MONTH = 30 * 86400.0
STEP_NAMES = {60.0: "1 minute", 300.0: "5 minutes", 900.0: "15 minutes", 3600.0: "1 hour"}
STEP_NAMES |= {86400.0: "1 day", 7 * 86400.0: "1 week", MONTH: "30 days"}


def grid_for(since: float, until: float) -> Grid:
    """The window cut in buckets aligned to the clock (whole minutes, hours, UTC days)."""
    span = until - since
    step = next((s for longest, s in BUCKET_STEPS if span <= longest), MONTH)
    return Grid(float(since), float(until), math.floor(since / step) * step, step)


# --- gathering -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftMark:
    at: float
    action: str
    actor: str
    signal: str
    detector: str
    text: str


@dataclass(frozen=True)
class KpiReport:
    grid: Grid
    generated_at: float
    database: str
    ended: list[Counter[str]]
    """Per bucket: final state → tasks that reached it."""
    due: list[int]
    """Per bucket: tasks with a deadline that ended by running (the SLA's base)."""
    met: list[int]
    missed: list[Counter[str]]
    """Per bucket: kind → deadlines missed."""
    missed_states: dict[str, Counter[str]]
    """Kind → what became of its missed tasks (state now) over the window."""
    interventions: list[Counter[str]]
    queue: list[int]
    """Queue depth at the window's start, then at each bucket's end."""
    queue_peak: list[int]
    """Per bucket: the most tasks waiting at any moment of it."""
    tiers: list[Counter[str]]
    rankers: Counter[tuple[str, str, str]]
    """(tier, scorer, model) → starts: what ranked the tier-1 starts."""
    tier2_recorded: bool
    waits: Waits
    drift: list[DriftMark] = field(default_factory=list)

    @property
    def has_data(self) -> bool:
        return bool(
            any(self.ended)
            or any(self.missed)
            or any(self.interventions)
            or any(self.queue_peak)
            or any(self.tiers)
            or self.drift
        )

    def summary(self) -> dict[str, Any]:
        ended = _total(self.ended)
        ran = sum(ended[s] for s in RUN_ENDS)
        due, met = sum(self.due), sum(self.met)
        return {
            "since": self.grid.since,
            "until": self.grid.until,
            "bucket_s": self.grid.step,
            "tasks_ended": sum(ended.values()),
            "ended_by_state": dict(sorted(ended.items())),
            "succeeded": ended["succeeded"],
            "success_rate": ended["succeeded"] / ran if ran else None,
            "with_deadline": due,
            "on_time": met,
            "sla_adherence": met / due if due else None,
            "missed_deadlines": sum(sum(c.values()) for c in self.missed),
            "manual_interventions": sum(sum(c.values()) for c in self.interventions),
            "wait_p50_s": self.waits.p50,
            "wait_p95_s": self.waits.p95,
            "starts_by_tier": {t: n for t, n in _total(self.tiers).items() if n},
            "tier2_recorded": self.tier2_recorded,
            "drift_events": len(self.drift),
        }


def _total(counters: Iterable[Counter[str]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for counter in counters:
        total.update(counter)
    return total


def gather(
    store: ReportStore,
    since: float,
    until: float,
    interventions: Sequence[str],
    database: str = "",
) -> KpiReport:
    """Read the window's series from the store. `interventions` are the audit actions a person
    takes that count as manual interventions (the store's `INTERVENTIONS`)."""
    grid = grid_for(since, until)
    now = store.db_now()
    n = grid.count
    ended: list[Counter[str]] = [Counter() for _ in range(n)]
    due, met = [0] * n, [0] * n
    for row in store.report_ended(grid):
        ended[row.bucket][row.state] += row.tasks
        if row.state in RUN_ENDS:
            due[row.bucket] += row.with_deadline
            if row.state == "succeeded":
                met[row.bucket] += row.by_deadline
    missed: list[Counter[str]] = [Counter() for _ in range(n)]
    missed_states: dict[str, Counter[str]] = {}
    for m in store.report_missed(grid, now):
        missed[m.bucket][m.kind] += m.tasks
        missed_states.setdefault(m.kind, Counter())[m.state] += m.tasks
    acts: list[Counter[str]] = [Counter() for _ in range(n)]
    for action in store.report_actions(grid, interventions, people_only=True):
        acts[action.bucket][action.key] += action.records
    counts = store.report_queue(grid)
    queue, peak = [counts.waiting_at_start], []
    for i in range(n):
        moved = counts.peak.get(i)  # relative to the start; None: nobody joined or left
        peak.append(queue[-1] if moved is None else max(queue[-1], queue[0] + moved))
        queue.append(queue[-1] + counts.change.get(i, 0))
    grants = store.report_grants(grid)
    tiers, rankers, recorded = _tiers(store, grid, grants)
    drift = [_drift_mark(r) for r in store.audit_between(grid.since, grid.until, DRIFT_ACTIONS)]
    return KpiReport(
        grid=grid,
        generated_at=now,
        database=_safe_url(database),
        ended=ended,
        due=due,
        met=met,
        missed=missed,
        missed_states=missed_states,
        interventions=acts,
        queue=queue,
        queue_peak=peak,
        tiers=tiers,
        rankers=rankers,
        tier2_recorded=recorded,
        waits=store.report_waits(grid),
        drift=drift,
    )


def _created(task_id: str) -> float | None:
    try:
        return int(task_id[:12], 16) / 1000.0
    except ValueError:
        return None


def _tiers(
    store: ReportStore, grid: Grid, grants: Sequence[Grant]
) -> tuple[list[Counter[str]], Counter[tuple[str, str, str]], bool]:
    """Starts per bucket by tier; which scorer and model ranked them; whether any grant in the
    window recorded tier 2 (the `advised` list: without it, tier 2 is unknown, not zero)."""
    tiers: list[Counter[str]] = [Counter() for _ in range(grid.count)]
    rankers: Counter[tuple[str, str, str]] = Counter()
    started = [str(t) for g in grants for t in g.detail.get("tasks", [])]
    # An override in force at a start was set after its task was created.
    created = [c for c in map(_created, started) if c is not None]
    since = min([*created, grid.since])
    overrides: dict[str, list[tuple[float, str, bool]]] = {}
    for record in store.audit_between(since, grid.until, OVERRIDE_ACTIONS):
        what = str(record.details.get("what", ""))
        on = record.action == "override.set"
        overrides.setdefault(record.subject, []).append((record.at, what, on))
    recorded = False
    for grant in grants:
        i = grid.index(grant.at)
        if i is None:
            continue
        detail = grant.detail
        recorded = recorded or "advised" in detail
        advised = set(map(str, detail.get("advised", ())))
        trial = set(map(str, detail.get("experiment_tasks", ())))
        scorer = str(detail.get("scorer") or "not recorded")
        model = str(detail.get("model") or "none")
        for task in map(str, detail.get("tasks", ())):
            if _overridden(overrides.get(task, ()), grant.at):
                tier = HUMAN
            elif task in advised:
                tier = LLM
            elif detail.get("fallback"):
                tier = FALLBACK
            elif task in trial:
                tier = EXPERIMENT
            elif scorer == "learned" and detail.get("model"):
                tier = MODEL
            else:
                tier = HEURISTIC
            tiers[i][tier] += 1
            if tier not in (HUMAN, LLM):
                ranked_by = str(detail.get("experiment")) if tier == EXPERIMENT else scorer
                rankers[(tier, ranked_by, model)] += 1
    return tiers, rankers, recorded


def _overridden(changes: Iterable[tuple[float, str, bool]], at: float) -> bool:
    """Whether an override (of any kind) was in force at `at`."""
    state: dict[str, bool] = {}
    for when, what, on in changes:
        if when <= at:
            state[what] = on
    return any(state.values())


def _drift_mark(record: AuditRecord) -> DriftMark:
    detail = record.details
    return DriftMark(
        at=record.at,
        action=record.action,
        actor=record.actor,
        signal=str(detail.get("signal") or record.subject),
        detector=str(detail.get("detector") or ""),
        text=str(detail.get("text") or detail.get("reason") or ""),
    )


def _safe_url(url: str) -> str:
    """The database URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


# --- charts ----------------------------------------------------------------------------------


def _x(at: float) -> float:
    # matplotlib.dates has no type hints (hence the ignores in this part).
    return float(mdates.date2num(dt.datetime.fromtimestamp(at, dt.UTC)))  # type: ignore[no-untyped-call]


def _axes(title: str, ylabel: str, report: KpiReport) -> tuple[Figure, Axes]:
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel("time (UTC)")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    locator = mdates.AutoDateLocator(tz=dt.UTC)  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_locator(locator)
    formatter = mdates.ConciseDateFormatter(locator, tz=dt.UTC)  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_formatter(formatter)
    axes.set_xlim(_x(report.grid.since), _x(report.grid.until))
    return figure, axes


def _save(figure: Figure, axes: Axes, report: KpiReport, path: Path) -> Path:
    seen: set[str] = set()
    for mark in report.drift:  # every chart shows when drift was detected, engaged, cleared
        label = mark.action.replace(".", " ")
        axes.axvline(
            _x(mark.at),
            color=DRIFT_COLORS.get(mark.action, "tab:purple"),
            linestyle="--",
            linewidth=1.2,
            label=None if label in seen else label,
        )
        seen.add(label)
    if axes.get_legend_handles_labels()[0]:
        # Outside the axes on the right: it can never hide a bar.
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    figure.savefig(path, dpi=DPI, metadata={"Software": None})
    figure.clear()
    return path


def _stacked(
    axes: Axes,
    report: KpiReport,
    per_bucket: Sequence[Counter[str]],
    colors: Mapping[str, str] | None = None,
) -> None:
    """Bars per bucket, one colour per key: the keys of `colors` in its order, or else the
    biggest STACKED keys, the rest drawn as other."""
    total = _total(per_bucket)
    if colors is not None:
        keys = [k for k in colors if total[k]]
    else:
        keys = [k for k, _ in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))]
        colors = dict(zip(keys[:STACKED], PALETTE, strict=False))
    shown, rest = keys[:STACKED], set(keys[STACKED:])
    grid = report.grid
    lefts = [_x(grid.start(i)) for i in range(grid.count)]
    widths = [_x(grid.end(i)) - _x(grid.start(i)) for i in range(grid.count)]
    bottom = [0.0] * grid.count
    series = [(k, [float(c[k]) for c in per_bucket]) for k in shown]
    if rest:
        series.append(("other", [float(sum(c[k] for k in rest)) for c in per_bucket]))
    for key, heights in series:
        axes.bar(
            lefts,
            heights,
            width=widths,
            bottom=bottom,
            align="edge",
            color=colors.get(key, OTHER_COLOR),
            edgecolor="white",
            linewidth=0.5,
            label=key,
        )
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.set_ylim(0, max(1.0, max(bottom, default=0.0)) * 1.1)
    if not total:
        _empty(axes, "none in this window")


def _empty(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center", color="0.4")


def write_charts(report: KpiReport, directory: Path) -> list[Path]:
    grid = report.grid
    written = []
    figure, axes = _axes("SLA adherence (ran to an end with a deadline, met it)", "%", report)
    shares = [
        (i, 100.0 * m / d) for i, (m, d) in enumerate(zip(report.met, report.due, strict=True)) if d
    ]
    axes.bar(
        [_x(grid.start(i)) for i, _ in shares],
        [share for _, share in shares],
        width=[_x(grid.end(i)) - _x(grid.start(i)) for i, _ in shares],
        align="edge",
        color=PALETTE[0],
        edgecolor="white",
        linewidth=0.5,
    )
    due = sum(report.due)
    if due:
        overall = 100.0 * sum(report.met) / due
        axes.axhline(overall, color="0.3", linewidth=1.0, label=f"window {overall:.1f} %")
    else:
        _empty(axes, "no task with a deadline ended in this window")
    axes.set_ylim(0, 105)
    written.append(_save(figure, axes, report, directory / SLA_PNG))

    figure, axes = _axes("Missed deadlines (counted when the deadline fell)", "tasks", report)
    _stacked(axes, report, report.missed)
    written.append(_save(figure, axes, report, directory / MISSED_PNG))

    figure, axes = _axes("Manual interventions", "audit records", report)
    _stacked(axes, report, report.interventions)
    written.append(_save(figure, axes, report, directory / INTERVENTIONS_PNG))

    figure, axes = _axes("Queue depth (submitted, not yet started)", "tasks", report)
    axes.bar(
        [_x(grid.start(i)) for i in range(grid.count)],
        report.queue_peak,
        width=[_x(grid.end(i)) - _x(grid.start(i)) for i in range(grid.count)],
        align="edge",
        color=PALETTE[0],
        alpha=0.3,
        edgecolor="white",
        linewidth=0.5,
        label="most in the bucket",
    )
    edges = [grid.since, *(grid.end(i) for i in range(grid.count))]
    axes.plot(
        [_x(t) for t in edges],
        report.queue,
        color=PALETTE[0],
        linewidth=1.4,
        marker=".",
        label="at the bucket edges",
    )
    axes.set_ylim(0, max(1.0, *report.queue_peak, *report.queue) * 1.1)
    written.append(_save(figure, axes, report, directory / QUEUE_PNG))

    figure, axes = _axes("Start decisions by tier", "tasks started", report)
    _stacked(axes, report, report.tiers, TIER_COLORS)
    written.append(_save(figure, axes, report, directory / TIERS_PNG))
    return written


# --- the document ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]


@dataclass(frozen=True)
class Section:
    title: str
    paragraphs: tuple[str, ...] = ()
    chart: str | None = None
    tables: tuple[Table, ...] = ()


def _when(at: float, seconds: bool = False) -> str:
    fmt = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime(fmt) + " UTC"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _share(part: int, whole: int) -> str:
    return "—" if not whole else f"{100.0 * part / whole:.1f} %"


def _listing(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none"


def sections(report: KpiReport) -> list[Section]:
    """The report's content, rendered as Markdown or HTML alike."""
    s = report.summary()
    grid = report.grid
    window = (
        f"Window {_when(grid.since)} to {_when(grid.until)} "
        f"({_duration(grid.until - grid.since)}), in buckets of "
        f"{STEP_NAMES.get(grid.step, _duration(grid.step))} "
        "(the first and last cut by the window)."
    )
    source = f"From {report.database}, " if report.database else "From the store, "
    intro = (window, source + f"read at {_when(report.generated_at, seconds=True)}.")
    if not report.has_data:
        empty = (
            "No data in this window: no task ended or waited, no deadline fell due, no start "
            "was decided, and no manual intervention or drift event was recorded."
        )
        return [Section("Tactician KPI report", (*intro, empty))]
    tiers = _total(report.tiers)
    starts = sum(tiers.values())
    tier_text = _listing({t: tiers[t] for t in TIERS})
    if not report.tier2_recorded:
        tier_text += "; tier 2 not recorded"
    drift_counts = Counter(m.action.removeprefix("drift.") for m in report.drift)
    queue = report.queue
    ran = sum(s["ended_by_state"].get(x, 0) for x in RUN_ENDS)
    summary = Table(
        ("Measure", "Value"),
        [
            ("Tasks ended", f"{s['tasks_ended']} ({_listing(s['ended_by_state'])})"),
            (
                "Success rate",
                f"{_share(s['succeeded'], ran)} ({s['succeeded']} of {ran} that ran to an end)",
            ),
            (
                "SLA adherence",
                f"{_share(s['on_time'], s['with_deadline'])} ({s['on_time']} of "
                f"{s['with_deadline']} with a deadline met it)",
            ),
            ("Missed deadlines", str(s["missed_deadlines"])),
            ("Manual interventions", str(s["manual_interventions"])),
            (
                "Queue depth",
                f"{queue[0]} at the start, {queue[-1]} at the end, "
                f"at most {max(report.queue_peak)}",
            ),
            (
                "Wait p50 / p95",
                f"{_duration(s['wait_p50_s'])} / {_duration(s['wait_p95_s'])} "
                f"({report.waits.count} tasks that ended having started)",
            ),
            ("Starts decided", f"{starts} ({tier_text})"),
            (
                "Drift events",
                f"{len(report.drift)} ({_listing(dict(sorted(drift_counts.items())))})",
            ),
        ],
    )
    return [
        Section("Tactician KPI report", intro),
        Section("Summary", tables=(summary,)),
        Section(
            "SLA adherence",
            (
                "Of the tasks with a deadline that ended in each bucket by running (succeeded, "
                "dead or expired), the share that succeeded by their deadline. Tasks a person "
                "withdrew (cancelled, rejected, merged) are left out.",
            ),
            SLA_PNG,
        ),
        Section(
            "Missed deadlines",
            (
                "Counted in the bucket where the deadline fell, when the task had not succeeded "
                "by then and had not been withdrawn before it, tasks still waiting included.",
            ),
            MISSED_PNG,
            (_missed_table(report),),
        ),
        Section(
            "Manual interventions",
            (
                "Audit records of overrides, holds, releases, cancels, retries, "
                "reprioritisations and approval votes made by a person (the engine and "
                "ingestion sources left out), as the metrics count them.",
            ),
            INTERVENTIONS_PNG,
            (_counts_table("Action", _total(report.interventions)),),
        ),
        Section(
            "Queue depth",
            (
                "Tasks submitted and not yet started (their first attempt), waiting for approval "
                "or held included: the line at each bucket edge, the bars the most at any "
                "moment of the bucket. A task that ended without starting (cancelled, rejected, "
                "merged, expired, or dead with a dependency) leaves the queue then.",
            ),
            QUEUE_PNG,
        ),
        Section("Decision tiers", _tier_notes(report), TIERS_PNG, _tier_tables(report)),
        Section("Drift events", _drift_notes(report), tables=_drift_tables(report)),
        Section("By bucket", tables=(_bucket_table(report),)),
    ]


def _missed_table(report: KpiReport) -> Table:
    groups = (
        ("finished late", ("succeeded",)),
        ("failed", ("dead", "expired")),
        ("withdrawn after it", ("cancelled", "rejected", "merged")),
    )
    rows = []
    totals = {k: sum(c.values()) for k, c in report.missed_states.items()}
    for kind in sorted(totals, key=lambda k: (-totals[k], k)):
        states = report.missed_states[kind]
        grouped = [sum(states[s] for s in members) for _, members in groups]
        rows.append((kind, str(totals[kind]), *map(str, grouped), str(totals[kind] - sum(grouped))))
    headers = ("Kind", "Missed", *(name for name, _ in groups), "not ended yet")
    return Table(headers, rows or [("none", "0", "0", "0", "0", "0")])


def _counts_table(name: str, counts: Counter[str]) -> Table:
    rows = [(k, str(v)) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return Table((name, "Count"), rows or [("none", "0")])


def _tier_notes(report: KpiReport) -> tuple[str, ...]:
    notes = [
        "Each start a planning pass decided (its task.granted audit record), by what decided "
        "it: an operator's override (pin or run now) in force then, tier-2 LLM advice, the "
        "drift fallback's heuristic, the A/B experiment's bundle, a learned model, or a "
        "heuristic scorer."
    ]
    if not report.tier2_recorded:
        notes.append(
            "Tier 2 is not known for this window: no start in it recorded which tasks LLM "
            "advice moved, so those starts are counted under the tier 1 scorer that ranked "
            "them."
        )
    return tuple(notes)


def _tier_tables(report: KpiReport) -> tuple[Table, ...]:
    tiers = _total(report.tiers)
    starts = sum(tiers.values())
    rows = []
    for tier in TIERS:
        if tier == LLM and not report.tier2_recorded:
            rows.append((tier, "not recorded", "—"))
        elif tiers[tier]:
            rows.append((tier, str(tiers[tier]), _share(tiers[tier], starts)))
    by = [
        (tier, scorer, model, str(n))
        for (tier, scorer, model), n in sorted(report.rankers.items(), key=lambda kv: -kv[1])
    ]
    return (
        Table(("Tier", "Starts", "Share"), rows),
        Table(("Tier", "Scorer (or experiment)", "Model", "Starts"), by or [("none", "", "", "0")]),
    )


def _drift_notes(report: KpiReport) -> tuple[str, ...]:
    if not report.drift:
        return ("No drift was detected, engaged or cleared in this window.",)
    return (
        "From the audit chain; marked on every chart: red dashes where a drift was detected, "
        "orange where the fallback was engaged, green where an operator cleared it.",
    )


def _drift_tables(report: KpiReport) -> tuple[Table, ...]:
    if not report.drift:
        return ()
    rows = [
        (_when(m.at, seconds=True), m.action, m.signal, m.detector, m.text, m.actor)
        for m in report.drift
    ]
    return (Table(("Time", "Event", "Signal", "Detector", "What", "By"), rows),)


def _bucket_table(report: KpiReport) -> Table:
    grid = report.grid
    rows = []
    for i in range(grid.count):
        rows.append(
            (
                _when(grid.start(i)),
                str(sum(report.ended[i].values())),
                _share(report.met[i], report.due[i]),
                str(sum(report.missed[i].values())),
                str(sum(report.interventions[i].values())),
                str(report.queue[i + 1]),
                str(report.queue_peak[i]),
                _listing({t: report.tiers[i][t] for t in TIERS}),
            )
        )
    headers = (
        "Bucket",
        "Ended",
        "SLA",
        "Missed",
        "Interventions",
        "Queue at end",
        "Queue peak",
        "Starts",
    )
    return Table(headers, rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(parts: Sequence[Section]) -> str:
    lines: list[str] = []
    for n, part in enumerate(parts):
        lines += [f"{'#' if n == 0 else '##'} {part.title}", ""]
        for paragraph in part.paragraphs:
            lines += [paragraph, ""]
        if part.chart:
            lines += [f"![{part.title}]({part.chart})", ""]
        for table in part.tables:
            lines.append("| " + " | ".join(map(_cell, table.headers)) + " |")
            lines.append("|" + "---|" * len(table.headers))
            lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in table.rows]
            lines.append("")
    return "\n".join(lines)


_HTML = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ parts[0].title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
img { max-width: 100%; }
</style></head><body>
{% for part in parts %}
{% if loop.first %}
<h1>{{ part.title }}</h1>
{% else %}
<h2>{{ part.title }}</h2>
{% endif %}
{% for paragraph in part.paragraphs %}
<p>{{ paragraph }}</p>
{% endfor %}
{% if part.chart %}
<p><img src="{{ part.chart }}" alt="{{ part.title }}"></p>
{% endif %}
{% for table in part.tables %}
<table>
<thead><tr>{% for h in table.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in table.rows %}
<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
{% endfor %}
{% endfor %}
</body></html>
"""
)


def render_html(parts: Sequence[Section]) -> str:
    return _HTML.render(parts=parts)


def write_report(report: KpiReport, directory: Path, fmt: str = "both") -> list[Path]:
    """Write the report (Markdown, HTML or both) and its charts into `directory` (created);
    returns every file written. A window without data gets a report that says so, no charts."""
    if fmt not in FORMATS:
        raise InvalidInput(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot write the report into {directory}: {exc.strerror}") from None
    parts = sections(report)
    written = write_charts(report, directory) if report.has_data else []
    if fmt in ("md", "both"):
        written.append(directory / REPORT_MD)
        written[-1].write_text(render_markdown(parts), encoding="utf-8")
    if fmt in ("html", "both"):
        written.append(directory / REPORT_HTML)
        written[-1].write_text(render_html(parts), encoding="utf-8")
    return written
