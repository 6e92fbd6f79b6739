"""Edge agents end to end: a real centre (`tactician serve` on PostgreSQL) and two real
`tactician agent` processes on loopback, one of them behind a TCP proxy the test cuts for a
while under load, the other killed with SIGKILL (its whole process group, as a machine that
loses power) and started again. Nothing is lost, only a task in flight at the crash may run
twice, the shared rate limit holds across both sites in every window, a task that needs
approval is never run, and both audit chains verify and agree."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tactician.app import Tactician
from tactician.domain import NewTask
from tactician.govern.audit import verify
from tactician.govern.roles import Actor, Role
from tactician.settings import Settings
from tactician.sim.checks import rate_violations
from tactician.sim.leases import RateLimit

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

TACTICIAN = str(Path(sys.executable).with_name("tactician"))
RATE, BURST = 10.0, 2.0
PER_SITE = 40
POLICY = f"""name: edge
limits:
  call_api:
    rate: {RATE:g}/s
    burst: {BURST:g}
approvals:
  - name: risky-needs-a-person
    match: {{kinds: [risky]}}
    approvers: {{roles: [approver]}}
  - name: routine-goes-ahead-offline
    match: {{kinds: [routine]}}
    approvers: {{roles: [approver]}}
    offline: approve
"""
APP = """import json, os, time
from tactician import Tactician

app = Tactician()


# Retries: a run lost with its worker (the crash) is run again, not given up (at-least-once).
@app.task(name="call_api", retries=3, backoff=0.1)
def call_api(n: int) -> None:
    with open(os.environ["EDGE_LOG"], "a") as log:
        log.write(json.dumps({"n": n, "at": time.time()}) + "\\n")
    time.sleep(0.05)  # a call takes a while: a crash may well catch one in flight


@app.task(name="risky", retries=0)
def risky(n: int) -> None:
    with open(os.environ["EDGE_LOG"], "a") as log:
        log.write(json.dumps({"risky": n, "at": time.time()}) + "\\n")


@app.task(name="routine", retries=0)
def routine(n: int) -> None:
    with open(os.environ["EDGE_LOG"], "a") as log:
        log.write(json.dumps({"routine": n, "at": time.time()}) + "\\n")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proxy:
    """A TCP relay to the centre that can be cut (connections dropped, new ones refused)."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.up = threading.Event()
        self.up.set()
        self.conns: list[socket.socket] = []
        self.every: list[socket.socket] = []
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.server.settimeout(0.1)
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.every.append(client)
            if not self.up.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [client, upstream]
                self.every.append(upstream)
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            while self.up.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.close()

    def cut(self) -> None:
        self.up.clear()
        with self.lock:
            for s in self.conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.conns.clear()

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.stopped = True
        self.cut()
        self.server.close()
        time.sleep(0.3)  # the relay threads see the cut and end
        with self.lock:
            for s in self.every:
                s.close()


def wait_until(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A process in a session of its own, so that its children can be killed with it."""
    with log.open("ab") as out:
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(ProcessLookupError):  # anything of its own it left behind
        os.killpg(proc.pid, signal.SIGKILL)


