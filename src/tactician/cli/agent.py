"""`tactician agent` (an edge site's process), `tactician agent keygen`, `tactician sites`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tactician.errors import InvalidInput
from tactician.settings import Settings

agent_cli = typer.Typer(
    help="Edge agents: run a site on the centre's signed bundle; keys for signing bundles.",
    invoke_without_command=True,
)
out = Console(highlight=False)


def register(cli: typer.Typer) -> None:
    cli.add_typer(agent_cli, name="agent")
    cli.command("sites")(sites)


@agent_cli.callback()
def agent(
    ctx: typer.Context,
    central: Annotated[
        str | None, typer.Option(help="The centre's API, e.g. http://h:8700.")
    ] = None,
    token: Annotated[str | None, typer.Option(help="A token with task.submit (operator).")] = None,
    site: Annotated[str | None, typer.Option(help="This site's name.")] = None,
    public_key: Annotated[
        str | None,
        typer.Option("--public-key", help="The centre's signing.pub (path or 64 hex digits)."),
    ] = None,
    db: Annotated[str | None, typer.Option(help="The site's own store.")] = None,
    app: Annotated[str | None, typer.Option(help="Your app as module:attribute.")] = None,
    workers: Annotated[int, typer.Option(min=0, help="Worker processes.")] = 1,
    concurrency: Annotated[int, typer.Option(min=1, help="Runners per worker.")] = 1,
    sync_every: Annotated[float, typer.Option(min=0.05, help="Seconds between syncs.")] = 0.5,
    lease_s: Annotated[float, typer.Option(min=1.0, help="Token lease length.")] = 10.0,
    offline_after: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds without reaching the centre after which approval rules' "
            "`offline` fallbacks apply.",
        ),
    ] = 30.0,
    host: Annotated[str, typer.Option(help="The site's own API's address.")] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            help="The site's own REST API and console (local events, approvals), "
            "up with the link down; 0: none.",
        ),
    ] = 0,
) -> None:
    """Run this site: pull and verify the bundle, plan and run locally, sync to the centre."""
    if ctx.invoked_subcommand is not None:
        return
    from tactician.agent.process import Agent, AgentOptions
    from tactician.cli.main import _logging, _serve_api, load_app

    missing = [
        n
        for n, v in (
            ("--central", central),
            ("--token", token),
            ("--site", site),
            ("--public-key", public_key),
            ("--app", app),
        )
        if not v
    ]
    if missing:
        raise InvalidInput(f"tactician agent needs {', '.join(missing)}")
    assert central and token and site and public_key and app
    _logging()
    the_app = load_app(app)
    if db:
        the_app.settings = Settings.from_env(db=db)
    options = AgentOptions(
        central=central,
        token=token,
        site=site,
        public_key=public_key,
        workers=workers,
        concurrency=concurrency,
        sync_every=sync_every,
        lease_s=lease_s,
        offline_after_s=offline_after,
    )
    if port:
        _serve_api(the_app.settings, host, port)
    Agent(the_app, options).run()


@agent_cli.command("keygen")
def keygen(
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Where to write signing.key and signing.pub; default beside "
            "the model registry (where the centre's API looks).",
        ),
    ] = None,
) -> None:
    """Make the centre's Ed25519 key pair: the centre signs with signing.key, agents get
    signing.pub."""
    from tactician.agent.bundle import generate_keys
    from tactician.agent.centre import key_dir

    private, public = generate_keys(out_dir or key_dir(Settings.from_env()))
    out.print(
        f"private key {private} (keep it on the centre)\npublic key {public}: "
        f"{public.read_text().strip()}"
    )


def sites(
    central: Annotated[str | None, typer.Option(help="Read GET /sites from this API.")] = None,
    token: Annotated[str | None, typer.Option(help="A token (any role) for --central.")] = None,
    db: Annotated[str | None, typer.Option(help="Or read the centre's store directly.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Sites, their bundle versions, link state, backlog, tokens held and lag."""
    rows: list[dict[str, Any]]
    if central:
        import httpx

        settings = Settings.from_env()
        bearer = token or settings.token
        try:
            response = httpx.get(
                central.rstrip("/") + "/sites",
                headers={"Authorization": f"Bearer {bearer}"},
                timeout=10,
            )
        except httpx.HTTPError as exc:
            raise InvalidInput(f"cannot reach {central}: {exc}") from None
        if response.status_code != 200:
            raise InvalidInput(f"{central} answered {response.status_code}: {response.text[:200]}")
        rows = response.json()
    else:
        from tactician.app import Tactician

        the_app = Tactician(settings=Settings.from_env(db=db))
        now = the_app.store.db_now()
        rows = [row.to_json(now) for row in the_app.store.sites()]
        the_app.close()
    if as_json:
        sys.stdout.write(json.dumps(rows, sort_keys=True) + "\n")
        return
    table = Table("site", "bundle", "link", "last seen", "backlog", "unsynced", "lag", "tokens")
    for r in rows:
        tokens = ", ".join(f"{k}={v}" for k, v in sorted(r["tokens_held"].items())) or "-"
        table.add_row(
            r["name"],
            (r["bundle_version"] or "-")[:12],
            "up" if r["link_up"] else "down",
            f"{r['seen_ago_s']:.1f}s ago",
            str(r["backlog"]),
            str(r["unsynced"]),
            f"{r['lag_s']:.1f}s",
            tokens,
        )
    out.print(table)
