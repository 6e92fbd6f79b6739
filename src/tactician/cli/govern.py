"""`tactician audit|tokens|policy|approvals|overrides`: the gate from the command line.

Every mutation names its actor: the token given with --token (or TACTICIAN_TOKEN), or, for a
CLI with direct access to a SQLite file and no token, the local bootstrap admin (its audit
records say so). A refused mutation prints one line, exits 2 and leaves only the audit record of
the refusal.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import json
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tactician.app import Tactician
from tactician.cli.options import DbOption, JsonOption, TokenOption
from tactician.errors import InvalidInput
from tactician.govern.audit import verify
from tactician.govern.roles import Actor, Operation, parse_role
from tactician.observe.drift import DRIFT_ACTIONS
from tactician.settings import Settings

out = Console(highlight=False)
audit_cli = typer.Typer(help="The audit chain: verify, export, head.", no_args_is_help=True)
tokens_cli = typer.Typer(help="API and CLI tokens with roles.", no_args_is_help=True)
policy_cli = typer.Typer(
    help="Policy bundles: validate, diff, deploy, roll back.", no_args_is_help=True
)
approvals_cli = typer.Typer(
    help="Tasks waiting for a human: list, approve, reject.", no_args_is_help=True
)
overrides_cli = typer.Typer(
    help="Operator overrides: pin, run now, hold, release.", no_args_is_help=True
)
drift_cli = typer.Typer(
    help="Drift: the detections and the decision service's fallback.", no_args_is_help=True
)

ReasonOption = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit chain).")]


def register(cli: typer.Typer) -> None:
    cli.add_typer(audit_cli, name="audit")
    cli.add_typer(tokens_cli, name="tokens")
    cli.add_typer(policy_cli, name="policy")
    cli.add_typer(approvals_cli, name="approvals")
    cli.add_typer(overrides_cli, name="overrides")
    cli.add_typer(drift_cli, name="drift")


def open_app(db: str | None) -> Tactician:
    return Tactician(settings=Settings.from_env(db=db))


def acting(app: Tactician, token: str | None) -> Actor:
    """Who this command acts as (see the module docstring)."""
    token = token or app.settings.token or None
    local = None
    if not token and (app.settings.db.startswith("sqlite:///") or not app.store.tokens()):
        # Direct access to the file (or a database with no token yet, to make the first one).
        local = f"local:{getpass.getuser()}"
    return app.gate.actor(token, local_admin=local)


def authorized(app: Tactician, token: str | None, operation: Operation, subject: str) -> Actor:
    """The actor this command acts as, once its role is checked (a refusal is audited)."""
    actor = acting(app, token)
    app.gate.authorize(actor, operation, subject)
    return actor


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=str, sort_keys=True) + "\n")


def _when(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def parse_time(text: str | None, name: str, now: float) -> float | None:
    """Epoch seconds, ISO 8601 with a zone, +N (seconds from now) or -7d style (ago)."""
    if text is None:
        return None
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    try:
        if text[:1] in "+-" and text[-1:] in units:
            return now + float(text[:-1]) * units[text[-1]]
        if text[:1] == "+":
            return now + float(text[1:])
        try:
            return float(text)
        except ValueError:
            when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"--{name}: not a time (epoch, ISO 8601, +30m, -7d): {text!r}") from None
    if when.tzinfo is None:
        raise InvalidInput(f"--{name}: give a time zone, e.g. {text}Z")
    return when.timestamp()


# --- audit ---------------------------------------------------------------------------------


@audit_cli.command("verify")
def audit_verify(
    db: DbOption = None,
    anchor: Annotated[
        str | None, typer.Option(help="SEQ:HASH printed earlier by `audit head`, kept outside.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Check every record's hash and link; name the first bad record (exit 1)."""
    pinned = None
    if anchor is not None:
        found = re.fullmatch(r"([0-9]+):([0-9a-f]{64})", anchor.strip(), flags=re.ASCII)
        if found is None:
            raise InvalidInput("--anchor must look like SEQ:HASH (from `tactician audit head`)")
        pinned = (int(found[1]), found[2])
    verdict = verify(open_app(db).store.audit_records(), pinned)
    if as_json:
        _print_json(
            {
                "ok": verdict.ok,
                "checked": verdict.checked,
                "head": verdict.head,
                "bad_seq": verdict.bad_seq,
                "problem": verdict.problem,
            }
        )
    else:
        out.print(verdict.text(), soft_wrap=True)
    if not verdict.ok:
        raise typer.Exit(1)


