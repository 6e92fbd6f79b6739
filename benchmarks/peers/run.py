"""Throughput of peer task queues next to Tactician, on this machine, in one run.

Every peer gets its own virtual environment under ``.bench-venvs/<venv>/`` and is driven by
``driver.py`` (running inside that venv) through the same no-op workload: N tasks, 2 worker
processes, each task one Redis ``INCR``. See ``benchmarks/peers/README.md`` for the exact
configuration of each peer and how the figures are defined.

Only the standard library is needed here; ``rich`` is used for the table when it is importable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENVS = REPO / ".bench-venvs"
TACTICIAN = REPO / ".venv" / "bin" / "tactician"

REDIS_PIN = "redis==8.1.0"


@dataclass(frozen=True)
class Peer:
    name: str
    venv: str  # folder under .bench-venvs/; variants of one library share it
    module: str  # module in benchmarks/peers/ that driver.py loads
    requirements: tuple[str, ...]
    config: str  # one line for the table, {w} = workers; README.md has the long form


PEERS: tuple[Peer, ...] = (
    Peer(
        "celery",
        "celery",
        "peer_celery",
        ("celery[redis]==5.7.0", REDIS_PIN),
        "{w} x worker --pool prefork -c 1, no results; apply_async loop",
    ),
    Peer(
        "rq",
        "rq",
        "peer_rq",
        ("rq==3.0.0", REDIS_PIN),
        "{w} x rq worker, SimpleWorker (no fork), result_ttl=0; enqueue_many",
    ),
    Peer(
        "rq-fork",
        "rq",
        "peer_rq_fork",
        ("rq==3.0.0", REDIS_PIN),
        "{w} x rq worker, default Worker (fork per job), result_ttl=0; enqueue_many",
    ),
    Peer(
        "dramatiq",
        "dramatiq",
        "peer_dramatiq",
        ("dramatiq[redis]==2.2.1", REDIS_PIN),
        "--processes {w} --threads 1, prefetch 64, poll <= 100 ms; send() loop",
    ),
    Peer(
        "huey-redis",
        "huey",
        "peer_huey_redis",
        ("huey==3.5.4", REDIS_PIN),
        "-k process -w {w}, RedisHuey (blocking pop), no results; call loop",
    ),
    Peer(
        "huey-sqlite",
        "huey",
        "peer_huey_sqlite",
        ("huey==3.5.4", REDIS_PIN),
        "-k process -w {w}, SqliteHuey (WAL), poll 10-500 ms, no results; call loop",
    ),
    Peer(
        "procrastinate",
        "procrastinate",
        "peer_procrastinate",
        ("procrastinate==3.10.0", "psycopg[binary,pool]==3.3.9", REDIS_PIN),
        "{w} x worker --concurrency 1, LISTEN/NOTIFY; batch_defer x1000",
    ),
)
PEER_NAMES = tuple(p.name for p in PEERS)
# rq-fork runs a few dozen tasks a second here: 20000 of them would take minutes per run.
DEFAULT_PEERS = tuple(n for n in PEER_NAMES if n != "rq-fork")


@dataclass
class Result:
    name: str
    config: str
    ok: bool = False
    reason: str = ""
    tasks: int = 0
    submit_per_s: float = 0.0
    complete_per_s: float = 0.0
    e2e_s: float = 0.0
    runs: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peer": self.name, "config": self.config, "ok": self.ok}
        if self.ok:
            out.update(
                tasks=self.tasks,
                submit_per_s=round(self.submit_per_s, 1),
                complete_per_s=round(self.complete_per_s, 1),
                e2e_s=round(self.e2e_s, 3),
            )
        else:
            out["reason"] = self.reason
        if self.versions:
            out["versions"] = self.versions
        if self.runs:
            out["runs"] = self.runs
        return out


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one_line(text: str, limit: int = 300) -> str:
    """The most telling line of some error output, squeezed to one line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "no output"
    line = lines[-1]
    for ln in reversed(lines):  # prefer the exception line over a trailing note
        if "Error" in ln or "error:" in ln.lower() or "Exception" in ln:
            line = ln
            break
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------- venvs


def venv_python(peer: Peer) -> Path:
    return VENVS / peer.venv / "bin" / "python"


