"""Drives one run of one peer; runs inside that peer's venv (started by ``run.py``).

    python driver.py MODULE run|cleanup --tasks N --workers W --timeout S --workdir DIR ...

``run``: flush the Redis db, let the peer module set up (e.g. create its database), start the
peer's worker processes (each in its own process group, recorded in ``DIR/pgids`` so that
``run.py`` can kill them whatever happens), warm them up until every worker process has run a
task, then time N no-op tasks:

* ``submit_per_s`` = N / (time from the first enqueue call to the return of the last)
* ``e2e_s`` = time from the first enqueue call until the Redis counter that every no-op task
  increments reads N; ``complete_per_s`` = N / ``e2e_s``.

Then stop the workers (SIGTERM to their groups, SIGKILL after 15 s) and print one JSON line.
``cleanup``: the peer's cleanup (e.g. drop its database) and FLUSHDB, nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import bench_common as bc

HERE = Path(__file__).resolve().parent
POLL_S = 0.005  # how often the driver reads the counter while waiting


@dataclass
class Ctx:
    tasks: int
    workers: int
    timeout: float
    workdir: Path
    redis_url: str
    pg_dsn: str

    def bin(self, name: str) -> str:
        """An executable of this venv (the driver runs with the venv's python)."""
        return str(Path(sys.executable).parent / name)


class BenchError(Exception):
    pass


def hook(peer: ModuleType, name: str, *args: Any) -> Any:
    fn = getattr(peer, name, None)
    return fn(*args) if fn is not None else None


def log_tail(path: Path) -> str:
    """The last meaningful line of a worker log, for a one-line failure reason."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or "error" in ln:
            return ln[:240]
    return lines[-1][:240] if lines else ""


class Workers:
    def __init__(self, ctx: Ctx, commands: list[list[str]], env: dict[str, str]) -> None:
        self.ctx = ctx
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        pgids = ctx.workdir / "pgids"
        for i, cmd in enumerate(commands):
            log_path = ctx.workdir / f"worker-{i}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    cmd,
                    cwd=HERE,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            with open(pgids, "a") as f:
                f.write(f"{proc.pid}\n")
            self.procs.append(proc)
            self.logs.append(log_path)

    def check_alive(self) -> None:
        for proc, log_path in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                raise BenchError(
                    f"worker {' '.join(proc.args[:3])} exited {proc.returncode}: "  # type: ignore[index]
                    f"{log_tail(log_path)}"
                )

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        lingering = []
        for proc in self.procs:  # the leader may be gone while children linger
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 0)
                lingering.append(proc.pid)
        # Leave run.py only the groups that still exist: an emptied group's number may be reused.
        (self.ctx.workdir / "pgids").write_text("".join(f"{pid}\n" for pid in lingering))


def counter(r: Any, key: str) -> int:
    return int(r.get(key) or 0)


def warm_up(peer: ModuleType, ctx: Ctx, workers: Workers, r: Any) -> dict[str, Any]:
    """Send warm-up tasks until every worker process has run one, then drain them."""
    started = time.perf_counter()
    deadline = time.monotonic() + min(120.0, ctx.timeout)
    sent = 0
    while True:
        peer.enqueue_warm(ctx.workers * 2)
        sent += ctx.workers * 2
        time.sleep(0.2)
        workers.check_alive()
        ready = r.scard(bc.WARM_PIDS)
        if ready >= ctx.workers:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"warm-up: only {ready} of {ctx.workers} worker processes ran a task")
    while counter(r, bc.WARM_DONE) < sent:
        if time.monotonic() > deadline:
            raise BenchError(f"warm-up: {counter(r, bc.WARM_DONE)} of {sent} warm-up tasks done")
        workers.check_alive()
        time.sleep(0.02)
    r.delete(bc.COUNTER, bc.WARM_DONE, bc.WARM_PIDS)
    return {"warm_tasks": sent, "warm_s": round(time.perf_counter() - started, 2)}


def measure(peer: ModuleType, ctx: Ctx, workers: Workers, r: Any) -> dict[str, Any]:
    n = ctx.tasks
    t0 = time.perf_counter()
    peer.enqueue(n)
    t1 = time.perf_counter()
    deadline = time.monotonic() + ctx.timeout
    next_liveness = 0.0
    while True:
        done = counter(r, bc.COUNTER)
        if done >= n:
            break
        now = time.monotonic()
        if now > deadline:
            raise BenchError(f"timed out after {ctx.timeout:.0f} s with {done} of {n} tasks done")
        if now > next_liveness:
            workers.check_alive()
            next_liveness = now + 0.5
        time.sleep(POLL_S)
    t2 = time.perf_counter()
    time.sleep(0.3)  # anything past N would show up now: duplicates are an error
    executed = counter(r, bc.COUNTER)
    if executed != n:
        raise BenchError(f"{executed} executions for {n} tasks")
    submit_s = t1 - t0
    e2e_s = t2 - t0
    return {
        "tasks": n,
        "submit_s": round(submit_s, 4),
        "submit_per_s": n / submit_s,
        "e2e_s": round(e2e_s, 4),
        "complete_per_s": n / e2e_s,
        "executed": executed,
    }


def run(peer: ModuleType, ctx: Ctx) -> dict[str, Any]:
    r = bc.client()
    r.flushdb()
    hook(peer, "setup", ctx)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(HERE),
        PYTHONUNBUFFERED="1",
        BENCH_REDIS_URL=ctx.redis_url,
        BENCH_PG_DSN=ctx.pg_dsn,
        BENCH_WORKDIR=str(ctx.workdir),
    )
    env.update(hook(peer, "worker_env", ctx) or {})
    workers = Workers(ctx, peer.worker_commands(ctx), env)
    try:
        hook(peer, "connect", ctx)
        out = warm_up(peer, ctx, workers, r)
        out.update(measure(peer, ctx, workers, r))
        problem = hook(peer, "check", ctx)
        if problem:
            raise BenchError(problem)
        return out
    finally:
        with contextlib.suppress(Exception):
            hook(peer, "close")
        workers.stop()


def versions(peer: ModuleType) -> dict[str, str]:
    out = {}
    for dist in getattr(peer, "VERSIONS", ()):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("module")
    ap.add_argument("mode", choices=("run", "cleanup"))
    ap.add_argument("--tasks", type=int, required=True)
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--redis-url", default=bc.DEFAULT_REDIS_URL)
    ap.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    a = ap.parse_args()
    os.environ["BENCH_REDIS_URL"] = a.redis_url
    os.environ["BENCH_PG_DSN"] = a.pg_dsn
    os.environ["BENCH_WORKDIR"] = str(a.workdir)
    ctx = Ctx(a.tasks, a.workers, a.timeout, a.workdir, a.redis_url, a.pg_dsn)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    if a.mode == "cleanup":
        try:
            peer = importlib.import_module(a.module)
            hook(peer, "cleanup", ctx)
        finally:
            bc.client().flushdb()
        return 0
    result: dict[str, Any]
    peer: ModuleType | None = None
    try:
        peer = importlib.import_module(a.module)
        result = {"ok": True, **run(peer, ctx), "versions": versions(peer)}
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if peer is not None:
            with contextlib.suppress(Exception):
                hook(peer, "cleanup", ctx)
        with contextlib.suppress(Exception):
            bc.client().flushdb()
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