def crash(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the process and every process it started, at once."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = start(args, env, log)
    try:
        yield proc
    finally:
        stop(proc)


def test_two_agents_one_cut_off_under_load(
    pg_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TACTICIAN_")}
    centre_env = {**base_env, "TACTICIAN_MODELS_DIR": str(tmp_path / "centre" / "models")}
    subprocess.run([TACTICIAN, "agent", "keygen"], env=centre_env, check=True, capture_output=True)
    public = tmp_path / "centre" / "agent" / "signing.pub"
    centre = Tactician(settings=Settings(db=pg_url))
    request.addfinalizer(centre.close)  # also when a check fails half-way
    root = Actor("root", Role.ADMIN)
    centre.gate.deploy(root, POLICY, "edge.yaml")
    secrets = {  # each agent acts with its own site's token
        site: centre.gate.create_token(root, f"edge-{site}", Role.OPERATOR, site=site)
        for site in ("north", "south")
    }
    viewer = centre.gate.create_token(root, "looker", Role.VIEWER)
    (tmp_path / "edgeapp.py").write_text(APP)
    port = free_port()
    proxy = Proxy(port)
    with contextlib.ExitStack() as stack:
        stack.callback(proxy.close)
        stack.enter_context(
            process(
                [TACTICIAN, "serve", "--db", pg_url, "--workers", "0", "--port", str(port)],
                centre_env,
                tmp_path / "centre.log",
            )
        )
        client = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5))

        def up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return client.get(
                    "/sites", headers={"Authorization": f"Bearer {viewer}"}
                ).is_success
            return False

        wait_until("the centre's API", up, 30)
        # A viewer may look at the sites but not pull a bundle.
        refused = client.get(
            "/agents/bundle",
            params={"site": "north"},
            headers={"Authorization": f"Bearer {viewer}"},
        )
        assert refused.status_code == 403, refused.text

        sites = {"north": port, "south": proxy.port}
        dbs = {site: f"sqlite:///{tmp_path}/{site}.db" for site in sites}

        def launch(site: str) -> subprocess.Popen[bytes]:
            env = {
                **base_env,
                "TACTICIAN_MODELS_DIR": str(tmp_path / site / "models"),
                # A crashed worker's claim and an unclaimed grant come back in 3 s.
                "TACTICIAN_LEASE_SECONDS": "3",
                "TACTICIAN_DISPATCH_TIMEOUT": "3",
                "EDGE_LOG": str(tmp_path / f"{site}.jsonl"),
                "PYTHONPATH": str(tmp_path),
            }
            args = [
                *(TACTICIAN, "agent", "--central", f"http://127.0.0.1:{sites[site]}"),
                *("--token", secrets[site], "--site", site, "--public-key", str(public)),
                *("--db", dbs[site], "--app", "edgeapp:app", "--sync-every", "0.2"),
                *("--lease-s", "3"),
                # South follows the rules' offline fallbacks 2 s into its cut; north, whose
                # link only dies with its crash, would wait 10 minutes.
                *("--offline-after", "2" if site == "south" else "600"),
                *(("--port", str(south_api)) if site == "south" else ()),
            ]
            return start(args, env, tmp_path / f"{site}.log")

        local = {site: Tactician(settings=Settings(db=url)) for site, url in dbs.items()}
        for app in local.values():
            request.addfinalizer(app.close)
        # South takes its local work through its own API (up while its link is cut), with a
        # token of its own store; north's is written to its store directly.
        south_api = free_port()
        south_token = local["south"].gate.create_token(root, "south-ops", Role.OPERATOR)
        agents = {site: launch(site) for site in sites}
        stack.callback(lambda: [stop(p) for p in agents.values()])
        south = stack.enter_context(
            httpx.Client(
                base_url=f"http://127.0.0.1:{south_api}",
                headers={"Authorization": f"Bearer {south_token}"},
                timeout=5,
            )
        )

        def installed() -> bool:
            with contextlib.suppress(Exception):
                return all(
                    "call_api" in app.store.kinds() and app.store.deployed().get("live")
                    for app in local.values()
                )
            return False

        wait_until("both agents on the bundle", installed, 30)

        def south_up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return south.get("/healthz").is_success
            return False

        wait_until("south's own API", south_up, 30)
        ids: dict[str, list[str]] = {site: [] for site in sites}
        risky: dict[str, str] = {}
        started = time.monotonic()
        for site, app in local.items():
            (risky[site],) = app.submit_many([NewTask("risky", {"n": 0})])
        (routine,) = local["south"].submit_many([NewTask("routine", {"n": 0})])
        cut_at, restored = 1.5, 6.0
        crash_at, back_at = 2.5, 3.5  # north, while south is cut off
        crashed = False
        batch = 0
        while batch < PER_SITE // 5:
            elapsed = time.monotonic() - started
            if elapsed >= cut_at and proxy.up.is_set() and elapsed < restored:
                proxy.cut()
                south_seen = _seen(client, viewer)["south"]
            if elapsed >= restored and not proxy.up.is_set():
                # The centre heard nothing from the cut-off site meanwhile.
                assert _seen(client, viewer)["south"] == south_seen
                proxy.restore()
            if elapsed >= crash_at and not crashed:
                # The moment north's handler starts a call (it then takes 50 ms): killed with
                # a run in hand, which its retry runs again.
                calls = tmp_path / "north.jsonl"

                def size() -> int:
                    return calls.stat().st_size if calls.exists() else 0  # noqa: B023

                before, deadline = size(), time.monotonic() + 30
                while size() == before and time.monotonic() < deadline:
                    time.sleep(0.002)
                assert size() > before, "north started no call to crash in"
                crash(agents["north"])
                crashed = True
            if elapsed >= back_at and agents["north"].returncode is not None:
                agents["north"] = launch("north")
            # A crashed site's store still takes local work.
            tasks = [NewTask("call_api", {"n": batch * 5 + i}) for i in range(5)]
            ids["north"] += local["north"].submit_many(tasks)
            for task in tasks:
                posted = south.post("/tasks", json={"kind": task.kind, "payload": task.payload})
                assert posted.status_code == 201, posted.text
                ids["south"].append(posted.json()["id"])
            batch += 1
            time.sleep(0.5)
        assert crashed and agents["north"].poll() is None
        while not proxy.up.is_set():
            if time.monotonic() - started >= restored:
                proxy.restore()
            time.sleep(0.1)

        def all_done() -> bool:
            return all(
                all(app.get(t).state.value == "succeeded" for t in ids[site])
                for site, app in local.items()
            )

        wait_until("every task to succeed", all_done, 60)
        # Cut off past --offline-after, south approved its routine task in its own name.
        wait_until(
            "south's offline fallback", lambda: _state(local["south"], routine) == "succeeded", 30
        )
        # An approver at the centre answers north's risky task; the vote reaches north with a
        # sync reply and goes through north's own gate.
        approver = centre.gate.create_token(root, "ann", Role.APPROVER)
        signed = {"Authorization": f"Bearer {approver}"}
        path = "/sites/north/approvals"

        def listed_at_centre() -> bool:
            rows = client.get(path, headers=signed).json()
            return any(r["task_id"] == risky["north"] for r in rows)

        wait_until("north's approval seen at the centre", listed_at_centre, 30)
        voted = client.post(
            f"{path}/{risky['north']}", headers=signed, json={"verdict": "approve", "reason": "ok"}
        )
        assert voted.status_code == 202, voted.text
        wait_until(
            "north's approved task to run",
            lambda: _state(local["north"], risky["north"]) == "succeeded",
            30,
        )

        def synced() -> bool:
            rows = {
                r["name"]: r
                for r in client.get("/sites", headers={"Authorization": f"Bearer {viewer}"}).json()
            }
            return all(
                site in rows and rows[site]["acked_seq"] >= app.store.audit_head()[0]
                for site, app in local.items()
            )

        # Leasing goes on writing nothing to the chains: once the work is done they stop moving.
        wait_until("both chains synced", synced, 30)
        listed = subprocess.run(
            [
                TACTICIAN,
                "sites",
                "--central",
                f"http://127.0.0.1:{port}",
                "--token",
                viewer,
                "--json",
            ],
            capture_output=True,
            check=True,
            env=base_env,
        )
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert set(rows) == {"north", "south"}
        assert rows["north"]["bundle_version"] == centre.gate.policy().version
        assert rows["north"]["link_up"] and rows["south"]["link_up"]

    # Nothing lost: every task ran. South ran each exactly once; north at most once more the
    # task its one runner had in hand when it was killed (at-least-once).
    handled: list[tuple[str, float]] = []
    for site in local:
        lines = [json.loads(x) for x in (tmp_path / f"{site}.jsonl").read_text().splitlines()]
        runs = sorted(x["n"] for x in lines if "n" in x)
        assert sorted(set(runs)) == list(range(PER_SITE)), site
        assert len(runs) - PER_SITE <= (1 if site == "north" else 0), (site, runs)
        print(f"{site}: {len(runs)} runs of {PER_SITE} tasks")
        handled += [(ids[site][x["n"]], x["at"]) for x in lines if "n" in x]
        # The task that needs a person: south's waits (its rule holds offline), north's ran
        # once, after the approver's vote at the centre.
        assert len([x for x in lines if "risky" in x]) == (1 if site == "north" else 0)
        assert len([x for x in lines if "routine" in x]) == (1 if site == "south" else 0)
    assert _state(local["south"], risky["south"]) == "awaiting_approval"
    fallback = local["south"].store.approval(routine)
    assert fallback.state == "approved" and "offline fallback" in (fallback.reason or "")
    # The shared rate, in every window: both sites' grants (from their own audit chains)
    # together never exceed burst + rate x W in any W seconds.
    granted: dict[str, list[float]] = {}
    for site, app in local.items():
        work = set(ids[site])
        for r in app.store.audit_records():
            if r.action == "task.granted":
                for task in r.details["tasks"]:
                    if task in work:
                        granted.setdefault(task, []).append(r.at)
    grants = sorted(t for times in granted.values() for t in times)
    limit = RateLimit(RATE, BURST)
    assert rate_violations(grants, limit) == 0
    assert grants[-1] - grants[0] >= (2 * PER_SITE - BURST) / RATE  # and it did slow them
    # Each call reaches the API some time after its grant; the calls keep the rate up to the
    # spread of that delay (burst + rate x (W + spread)): the scheduler's part is exact.
    delays = [at - max(t for t in granted[task] if t <= at) for task, at in handled]
    spread = max(delays) - min(delays)
    print(f"grants {len(grants)}, dispatch delay {min(delays):.3f}..{max(delays):.3f}s")
    calls = [at for _, at in handled]
    assert rate_violations(calls, RateLimit(RATE, BURST + RATE * spread)) == 0

    # Both chains verify, and the centre's holds each of the site's records, hash for hash.
    centre_chain = list(centre.store.audit_records())
    assert verify(centre_chain).ok
    for site, app in local.items():
        chain = list(app.store.audit_records())
        assert verify(chain).ok, site
        mirrored = [
            (r.details["seq"], r.details["hash"])
            for r in centre_chain
            if r.action.startswith("site.") and r.details.get("site") == site
        ]
        assert mirrored == [(r.seq, r.hash) for r in chain], site
        app.close()
    centre.close()


def _state(app: Tactician, task: str) -> str:
    return str(app.get(task).state.value)


def _seen(client: httpx.Client, token: str) -> dict[str, float]:
    rows = client.get("/sites", headers={"Authorization": f"Bearer {token}"}).json()
    return {r["name"]: r["last_seen"] for r in rows}
