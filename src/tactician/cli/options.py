"""Options the command groups share (one definition, one help text)."""

from __future__ import annotations

from typing import Annotated

import typer

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Database URL (sqlite:///path.db or postgresql://…); "
        "default $TACTICIAN_DB or sqlite:///tactician.db.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", help="Act with this token (default $TACTICIAN_TOKEN)."),
]