def ensure_venv(peer: Peer, timeout: float) -> str | None:
    """Create or reuse the peer's venv; return an error line, or None when it is ready."""
    venv = VENVS / peer.venv
    stamp = venv / ".bench-stamp.json"
    # All peers sharing a venv must ask for the same packages.
    reqs = sorted({r for p in PEERS if p.venv == peer.venv for r in p.requirements})
    want = {"python": sys.version.split()[0], "requirements": reqs}
    python3 = shutil.which("python3") or sys.executable
    # The venv is made with the system python3, whose version may differ from ours.
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        out = subprocess.run(
            [python3, "-c", "import sys; print(sys.version.split()[0])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        want["python"] = out.stdout.strip()
    if stamp.exists() and venv_python(peer).exists():
        with contextlib.suppress(OSError, ValueError):
            if json.loads(stamp.read_text()) == want:
                return None
    log(f"installing {peer.venv} into {venv} ({', '.join(reqs)})")
    if venv.exists():
        shutil.rmtree(venv)
    VENVS.mkdir(parents=True, exist_ok=True)
    steps = [
        [python3, "-m", "venv", str(venv)],
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *reqs,
        ],
    ]
    deadline = time.monotonic() + timeout
    for cmd in steps:
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"install timed out after {timeout:.0f} s: {' '.join(cmd[:4])}"
        if proc.returncode != 0:
            return f"install failed ({' '.join(cmd[:4])}): {one_line(proc.stderr + proc.stdout)}"
    stamp.write_text(json.dumps(want, indent=1))
    return None


# --------------------------------------------------------------------------- cleanup helpers


def redis_flushdb(url: str) -> None:
    """FLUSHDB on the benchmark's Redis database, in raw RESP (this file needs no redis lib)."""
    host, port, db = parse_redis_url(url)

    def cmd(*parts: str) -> bytes:
        out = f"*{len(parts)}\r\n".encode()
        for p in parts:
            b = p.encode()
            out += b"$%d\r\n%s\r\n" % (len(b), b)
        return out

    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(cmd("SELECT", str(db)) + cmd("FLUSHDB"))
        buf = b""
        while buf.count(b"\r\n") < 2:
            chunk = s.recv(1024)
            if not chunk:
                break
            buf += chunk
    if buf.count(b"+OK") < 2:
        raise RuntimeError(f"Redis FLUSHDB answered {buf!r}")


def parse_redis_url(url: str) -> tuple[str, int, int]:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    db = int(u.path.strip("/") or 0)
    return u.hostname or "127.0.0.1", u.port or 6379, db


def kill_pgids_from(pidfile: Path) -> None:
    """SIGKILL every process group a driver recorded (workers it may have left behind)."""
    if not pidfile.exists():
        return
    for line in pidfile.read_text().split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.killpg(int(line), signal.SIGKILL)
    pidfile.unlink()  # once only: a number of an emptied group could be reused later


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- one peer


def driver_cmd(peer: Peer, args: argparse.Namespace, workdir: Path, mode: str) -> list[str]:
    return [
        str(venv_python(peer)),
        str(HERE / "driver.py"),
        peer.module,
        mode,
        "--tasks",
        str(args.tasks),
        "--workers",
        str(args.workers),
        "--timeout",
        str(args.timeout),
        "--workdir",
        str(workdir),
        "--redis-url",
        args.redis_url,
        "--pg-dsn",
        args.pg_dsn,
    ]


def run_driver(
    peer: Peer, args: argparse.Namespace, workdir: Path, mode: str, timeout: float
) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        driver_cmd(peer, args, workdir, mode),
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so a timeout can take it all down
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        return -1, out, f"driver timed out after {timeout:.0f} s\n{err}"
    finally:
        kill_pgids_from(workdir / "pgids")
    return proc.returncode, out, err


def one_run(peer: Peer, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{peer.name}-"))
    try:
        # The driver bounds its own waits by --timeout; allow setup and teardown on top.
        rc, out, err = run_driver(peer, args, workdir, "run", args.timeout + 120)
        result: dict[str, Any] | None = None
        for line in reversed(out.strip().splitlines()):
            with contextlib.suppress(ValueError):
                candidate = json.loads(line)
                if isinstance(candidate, dict):
                    result = candidate
                    break
        if result is None:
            result = {"ok": False, "error": one_line(err or out) if rc else "no JSON from driver"}
        if rc != 0 and result.get("ok"):
            result = {"ok": False, "error": f"driver exited {rc}: {one_line(err)}"}
        return result
    finally:
        # Belt and braces: whatever the driver did, leave Redis and PostgreSQL clean.
        with contextlib.suppress(Exception):
            run_driver(peer, args, workdir, "cleanup", 120)
        with contextlib.suppress(Exception):
            redis_flushdb(args.redis_url)
        shutil.rmtree(workdir, ignore_errors=True)


def bench_peer(peer: Peer, args: argparse.Namespace) -> Result:
    res = Result(peer.name, peer.config.format(w=args.workers))
    err = ensure_venv(peer, args.install_timeout)
    if err:
        res.reason = err
        return res
    for i in range(args.runs):
        log(f"{peer.name}: run {i + 1}/{args.runs}, {args.tasks} tasks, {args.workers} workers")
        load1 = os.getloadavg()[0]  # the machine is shared: a busy one shows up here
        r = one_run(peer, args)
        r["load1_before"] = round(load1, 2)
        res.versions = r.pop("versions", res.versions)
        if not r.get("ok"):
            res.reason = f"run {i + 1}: {r.get('error', 'failed')}"
            res.runs.append(r)
            return res
        res.runs.append(r)
        log(
            f"{peer.name}: submit {r['submit_per_s']:.0f}/s, complete {r['complete_per_s']:.0f}/s,"
            f" e2e {r['e2e_s']:.2f} s"
        )
    res.ok = True
    res.tasks = args.tasks
    res.submit_per_s = statistics.median(r["submit_per_s"] for r in res.runs)
    res.e2e_s = statistics.median(r["e2e_s"] for r in res.runs)
    res.complete_per_s = args.tasks / res.e2e_s
    return res


# --------------------------------------------------------------------------- Tactician


def shown_url(url: str) -> str:
    """The URL for the table: no password, the temporary directory abbreviated."""
    from urllib.parse import urlsplit, urlunsplit

    if url.startswith("sqlite:///"):
        return f"sqlite:///<tmp>/{Path(url.removeprefix('sqlite:///')).name}"
    u = urlsplit(url)
    if u.password is None:
        return url
    netloc = f"{u.username}@{u.hostname}" + (f":{u.port}" if u.port else "")
    return urlunsplit(u._replace(netloc=netloc))


def bench_tactician(label: str, db_url: str, args: argparse.Namespace) -> Result:
    res = Result(
        label, f"tactician bench throughput --workers {args.workers} --db {shown_url(db_url)}"
    )
    if not TACTICIAN.exists():
        res.reason = f"{TACTICIAN} not found (run `make install`)"
        return res
    cmd = [
        str(TACTICIAN),
        "bench",
        "throughput",
        "--tasks",
        str(args.tasks),
        "--workers",
        str(args.workers),
        "--db",
        db_url,
        "--json",
    ]
    log(f"{label}: {' '.join(cmd)}")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timeout = args.timeout * 3 + 120  # it does three runs itself
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        res.reason = f"timed out after {timeout:.0f} s"
        return res
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left running
    if proc.returncode != 0:
        res.reason = f"exit {proc.returncode}: {one_line(err or out)}"
        return res
    data: dict[str, Any] | None = None
    for line in reversed(out.strip().splitlines()):
        with contextlib.suppress(ValueError):
            candidate = json.loads(line)
            if isinstance(candidate, dict):
                data = candidate
                break
    if data is None:
        with contextlib.suppress(ValueError):
            whole = json.loads(out)
            if isinstance(whole, dict):
                data = whole
    keys = ("tasks", "submit_per_s", "complete_per_s", "e2e_s")
    if data is None:
        res.reason = f"no JSON object in its output: {one_line(out or err)}"
        return res
    missing = [k for k in keys if k not in data]
    if missing:
        res.reason = f"its JSON lacks {', '.join(missing)}"
        return res
    res.ok = True
    res.tasks = int(data["tasks"])
    res.submit_per_s = float(data["submit_per_s"])
    res.complete_per_s = float(data["complete_per_s"])
    res.e2e_s = float(data["e2e_s"])
    res.runs = [data]
    return res


# --------------------------------------------------------------------------- output


def ratio(tac: Result | None, peer: Result) -> str:
    if tac is None or not tac.ok or not peer.ok or peer.complete_per_s <= 0:
        return "-"
    return f"{tac.complete_per_s / peer.complete_per_s:.2f}x"


def print_table(results: list[Result], tac: Result | None, tac_pg: Result | None) -> None:
    headers = ["peer", "config", "submit/s", "complete/s (e2e)", "e2e s", "Tactician ÷ peer"]
    if tac_pg is not None:
        headers.append("Tactician-PG ÷ peer")
    rows: list[list[str]] = []
    for r in results:
        if r.ok:
            row = [
                r.name,
                r.config,
                f"{r.submit_per_s:,.0f}",
                f"{r.complete_per_s:,.0f}",
                f"{r.e2e_s:.2f}",
                ratio(tac, r) if not r.name.startswith("tactician") else "",
            ]
        else:
            row = [r.name, f"FAILED: {r.reason}", "-", "-", "-", ""]
        if tac_pg is not None:
            row.append(ratio(tac_pg, r) if r.ok and not r.name.startswith("tactician") else "")
        rows.append(row)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        return
    table = Table(title="No-op task throughput (medians)")
    for i, h in enumerate(headers):
        table.add_column(h, justify="right" if i >= 2 else "left", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = Console(width=180)
    console.print(table)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, help="no-op tasks per run (default 20000)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--runs", type=int, help="runs per peer, median reported (default 3)")
    ap.add_argument(
        "--peers",
        default=",".join(DEFAULT_PEERS),
        help=f"comma list, from {', '.join(PEER_NAMES)} (default: all but rq-fork)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: --tasks 2000 --runs 1")
    ap.add_argument("--json", action="store_true", help="print one JSON object, no table")
    ap.add_argument("--timeout", type=float, default=300.0, help="bound of one run, seconds")
    ap.add_argument("--install-timeout", type=float, default=600.0)
    ap.add_argument("--install-only", action="store_true", help="build the venvs and stop")
    ap.add_argument("--no-tactician", action="store_true", help="skip Tactician")
    ap.add_argument(
        "--tactician-pg",
        metavar="URL",
        help="also run Tactician on this PostgreSQL database (the bench works in a fresh schema"
        " of its own and drops it after), e.g. postgresql://postgres@127.0.0.1:5432/postgres",
    )
    ap.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/15",
        help="Redis database used and FLUSHed by the peers (default db 15)",
    )
    ap.add_argument(
        "--pg-dsn",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="maintenance connection; procrastinate creates and drops bench_procrastinate",
    )
    args = ap.parse_args(argv)
    if args.tasks is None:
        args.tasks = 2000 if args.quick else 20000
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PEER_NAMES]
    if unknown:
        ap.error(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEER_NAMES)}")
    args.peer_list = [p for p in PEERS if p.name in wanted]
    if args.tasks < 1 or args.workers < 1 or args.runs < 1:
        ap.error("--tasks, --workers and --runs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.install_only:
        bad = 0
        for peer in args.peer_list:
            err = ensure_venv(peer, args.install_timeout)
            log(f"{peer.name}: {err or 'ready'}")
            bad += bool(err)
        return 1 if bad else 0

    try:
        redis_flushdb(args.redis_url)
    except (OSError, RuntimeError) as exc:
        log(f"Redis at {args.redis_url} unusable ({exc}); Redis peers will fail")

    results: list[Result] = []
    started = time.time()
    for peer in args.peer_list:
        try:
            res = bench_peer(peer, args)
        except Exception as exc:  # one peer must not take the others down
            reason = f"{type(exc).__name__}: {exc}"
            res = Result(peer.name, peer.config.format(w=args.workers), reason=reason)
        if not res.ok:
            log(f"{peer.name}: FAILED: {res.reason}")
        results.append(res)

    tac: Result | None = None
    tac_pg: Result | None = None
    if not args.no_tactician:
        with tempfile.TemporaryDirectory(prefix="bench-tactician-") as tmp:
            tac = bench_tactician("tactician-sqlite", f"sqlite:///{tmp}/bench.db", args)
        if not tac.ok:
            log(f"tactician-sqlite: FAILED: {tac.reason}")
        results.append(tac)
        if args.tactician_pg:
            tac_pg = bench_tactician("tactician-pg", args.tactician_pg, args)
            if not tac_pg.ok:
                log(f"tactician-pg: FAILED: {tac_pg.reason}")
            results.append(tac_pg)

    if args.json:
        report = {
            "tasks": args.tasks,
            "workers": args.workers,
            "runs": args.runs,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "elapsed_s": round(time.time() - started, 1),
            "results": [r.as_json() for r in results],
        }
        for r, out in zip(results, report["results"], strict=True):
            if r.name.startswith("tactician"):
                continue
            if tac is not None:
                out["tactician_over_peer"] = _ratio_num(tac, r)
            if tac_pg is not None:
                out["tactician_pg_over_peer"] = _ratio_num(tac_pg, r)
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{args.tasks} no-op tasks, {args.workers} workers, median of {args.runs} run(s);"
            f" each task = one Redis INCR"
        )
        print_table(results, tac, tac_pg)
    return 0


def _ratio_num(tac: Result, peer: Result) -> float | None:
    if not tac.ok or not peer.ok or peer.complete_per_s <= 0:
        return None
    return round(tac.complete_per_s / peer.complete_per_s, 3)


if __name__ == "__main__":
    sys.exit(main())
