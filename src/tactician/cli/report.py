"""`tactician report`: the KPI report of a window, as Markdown and HTML with PNG charts.

    tactician report --since 7d --out kpi/
    tactician report --since 2024-05-01T00:00Z --until 2024-05-02T00:00Z --format md

The store is only read. matplotlib waits until the command runs, so `tactician --help` stays fast.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from tactician.cli.govern import parse_time
from tactician.errors import InvalidInput
from tactician.settings import Settings

DURATION = re.compile(r"\d+(?:\.\d+)?[smhdw]")


def register(cli: typer.Typer) -> None:
    cli.command("report")(report)


def parse_when(text: str, name: str, now: float) -> float:
    """A duration back from `now` (30m, 12h, 7d, 2w) or any time `parse_time` reads."""
    text = text.strip()
    when = parse_time(f"-{text}" if DURATION.fullmatch(text) else text, name, now)
    assert when is not None
    return when


def report(
    since: Annotated[
        str,
        typer.Option(
            "--since",
            help="Start of the window: a duration back from now (30m, 12h, 7d) or an ISO 8601 "
            "time with a zone.",
        ),
    ] = "7d",
    until: Annotated[
        str | None,
        typer.Option("--until", help="End of the window (default: now); the same forms."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="The folder to write into (created if missing).")
    ] = Path("tactician-report"),
    fmt: Annotated[str, typer.Option("--format", help="md, html or both.")] = "both",
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="Database URL (sqlite:///path.db or postgresql://…); "
            "default $TACTICIAN_DB or sqlite:///tactician.db.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Write the KPI report of a window: SLA adherence, missed deadlines, manual interventions,
    queue depth, decision tiers and drift events, with PNG charts. Prints the files written."""
    from tactician.observe.report import FORMATS, gather, write_report
    from tactician.store.base import INTERVENTIONS
    from tactician.store.open import open_store

    if fmt not in FORMATS:
        raise InvalidInput(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    for text, name in ((since, "since"), (until, "until")):
        if text is not None:
            parse_when(text, name, 0.0)  # bad input is refused before the store is opened
    settings = Settings.from_env(db=db)
    store = open_store(settings.db, settings)
    try:
        now = store.db_now()
        start = parse_when(since, "since", now)
        end = now if until is None else parse_when(until, "until", now)
        if start >= end:
            raise InvalidInput("--since must be before --until")
        kpis = gather(store, start, end, INTERVENTIONS, database=settings.db)
    finally:
        store.close()
    written = write_report(kpis, out, fmt)
    if as_json:
        body = {"files": [str(p) for p in written], "summary": kpis.summary()}
        sys.stdout.write(json.dumps(body, sort_keys=True) + "\n")
        return
    for path in written:
        sys.stdout.write(f"{path}\n")
