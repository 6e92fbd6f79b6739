"""Every role against every mutating `tactician` command, on real databases.

The expectation of each (role, command) comes from `ALLOWED` itself: an allowed command exits 0
and records what it did under the token's name; a refused one prints one `error:` line, exits 2
and leaves the database as it was but for one `access.refused` record naming the token and the
operation. Also: unknown, revoked and missing tokens, the bootstrap admin's marks, and
self-approval.

The CLI runs in this process (`tactician.cli.main.main()` with `sys.argv` patched), as its
console script would run it, because ~100 subprocesses would cost about a minute;
`test_in_process_runs_match_the_real_command` checks that both ways give the same answers.
The whole matrix runs on SQLite, one refused and one allowed role per command on PostgreSQL.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import tactician.cli.govern as cli_govern
import tactician.cli.main as cli_main
from tactician.app import Tactician
from tactician.domain import KindSpec, NewTask, TaskState
from tactician.govern.audit import AuditRecord, verify
from tactician.govern.roles import ALLOWED, Actor, Operation, Role
from tactician.settings import Settings
from tactician.store.protocol import TaskFilter

TACTICIAN = str(Path(sys.executable).parent / "tactician")
ROOT = Actor("root", Role.ADMIN)
# Token names unlike their roles, so that a name standing in for a role would show.
NAMES = {Role.VIEWER: "val", Role.OPERATOR: "otto", Role.APPROVER: "april", Role.ADMIN: "ada"}
VICTIM = "victim"
"""A token that `tokens revoke` revokes."""
BOOTSTRAP = f"local:{getpass.getuser()}"

BUNDLE = """
name: {name}
approvals:
  - name: jobs-need-a-yes
    match: {{kinds: [job]}}
    approvers: {{roles: [approver, admin]}}