@audit_cli.command("head")
def audit_head(db: DbOption = None, as_json: JsonOption = False) -> None:
    """The last record's number and hash: keep it outside the system to anchor the chain."""
    seq, digest = open_app(db).store.audit_head()
    if as_json:
        _print_json({"seq": seq, "hash": digest})
    else:
        out.print(f"{seq}:{digest}")


@audit_cli.command("export")
def audit_export(
    db: DbOption = None,
    since: Annotated[
        str | None, typer.Option(help="From this time: epoch, ISO 8601 or -7d (ago).")
    ] = None,
    output: Annotated[Path | None, typer.Option("--out", help="File (default stdout).")] = None,
) -> None:
    """Write the records as JSON Lines, oldest first."""
    app = open_app(db)
    start = parse_time(since, "since", app.store.db_now())
    stream = output.open("w") if output else sys.stdout
    try:
        count = 0
        for record in app.store.audit_records(since=start):
            stream.write(json.dumps(record.to_json(), sort_keys=True) + "\n")
            count += 1
    finally:
        if output:
            stream.close()
    if output:
        out.print(f"{count} records written to {output}")


# --- tokens --------------------------------------------------------------------------------


@tokens_cli.command("create")
def tokens_create(
    name: Annotated[str, typer.Option("--name", help="Who or what uses it.")],
    role: Annotated[str, typer.Option("--role", help="viewer, operator, approver or admin.")],
    group: Annotated[list[str] | None, typer.Option("--group", help="Approver groups.")] = None,
    site: Annotated[
        str | None,
        typer.Option("--site", help="An edge site's token: it acts only as that site's agent."),
    ] = None,
    db: DbOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Mint a token; it is printed once, and only its hash is stored."""
    app = open_app(db)
    parsed = parse_role(role)
    actor = acting(app, token)
    secret = app.gate.create_token(actor, name, parsed, group or (), site)
    if as_json:
        _print_json({"name": name, "role": parsed.value, "site": site, "token": secret})
    else:
        out.print(secret)
        sys.stderr.write(f"token {name} ({parsed.value}): shown once, keep it safe\n")


@tokens_cli.command("list")
def tokens_list(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Tokens by name and role (never their secrets)."""
    rows = open_app(db).store.tokens()
    if as_json:
        _print_json(
            [
                {
                    "name": r.name,
                    "role": r.role.value,
                    "groups": sorted(r.groups),
                    "site": r.site,
                    "created_at": r.created_at,
                    "created_by": r.created_by,
                    "revoked_at": r.revoked_at,
                }
                for r in rows
            ]
        )
        return
    table = Table("name", "role", "groups", "site", "created", "by", "revoked")
    for r in rows:
        table.add_row(
            r.name,
            r.role.value,
            ",".join(sorted(r.groups)),
            r.site or "",
            _when(r.created_at),
            r.created_by,
            _when(r.revoked_at),
        )
    out.print(table)


@tokens_cli.command("revoke")
def tokens_revoke(name: str, db: DbOption = None, token: TokenOption = None) -> None:
    """Revoke a token: it stops working at once."""
    app = open_app(db)
    app.gate.revoke_token(acting(app, token), name)
    out.print(f"token {name} revoked")


# --- policy bundles ------------------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None


@policy_cli.command("validate")
def policy_validate(file: Path, as_json: JsonOption = False) -> None:
    """Check a bundle; print its name and version, or the first error with file:line: field."""
    from tactician.govern.policy import bundle_version, parse_bundle

    text = _read(file)
    bundle = parse_bundle(text, str(file))
    version = bundle_version(text)
    if as_json:
        _print_json({"name": bundle.name, "version": version, "ok": True})
    else:
        out.print(f"{file}: bundle {bundle.name} is valid, version {version[:12]}")


@policy_cli.command("diff")
def policy_diff(
    file: Path,
    against: Annotated[str, typer.Option(help="A deployed version (prefix) or 'live'.")] = "live",
    db: DbOption = None,
) -> None:
    """What deploying FILE would change, against the live bundle or a version."""
    from tactician.govern.policy import DEFAULT_BUNDLE, diff_bundles, parse_bundle

    app = open_app(db)
    new_text = _read(file)
    parse_bundle(new_text, str(file))
    if against == "live":
        live = app.store.deployed().get("live")
        old_text = live[1] if live else _dump(DEFAULT_BUNDLE)
    else:
        old_text = app.store.policy_text(against)
    text = diff_bundles(old_text, new_text, against, str(file))
    out.print(text or "no change", markup=False)


def _dump(bundle: Any) -> str:
    import yaml

    return str(yaml.safe_dump(bundle.model_dump(mode="json"), sort_keys=True))


@policy_cli.command("deploy")
def policy_deploy(
    file: Path,
    db: DbOption = None,
    token: TokenOption = None,
    shadow: Annotated[
        bool, typer.Option(help="Run in shadow: decide beside live, never act.")
    ] = False,
    experiment: Annotated[
        float | None, typer.Option(help="A/B: the share of tasks (0-1) this bundle decides.")
    ] = None,
    split_by: Annotated[str, typer.Option(help="Experiment split: task or tenant.")] = "task",
    reason: Annotated[str | None, typer.Option(help="Why (audited).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Validate and deploy a bundle atomically (live, shadow or experiment)."""
    if shadow and experiment is not None:
        raise InvalidInput("give --shadow or --experiment, not both")
    app = open_app(db)
    slot = "shadow" if shadow else "experiment" if experiment is not None else "live"
    deployment = app.gate.deploy(
        acting(app, token),
        _read(file),
        str(file),
        slot=slot,
        share=experiment,
        split_by=split_by if slot == "experiment" else None,
        reason=reason,
    )
    if as_json:
        _print_json({"slot": slot, "version": deployment.version, "seq": deployment.seq})
    else:
        out.print(f"deployed {file} to {slot}: version {(deployment.version or '')[:12]}")


@policy_cli.command("rollback")
def policy_rollback(
    db: DbOption = None,
    token: TokenOption = None,
    reason: Annotated[str | None, typer.Option(help="Why (audited).")] = None,
) -> None:
    """Put the previous live bundle back, atomically."""
    app = open_app(db)
    deployment = app.gate.rollback(acting(app, token), reason)
    out.print(f"live is version {(deployment.version or '')[:12]} again")


@policy_cli.command("history")
def policy_history(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Deployments, newest first."""
    rows = open_app(db).store.deployments()
    if as_json:
        _print_json([r.__dict__ for r in rows])
        return
    table = Table("#", "slot", "version", "at", "by", "reason")
    for r in rows:
        version = (r.version or "(cleared)")[:12]
        table.add_row(str(r.seq), r.slot, version, _when(r.at), r.actor, r.reason or "")
    out.print(table)


@policy_cli.command("compare")
def policy_compare(
    db: DbOption = None,
    since: Annotated[
        str | None, typer.Option(help="From this time (default: when the experiment began).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """KPIs of the live bundle against the experiment (A/B, with 95% intervals) and how the
    shadow bundle's decisions differ from the live ones."""
    app = open_app(db)
    report = app.gate.compare(parse_time(since, "since", app.store.db_now()))
    if "experiment" not in report and "shadow" not in report:
        raise InvalidInput("nothing to compare: deploy a bundle with --shadow or --experiment")
    if as_json:
        _print_json(json.loads(json.dumps(report, default=lambda v: v.__dict__)))
        return
    if "experiment" in report:
        table = Table("bundle", "tasks", "missed rate", "weighted tardiness", "escalation rate")
        for arm in report["experiment"]["arms"]:
            table.add_row(
                arm.version[:12],
                str(arm.tasks),
                arm.missed_rate.text(),
                arm.weighted_tardiness.text(),
                arm.escalation_rate.text(),
            )
        out.print(table)
    if "shadow" in report:
        s = report["shadow"]
        out.print(
            f"shadow {s.shadow_version[:12]} beside live {s.live_version[:12]}: "
            f"{s.tasks} tasks, same action {s.same_action:.0%}, rank correlation "
            f"{s.rank_correlation:.2f}, escalations {s.live_escalations} live vs "
            f"{s.shadow_escalations} shadow"
        )


# --- approvals -----------------------------------------------------------------------------


@approvals_cli.command("list")
def approvals_list(
    db: DbOption = None,
    state: Annotated[
        str, typer.Option(help="pending, approved, rejected, withdrawn or all.")
    ] = "pending",
    as_json: JsonOption = False,
) -> None:
    """Approvals and their tallies, oldest first."""
    if state not in ("pending", "approved", "rejected", "withdrawn", "all"):
        raise InvalidInput("--state is pending, approved, rejected, withdrawn or all")
    rows = open_app(db).store.approvals(None if state == "all" else state)
    if as_json:
        _print_json(
            [
                {
                    "task_id": r.task_id,
                    "rule": r.rule.name,
                    "state": r.state,
                    "requested_by": r.requested_by,
                    "requested_at": r.requested_at,
                    "expires_at": r.expires_at,
                    "tally": r.tally().text(),
                    "votes": [v.__dict__ for v in r.votes],
                }
                for r in rows
            ]
        )
        return
    table = Table("task", "rule", "state", "tally", "asked by", "expires")
    for r in rows:
        table.add_row(
            r.task_id, r.rule.name, r.state, r.tally().text(), r.requested_by, _when(r.expires_at)
        )
    out.print(table)


def _edits(values: list[str] | None) -> dict[str, Any]:
    edits: dict[str, Any] = {}
    for item in values or ():
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise InvalidInput(f"--edit must look like field=value, got {item!r}")
        try:
            edits[name] = json.loads(raw)
        except json.JSONDecodeError:
            edits[name] = raw  # a bare word is a string
    return edits


def _vote(
    verdict: str,
    task_id: str,
    reason: str,
    edit: list[str] | None,
    db: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    app = open_app(db)
    row = app.gate.vote(acting(app, token), task_id, verdict, reason, _edits(edit))
    if as_json:
        _print_json({"task_id": task_id, "state": row.state, "tally": row.tally().text()})
    else:
        out.print(f"{task_id}: {row.tally().text()}")


@approvals_cli.command("approve")
def approvals_approve(
    task_id: str,
    reason: ReasonOption,
    edit: Annotated[
        list[str] | None, typer.Option(help="field=value the rule lets you change (repeat).")
    ] = None,
    db: DbOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Approve a waiting task, optionally editing the fields its rule allows."""
    _vote("approve", task_id, reason, edit, db, token, as_json)


@approvals_cli.command("reject")
def approvals_reject(
    task_id: str,
    reason: ReasonOption,
    db: DbOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Reject a waiting task: it ends, rejected, with the reason."""
    _vote("reject", task_id, reason, None, db, token, as_json)


# --- overrides -----------------------------------------------------------------------------

ExpiresOption = Annotated[
    str | None, typer.Option("--expires", help="When it lapses: +30m, +2h, epoch or ISO 8601.")
]


def _override(db: str | None, token: str | None, task_id: str) -> tuple[Tactician, Actor]:
    app = open_app(db)
    return app, authorized(app, token, Operation.OVERRIDE, task_id)


@overrides_cli.command("pin")
def overrides_pin(
    task_id: str,
    score: Annotated[float, typer.Option(help="0 (last) to 1 (next) within its pool.")],
    reason: ReasonOption,
    expires: ExpiresOption = None,
    db: DbOption = None,
    token: TokenOption = None,
) -> None:
    """Pin a task's score: the scorer's own is ignored until cleared or expired."""
    if not (0.0 <= score <= 1.0 and math.isfinite(score)):
        raise InvalidInput("--score must be between 0 and 1")
    app, actor = _override(db, token, task_id)
    until = parse_time(expires, "expires", app.store.db_now())
    app.store.set_override(task_id, "pin", score, actor, reason, until)
    out.print(f"{task_id}: score pinned at {score:g} by {actor.name}")


@overrides_cli.command("run-now")
def overrides_run_now(
    task_id: str,
    reason: ReasonOption,
    expires: ExpiresOption = None,
    db: DbOption = None,
    token: TokenOption = None,
) -> None:
    """Put a task first in its pool's line (capacity and approvals still apply)."""
    app, actor = _override(db, token, task_id)
    until = parse_time(expires, "expires", app.store.db_now())
    app.store.set_override(task_id, "run_now", None, actor, reason, until)
    out.print(f"{task_id}: runs next when its pool has room (set by {actor.name})")


@overrides_cli.command("clear")
def overrides_clear(
    task_id: str,
    what: Annotated[str, typer.Argument(help="pin or run_now.")],
    reason: ReasonOption,
    db: DbOption = None,
    token: TokenOption = None,
) -> None:
    """Remove an override: the scorer decides again."""
    app = open_app(db)
    actor = authorized(app, token, Operation.CLEAR_OVERRIDE, task_id)
    app.store.clear_override(task_id, what, actor, reason)
    out.print(f"{task_id}: {what} cleared")


@overrides_cli.command("hold")
def overrides_hold(
    task_id: str,
    reason: ReasonOption,
    expires: ExpiresOption = None,
    db: DbOption = None,
    token: TokenOption = None,
) -> None:
    """Hold a waiting task until released (or until --expires)."""
    app, actor = _override(db, token, task_id)
    until = parse_time(expires, "expires", app.store.db_now())
    task = app.store.hold(task_id, actor, reason, until)
    out.print(f"{task_id}: {task.state}")


@overrides_cli.command("release")
def overrides_release(
    task_id: str, reason: ReasonOption, db: DbOption = None, token: TokenOption = None
) -> None:
    """Release a held task."""
    app, actor = _override(db, token, task_id)
    task = app.store.release(task_id, actor, reason)
    out.print(f"{task_id}: {task.state}")


@overrides_cli.command("list")
def overrides_list(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Overrides in force."""
    rows = open_app(db).store.overrides()
    if as_json:
        _print_json([r.__dict__ for r in rows])
        return
    table = Table("task", "what", "value", "by", "reason", "expires")
    for r in rows:
        value = "-" if r.value is None else f"{r.value:g}"
        table.add_row(r.task_id, r.what, value, r.actor, r.reason, _when(r.expires_at))
    out.print(table)


# --- drift ---------------------------------------------------------------------------------


@drift_cli.command("status")
def drift_status(
    db: DbOption = None,
    since: Annotated[str, typer.Option(help="Detections since (ISO 8601, -7d...).")] = "-7d",
    as_json: JsonOption = False,
) -> None:
    """Whether the fallback is engaged, and the drift records since a time."""
    app = open_app(db)
    store = app.store
    engaged = store.fallback()
    start = parse_time(since, "since", store.db_now())
    records = list(store.audit_records(since=start, actions=DRIFT_ACTIONS))
    if as_json:
        engaged_json = None if engaged is None else dataclasses.asdict(engaged)
        _print_json({"fallback": engaged_json, "records": [r.to_json() for r in records]})
        return
    if engaged is None:
        out.print("fallback: not engaged (the decision service's models decide)")
    else:
        out.print(
            f"fallback: ENGAGED since {_when(engaged.since)} on {engaged.signal} "
            f"({engaged.reason}); clear it with: tactician drift clear --reason ..."
        )
    table = Table("seq", "at", "action", "actor", "signal", "what")
    for r in records:
        what = r.details.get("text") or r.details.get("reason") or ""
        table.add_row(str(r.seq), _when(r.at), r.action, r.actor, r.subject, str(what))
    out.print(table if records else "no drift records in that time")


@drift_cli.command("clear")
def drift_clear(reason: ReasonOption, db: DbOption = None, token: TokenOption = None) -> None:
    """End the fallback: the models decide again, and the detectors start afresh."""
    app = open_app(db)
    cleared = app.gate.clear_drift(acting(app, token), reason)
    out.print(f"drift fallback on {cleared.signal} cleared (engaged {_when(cleared.since)})")
