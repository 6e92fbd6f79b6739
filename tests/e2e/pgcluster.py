"""A PostgreSQL server of a test's own, to restart at will.

The server on 127.0.0.1:5432 is shared with every other test running on this machine, so a test
that restarts PostgreSQL makes one of its own: `initdb` into a temporary folder owned by the
`postgres` user (root may not run the server), started with `pg_ctl` on a free loopback port,
its socket in the same folder. `stop` ends it and deletes the folder, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pytest

BIN = Path(os.environ.get("TACTICIAN_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
OWNER = "postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateCluster:
    """initdb, start, restart, stop: one PostgreSQL server in a temporary folder."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="tactician-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"

    @property
    def admin_url(self) -> str:
        return f"postgresql://{OWNER}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://{OWNER}@127.0.0.1:{self.port}/{database}"

    def _as_owner(self, *argv: str, timeout: float = 60.0) -> str:
        command = [*self._prefix(), *argv]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stderr.strip()}\n"
                f"{self.log_tail()}"
            )
        return done.stdout

    def _prefix(self) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", OWNER, "--"]
        return []  # already the owner (checked in `available`)

    def start(self) -> PrivateCluster:
        shutil.chown(self.root, OWNER, OWNER)
        self._as_owner(
            str(BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", OWNER, "--no-sync"
        )
        self._as_owner(*self._pg_ctl("start"))
        return self

    def _pg_ctl(self, action: str, *extra: str) -> list[str]:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        return [
            str(BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.log),
            "-w",
            *extra,
            action,
        ]

    def restart(self) -> float:
        """`pg_ctl restart -m fast`: every session is ended; seconds until it accepts again."""
        started = time.monotonic()
        self._as_owner(*self._pg_ctl("restart", "-m", "fast"))
        return time.monotonic() - started

    def halt(self) -> None:
        """`pg_ctl stop -m fast`: the server goes down, its data stays (`resume` starts it)."""
        self._as_owner(*self._pg_ctl("stop", "-m", "fast"))

    def resume(self) -> None:
        self._as_owner(*self._pg_ctl("start"))

    def stop(self) -> None:
        """Stop the server (if it runs) and delete its folder."""
        try:
            if (self.data / "postmaster.pid").exists():
                with contextlib.suppress(Exception):
                    self._as_owner(
                        str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
                    )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        if not self.log.exists():
            return "(no server log)"
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "server log:\n" + "\n".join(text)

    def __enter__(self) -> PrivateCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def available() -> str | None:
    """Why a private cluster cannot be made here, or None when it can."""
    if not (BIN / "initdb").exists():
        return f"no PostgreSQL binaries in {BIN} (set TACTICIAN_TEST_PG_BIN)"
    try:
        pwd.getpwnam(OWNER)
    except KeyError:
        return f"no {OWNER} user to own the server"
    if os.geteuid() == 0:
        return None if shutil.which("runuser") else "root without runuser cannot start the server"
    if pwd.getpwuid(os.geteuid()).pw_name != OWNER:
        return f"needs root (to run the server as {OWNER}) or the {OWNER} user"
    return None


def require() -> None:
    """Skip (fail in CI) when a private cluster cannot be made."""
    reason = available()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"a private PostgreSQL cluster is required in CI: {reason}")
    pytest.skip(reason)