"""

POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)
URL_FIXTURE = {"sqlite": "sqlite_url", "postgres": "pg_url"}


# --- running the command ----------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def one_error_line(self) -> str:
        """The single stderr line of a refused command (fails if there is not exactly one)."""
        lines = self.stderr.splitlines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("error:"), lines[0]
        return lines[0]


Run = Callable[..., Result]


@pytest.fixture
def tactician(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """`tactician ARGS…` in this process: exit code, stdout and stderr, as the shell sees them."""
    opened: list[Tactician] = []

    class Closing(Tactician):
        """The CLI's own app, closed after the command as its process exit would close it."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(cli_main, "Tactician", Closing)
    monkeypatch.setattr(cli_govern, "Tactician", Closing)
    for name in [n for n in os.environ if n.startswith("TACTICIAN_")]:
        monkeypatch.delenv(name)  # the token and database come from the arguments alone

    def run(*args: str) -> Result:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["tactician", *args])
        code: int
        try:
            cli_main.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        finally:
            while opened:
                opened.pop().close()
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def subprocess_tactician(*args: str) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TACTICIAN_")}
    done = subprocess.run(
        [TACTICIAN, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    return Result(done.returncode, done.stdout, done.stderr)


# --- a known state ----------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """A database with one of everything a mutating command needs."""

    app: Tactician
    url: str
    secrets: dict[Role, str]
    waiting: str
    cancelled: str
    held: str
    pinned: str
    awaiting: str
    """Waits for approval; asked for by root, so that every other voter may answer."""
    bundle: Path
    """A valid bundle not deployed yet."""


def build_world(url: str, folder: Path) -> World:
    app = Tactician(settings=Settings(db=url))
    app.store.register_kinds([KindSpec("job", pool="p")])
    secrets = {role: app.gate.create_token(ROOT, NAMES[role], role) for role in Role}
    app.gate.create_token(ROOT, VICTIM, Role.VIEWER)
    waiting, cancelled, held, pinned = (
        app.submit_many([NewTask("job", {"n": n})], actor=ROOT)[0] for n in range(4)
    )
    app.store.cancel(cancelled, ROOT, "set-up")
    app.store.hold(held, ROOT, "set-up")
    app.store.set_override(pinned, "pin", 0.5, ROOT, "set-up")
    # Two live deployments, so that there is something to roll back to; both ask for approval.
    app.gate.deploy(ROOT, BUNDLE.format(name="first"), "first.yaml")
    app.gate.deploy(ROOT, BUNDLE.format(name="second"), "second.yaml")
    (awaiting,) = app.submit_many([NewTask("job", {"n": 4})], actor=ROOT)
    app.store.engage_fallback("miss_rate", "set-up", "second", {})  # for `drift clear`
    bundle = folder / "third.yaml"
    bundle.write_text(BUNDLE.format(name="third"))
    world = World(app, url, secrets, waiting, cancelled, held, pinned, awaiting, bundle)
    assert state_of(world, world.awaiting) is TaskState.AWAITING_APPROVAL
    assert state_of(world, world.held) is TaskState.HELD
    return world


def state_of(world: World, task_id: str) -> TaskState:
    return world.app.get(task_id).state


@pytest.fixture(params=["sqlite", POSTGRES])
def database(request: pytest.FixtureRequest) -> str:
    """A fresh SQLite file, then a fresh PostgreSQL database (that one marked `postgres`)."""
    return str(request.getfixturevalue(URL_FIXTURE[request.param]))


@pytest.fixture
def world_on(tmp_path: Path) -> Iterator[Callable[[str], World]]:
    made: list[World] = []

    def make(url: str) -> World:
        made.append(build_world(url, tmp_path))
        return made[-1]

    yield make
    for world in made:
        world.app.close()


def snapshot(world: World) -> dict[str, Any]:
    """Everything a command could change, but the audit chain."""
    store = world.app.store
    return {
        "tasks": store.list_tasks(TaskFilter(limit=10_000)),
        "approvals": store.approvals(None),
        "tokens": store.tokens(),
        "deployments": store.deployments(),
        "deployed": store.deployed(),
        "overrides": store.overrides(),
        "pools": store.pools(),
        "schedules": store.schedules(),
        "fallback": store.fallback(),
    }


def audit(world: World) -> list[AuditRecord]:
    return list(world.app.store.audit_records())


# --- the commands -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    name: str
    operation: Operation
    args: Callable[[World], list[str]]
    done: str
    """The audit action that a successful run records."""

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "-")


COMMANDS = [
    Command(
        "submit",
        Operation.SUBMIT,
        lambda w: ["submit", "job", '{"n": 9}', "--json"],
        "task.submitted",
    ),
    Command(
        "tasks cancel",
        Operation.CANCEL,
        lambda w: ["tasks", "cancel", w.waiting, "--reason", "r", "--json"],
        "task.cancelled",
    ),
    Command(
        "tasks retry",
        Operation.RETRY,
        lambda w: ["tasks", "retry", w.cancelled, "--json"],
        "task.retried",
    ),
    Command(
        "tasks reprioritize",
        Operation.REPRIORITIZE,
        lambda w: ["tasks", "reprioritize", w.waiting, "--weight", "3", "--reason", "r", "--json"],
        "task.reprioritized",
    ),
    Command(
        "overrides pin",
        Operation.OVERRIDE,
        lambda w: ["overrides", "pin", w.waiting, "--score", "0.9", "--reason", "r"],
        "override.set",
    ),
    Command(
        "overrides run-now",
        Operation.OVERRIDE,
        lambda w: ["overrides", "run-now", w.waiting, "--reason", "r"],
        "override.set",
    ),
    Command(
        "overrides hold",
        Operation.OVERRIDE,
        lambda w: ["overrides", "hold", w.waiting, "--reason", "r"],
        "task.held",
    ),
    Command(
        "overrides release",
        Operation.OVERRIDE,
        lambda w: ["overrides", "release", w.held, "--reason", "r"],
        "task.released",
    ),
    Command(
        "overrides clear",
        Operation.CLEAR_OVERRIDE,
        lambda w: ["overrides", "clear", w.pinned, "pin", "--reason", "r"],
        "override.cleared",
    ),
    Command(
        "approvals approve",
        Operation.VOTE,
        lambda w: ["approvals", "approve", w.awaiting, "--reason", "r", "--json"],
        "approval.voted",
    ),
    Command(
        "approvals reject",
        Operation.VOTE,
        lambda w: ["approvals", "reject", w.awaiting, "--reason", "r", "--json"],
        "approval.voted",
    ),
    Command(
        "policy deploy",
        Operation.DEPLOY_POLICY,
        lambda w: ["policy", "deploy", str(w.bundle), "--json"],
        "policy.deployed",
    ),
    Command(
        "policy rollback",
        Operation.ROLLBACK_POLICY,
        lambda w: ["policy", "rollback", "--reason", "r"],
        "policy.rolled_back",
    ),
    Command(
        "tokens create",
        Operation.CREATE_TOKEN,
        lambda w: ["tokens", "create", "--name", "newcomer", "--role", "viewer", "--json"],
        "token.created",
    ),
    Command(
        "tokens revoke",
        Operation.REVOKE_TOKEN,
        lambda w: ["tokens", "revoke", VICTIM],
        "token.revoked",
    ),
    Command(
        "schedules add",
        Operation.SCHEDULE,
        lambda w: ["schedules", "add", "nightly", "--kind", "job", "--cron", "0 3 * * *"],
        "schedule.saved",
    ),
    Command(
        "drift clear",
        Operation.CLEAR_DRIFT,
        lambda w: ["drift", "clear", "--reason", "r"],
        "drift.cleared",
    ),
    Command(
        "pools set",
        Operation.SET_POOL,
        lambda w: ["pools", "--set", "p=7", "--json"],
        "pool.set",
    ),
    Command(
        "purge",
        Operation.PURGE,
        lambda w: ["purge", "--before", "30d", "--json"],
        "tasks.purged",
    ),
]

MATRIX = [pytest.param(role, c, id=f"{role}-{c.slug}") for c in COMMANDS for role in Role]


def one_refused_one_allowed() -> list[Any]:
    """Per command: the most trusted role refused, and the least trusted role allowed."""
    cases = []
    for c in COMMANDS:
        refused = [role for role in Role if c.operation not in ALLOWED[role]]
        allowed = [role for role in Role if c.operation in ALLOWED[role]]
        cases += [
            pytest.param(role, c, id=f"{role}-{c.slug}") for role in (*refused[-1:], *allowed[:1])
        ]
    return cases


def check_role(world: World, tactician: Run, role: Role, command: Command) -> None:
    before, chain = snapshot(world), audit(world)
    result = tactician(*command.args(world), "--db", world.url, "--token", world.secrets[role])
    records = audit(world)
    new = records[len(chain) :]
    assert records[: len(chain)] == chain and verify(records).ok
    name = NAMES[role]
    if command.operation in ALLOWED[role]:
        assert result.code == 0, result.stderr
        assert command.done in [r.action for r in new if r.actor == name], new
        assert "access.refused" not in [r.action for r in new]
        return
    assert result.code == 2, result
    assert "may not" in result.one_error_line()
    assert result.stdout == ""
    assert snapshot(world) == before
    assert [(r.action, r.actor, r.details.get("operation")) for r in new] == [
        ("access.refused", name, command.operation.value)
    ]


@pytest.mark.parametrize(("role", "command"), MATRIX)
def test_every_role_against_every_command_on_sqlite(
    sqlite_url: str, world_on: Callable[[str], World], tactician: Run, role: Role, command: Command
) -> None:
    check_role(world_on(sqlite_url), tactician, role, command)


@pytest.mark.postgres
@pytest.mark.parametrize(("role", "command"), one_refused_one_allowed())
def test_one_refused_and_one_allowed_role_per_command_on_postgres(
    pg_url: str, world_on: Callable[[str], World], tactician: Run, role: Role, command: Command
) -> None:
    check_role(world_on(pg_url), tactician, role, command)


def test_the_matrix_covers_every_mutating_cli_operation() -> None:
    """Only `model.promote` has no command among these (it belongs to `tactician models`)."""
    covered = {c.operation for c in COMMANDS}
    assert set(Operation) - covered == {Operation.PROMOTE_MODEL}
    # Both outcomes occur for every command, so no row of the matrix is trivially one-sided.
    for c in COMMANDS:
        assert {c.operation in ALLOWED[role] for role in Role} == {True, False}, c


def test_in_process_runs_match_the_real_command(
    sqlite_url: str, world_on: Callable[[str], World], tactician: Run
) -> None:
    world = world_on(sqlite_url)
    for role in (Role.VIEWER, Role.OPERATOR):  # refused, then allowed (the same change twice)
        args = ["tasks", "reprioritize", world.waiting, "--weight", "2", "--db", world.url]
        args += ["--token", world.secrets[role]]
        inside = tactician(*args)
        assert inside == subprocess_tactician(*args)
        assert inside.code == (2 if role is Role.VIEWER else 0)
    refusals = [r for r in audit(world) if r.action == "access.refused"]
    assert [r.actor for r in refusals] == ["val", "val"]


# --- who the actor is ------------------------------------------------------------------------


def test_an_unknown_token_changes_nothing(
    database: str, world_on: Callable[[str], World], tactician: Run
) -> None:
    world = world_on(database)
    before, chain = snapshot(world), audit(world)
    for command in COMMANDS:
        result = tactician(*command.args(world), "--db", world.url, "--token", "tct_nosuchtoken")
        assert result.code == 2, (command, result)
        assert result.one_error_line() == "error: unknown token", command
    assert snapshot(world) == before
    assert audit(world) == chain


def test_a_revoked_token_is_refused(
    database: str, world_on: Callable[[str], World], tactician: Run
) -> None:
    world = world_on(database)
    world.app.gate.revoke_token(ROOT, NAMES[Role.ADMIN])
    before, chain = snapshot(world), audit(world)
    for command in COMMANDS:
        result = tactician(
            *command.args(world), "--db", world.url, "--token", world.secrets[Role.ADMIN]
        )
        assert result.code == 2, (command, result)
        assert "token ada was revoked" in result.one_error_line(), command
    assert snapshot(world) == before
    records = audit(world)
    assert records[: len(chain)] == chain
    assert all(r.action == "access.refused" for r in records[len(chain) :])


@pytest.mark.postgres
def test_postgres_needs_a_token_once_one_exists(pg_url: str, tactician: Run) -> None:
    app = Tactician(settings=Settings(db=pg_url))
    try:
        app.store.register_kinds([KindSpec("job", pool="p")])
        # No token yet: the CLI acts as the bootstrap admin, to make the first one.
        first = tactician("tokens", "create", "--name", "ada", "--role", "admin", "--db", pg_url)
        assert first.code == 0, first.stderr
        (created,) = [r for r in app.store.audit_records() if r.action == "token.created"]
        assert created.actor == BOOTSTRAP and created.details["bootstrap"] is True
        before, chain = app.store.tokens(), list(app.store.audit_records())
        for args in (
            ["tokens", "create", "--name", "eve", "--role", "admin"],
            ["submit", "job", "{}"],
            ["tokens", "revoke", "ada"],
            ["policy", "deploy", "nothing.yaml"],
            ["policy", "rollback"],
        ):
            result = tactician(*args, "--db", pg_url)
            assert result.code == 2, (args, result)
            assert "a token is needed" in result.one_error_line(), args
        assert app.store.tokens() == before
        assert app.store.list_tasks(TaskFilter()) == []
        assert app.store.deployments() == []
        records = list(app.store.audit_records())
        assert records[: len(chain)] == chain
        assert all(r.action == "access.refused" for r in records[len(chain) :])
    finally:
        app.close()


# --- the bootstrap admin ---------------------------------------------------------------------


@pytest.mark.parametrize("command", [pytest.param(c, id=c.slug) for c in COMMANDS])
def test_the_sqlite_bootstrap_admin_marks_its_records(
    sqlite_url: str, world_on: Callable[[str], World], tactician: Run, command: Command
) -> None:
    world = world_on(sqlite_url)
    chain = audit(world)
    result = tactician(*command.args(world), "--db", world.url)  # no token
    assert result.code == 0, result.stderr
    mine = [r for r in audit(world)[len(chain) :] if r.actor == BOOTSTRAP]
    assert command.done in [r.action for r in mine]
    assert [(r.action, r.details.get("bootstrap")) for r in mine] == [
        (r.action, True) for r in mine
    ]


def test_a_sites_token_from_the_cli_remembers_its_site(sqlite_url: str, tactician: Run) -> None:
    made = tactician(
        *("tokens", "create", "--name", "edge-north", "--role", "operator"),
        *("--site", "north", "--json", "--db", sqlite_url),
    )
    assert made.code == 0, made.stderr
    assert json.loads(made.stdout)["site"] == "north"
    listed = tactician("tokens", "list", "--json", "--db", sqlite_url)
    assert [(t["name"], t["site"]) for t in json.loads(listed.stdout)] == [("edge-north", "north")]
    bad = tactician(
        *("tokens", "create", "--name", "x", "--role", "operator", "--site", "a b"),
        *("--db", sqlite_url),
    )
    assert bad.code == 2
    assert "site 'a b': a letter or digit" in bad.one_error_line()
    assert len(json.loads(tactician("tokens", "list", "--json", "--db", sqlite_url).stdout)) == 1


# --- self-approval ----------------------------------------------------------------------------


def submitted_by(world: World, actor: Actor, tactician: Run, token: str | None) -> str:
    """A task waiting for approval that `actor` asked for."""
    if Operation.SUBMIT in ALLOWED[actor.role]:  # through the CLI, as its voter will vote
        args = ["submit", "job", '{"n": 7}', "--json", "--db", world.url]
        result = tactician(*args, *(["--token", token] if token else []))
        assert result.code == 0, result.stderr
        task_id = str(json.loads(result.stdout)["id"])
    else:
        # An approver may not submit: the task came in under its name by other means (a token
        # whose role was later changed, say), which the store takes without a role check.
        task = NewTask("job", {"n": 7})
        opened = world.app.gate.approvals_for([task], actor)
        (task_id,) = world.app.store.submit(
            [task], world.app.known_kinds(), actor=actor, approvals=opened
        )
    assert state_of(world, task_id) is TaskState.AWAITING_APPROVAL
    return task_id


SELF_VOTERS = [
    pytest.param("approver", "sqlite", id="approver-sqlite"),
    pytest.param("approver", "postgres", id="approver-postgres", marks=pytest.mark.postgres),
    pytest.param("admin", "sqlite", id="admin-sqlite"),
    pytest.param("admin", "postgres", id="admin-postgres", marks=pytest.mark.postgres),
    pytest.param("bootstrap", "sqlite", id="bootstrap-sqlite"),
]


@pytest.mark.parametrize(("voter", "backend"), SELF_VOTERS)
@pytest.mark.parametrize("verdict", ["approve", "reject"])
def test_nobody_answers_their_own_approval(
    request: pytest.FixtureRequest,
    world_on: Callable[[str], World],
    tactician: Run,
    voter: str,
    backend: str,
    verdict: str,
) -> None:
    world = world_on(str(request.getfixturevalue(URL_FIXTURE[backend])))
    token = None if voter == "bootstrap" else world.secrets[Role(voter)]
    actor = (
        Actor(BOOTSTRAP, Role.ADMIN, bootstrap=True)
        if token is None
        else Actor(NAMES[Role(voter)], Role(voter))
    )
    task_id = submitted_by(world, actor, tactician, token)
    before, chain = snapshot(world), audit(world)
    args = ["approvals", verdict, task_id, "--reason", "mine", "--db", world.url]
    result = tactician(*args, *(["--token", token] if token else []))
    assert result.code == 2, result
    line = result.one_error_line()
    assert f"{actor.name} asked for this task and cannot approve or reject it" in line
    assert snapshot(world) == before
    assert world.app.store.approval(task_id).votes == ()
    new = audit(world)[len(chain) :]
    assert [(r.action, r.actor, r.subject, r.details["operation"]) for r in new] == [
        ("access.refused", actor.name, task_id, Operation.VOTE.value)
    ]
    if actor.bootstrap:
        assert new[0].details.get("bootstrap") is True
