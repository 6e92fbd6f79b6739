"""Real `tactician` processes for the end-to-end tests, and what they leave behind.

Each process runs in a process group of its own. Runner processes may start groups of their own
(so that a timeout kill reaches the commands they run), so "the worker" means the worker and
every process under it: `kill` and `signal_family` find them in /proc and signal them all, as a
machine that dies or a VM that stalls would. Output goes to one log file per start of a
process; a `Cluster` stops every process it started, whatever happens, and prints the tails of
their logs when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TACTICIAN = str(Path(sys.executable).parent / "tactician")
APP = "tests.e2e.crash_app:app"


class Proc:
    """One `tactician` command, started, killed and restarted by the test."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log_dir = log_dir
        self.logs: list[Path] = []
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._seen: set[int] = set()
        self._cmdline = b""

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def log(self) -> Path:
        return self.logs[-1]

    def start(self) -> Proc:
        assert self.popen is None, f"{self.name} is already running"
        log = self.log_dir / f"{self.name}.{len(self.logs) + 1}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        self.started_at = time.monotonic()
        self._cmdline = _cmdline(self.popen.pid)
        return self

    def uptime(self) -> float:
        return time.monotonic() - self.started_at if self.popen is not None else 0.0

    def descendants(self) -> list[int]:
        assert self.popen is not None, f"{self.name} is not running"
        family = descendants(self.popen.pid)
        self._seen.update(family)
        return family

    def signal_family(self, sig: int) -> None:
        """Signal the process, every process under it, and the process groups they lead."""
        assert self.popen is not None, f"{self.name} is not running"
        leader = self.popen.pid
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            _signal_group(leader, signal.SIGSTOP)  # frozen, the worker starts no new runner
        family = self.descendants()
        # Only groups this family leads: every process in them is one the test started.
        groups = {leader} | {g for g in map(_group_of, family) if g in family}
        for group in groups:
            _signal_group(group, sig)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL the process and everything under it at once, as a machine failure would."""
        self.signal_family(signal.SIGKILL)
        self._reap(10.0)

    def aim(self) -> Callable[[], None]:
        """A kill, prepared: the groups of the process and its runners are found now, so that
        the kill itself is a few syscalls and lands within microseconds of being called."""
        assert self.popen is not None, f"{self.name} is not running"
        family = self.descendants()
        groups = [self.popen.pid, *(g for g in map(_group_of, family) if g in family)]

        def fire() -> None:
            for group in groups:
                _signal_group(group, signal.SIGKILL)
            self.kill()  # and whatever the prepared list missed

        return fire

    def kill_only_the_process(self) -> None:
        """SIGKILL the process alone, as the OOM killer would; its children are left be."""
        assert self.popen is not None, f"{self.name} is not running"
        self.descendants()
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        self.popen = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds for a clean exit, then SIGKILL what is left."""
        if self.popen is None:
            return None
        self.signal_family(signal.SIGCONT)  # a paused process cannot act on SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGTERM)
        return self._reap(grace)

    def _reap(self, grace: float) -> int | None:
        assert self.popen is not None
        pid = self.popen.pid
        deadline = time.monotonic() + grace
        # Wait without reaping: while the leader is a zombie its group id cannot be reused, so
        # the SIGKILL below can only reach processes this test started.
        while time.monotonic() < deadline and not _exited(pid):
            self.descendants()
            time.sleep(0.01)
        self.signal_family(signal.SIGKILL)
        code = self.popen.wait(10)
        self.popen = None
        self.kill_strays()
        return code

    def strays(self) -> list[int]:
        """Processes once under this one that outlived it (same command line: forked runners)."""
        return [pid for pid in sorted(self._seen) if _cmdline(pid) == self._cmdline]

    def family_states(self) -> list[str]:
        """State letters of the process and everything under it."""
        assert self.popen is not None, f"{self.name} is not running"
        return [state_of(pid) for pid in [self.popen.pid, *self.descendants()]]

    def kill_strays(self) -> None:
        for pid in self.strays():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._seen.clear()

    def text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def tail(self, lines: int = 25) -> str:
        if not self.logs or not self.log.exists():
            return f"--- {self.name}: no log"
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.log.name} (last {len(text)} lines)\n" + "\n".join(text)


def descendants(pid: int) -> list[int]:
    """Every living process under `pid`, from /proc (Linux)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:  # a process may exit while it is read
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found.extend(children)
                todo.extend(children)
    return found


def _group_of(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


def _signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def state_of(pid: int) -> str:
    """The process's state letter from /proc (R running, S sleeping, T stopped, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b"<gone>"


def _exited(pid: int) -> bool:
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


class Cluster:
    """The planner and worker processes of one test; all stopped on exit."""

    def __init__(self, db: str, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.db = db
        self.workdir = workdir
        self.effects = workdir / "effects.log"
        self.effects.touch()
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("TACTICIAN_")}
        self.env = {
            **inherited,  # the scenario alone sets Tactician's settings
            "TACTICIAN_LOG_LEVEL": "INFO",  # the tests read the workers' logs
            "PYTHONUNBUFFERED": "1",
            "E2E_EFFECTS": str(self.effects),
            **(env or {}),
        }
        self.procs: list[Proc] = []

    def planner(self, name: str = "planner") -> Proc:
        return self._add(name, ["planner", "--app", APP, "--db", self.db])

    def worker(self, name: str, concurrency: int = 1, batch: int = 1) -> Proc:
        argv = [
            "worker",
            "--app",
            APP,
            "--db",
            self.db,
            "--concurrency",
            str(concurrency),
            "--batch",
            str(batch),
        ]
        return self._add(name, argv)

    def _add(self, name: str, args: list[str]) -> Proc:
        proc = Proc(name, [TACTICIAN, *args], self.env, self.log_dir)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.popen is not None:
                proc.stop()

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            for proc in self.procs:  # leftovers of killed workers first: they may hold locks
                proc.kill_strays()
            self.stop_all()
        finally:
            for proc in self.procs:  # whatever stop_all could not do
                with contextlib.suppress(Exception):
                    if proc.popen is not None:
                        proc.kill()
                    proc.kill_strays()
            if kind is not None:
                print(f"\nlogs in {self.log_dir}:\n{self.tails()}", file=sys.stderr)


def wait_until(
    done: Callable[[], bool], timeout: float, what: Callable[[], str], every: float = 0.02
) -> float:
    """Poll `done` until it is true; fail with `what()` (the counts) after `timeout` seconds."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not done after {timeout:g}s: {what()}")
        time.sleep(every)
    return time.monotonic() - start


def wait_for_progress(
    count: Callable[[], int],
    target: int,
    what: Callable[[], str],
    *,
    stall: float = 60.0,
    cap: float = 480.0,
    every: float = 0.05,
) -> float:
    """Poll `count()` until it reaches `target`. Fail when it has not grown for `stall` seconds
    (however slow a loaded machine is, progress must not stop) or after `cap` seconds."""
    start = changed = time.monotonic()
    best = count()
    while best < target:
        now = time.monotonic()
        if now - changed > stall:
            raise AssertionError(f"no progress for {stall:g}s at {best}/{target}: {what()}")
        if now - start > cap:
            raise AssertionError(f"only {best}/{target} after {cap:g}s: {what()}")
        time.sleep(every)
        current = count()
        if current > best:
            best, changed = current, time.monotonic()
    return time.monotonic() - start


def read_effects(path: Path) -> list[list[str]]:
    """The effects file as lists of fields; a torn last line would be a bug, so it fails."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path} ends with a partial line"
    return [line.split() for line in data.decode().splitlines()]


def last_effects(path: Path, size: int = 8192) -> list[list[str]]:
    """The last whole lines of the effects file (cheap enough to poll while tasks run)."""
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        lines = f.read().decode(errors="replace").split("\n")[1:-1]
    return [line.split() for line in lines]


@contextlib.contextmanager
def connect(url: str) -> Iterator[Any]:
    """A plain DB-API connection, independent of the code under test, for checking its work."""
    if url.startswith("sqlite:///"):
        conn: Any = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)
    else:
        import psycopg

        conn = psycopg.connect(url, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def query(conn: Any, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    if not isinstance(conn, sqlite3.Connection):
        sql = sql.replace("?", "%s")
    cur = conn.execute(sql, params)
    rows = [tuple(r) for r in cur.fetchall()]
    if isinstance(conn, sqlite3.Connection):
        conn.commit()  # end the read transaction: the next query sees new commits
    return rows
