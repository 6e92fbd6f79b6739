"""`tactician serve` keeps its children running: a worker killed with SIGKILL is started again
(one log line each way), the work goes on, and SIGTERM still stops the whole family."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from tactician.app import Tactician
from tactician.settings import Settings

from .procs import APP, TACTICIAN, Cluster, Proc, read_effects, wait_until

STARTED = re.compile(r"worker-0 started \(pid (\d+)\)")


def started_pids(serve: Proc) -> list[int]:
    return [int(pid) for pid in STARTED.findall(serve.text())]


def serve_one_worker(cluster: Cluster, db: str) -> Proc:
    """`tactician serve` with one worker and no API, once its worker has started."""
    argv = [TACTICIAN, "serve", "--app", APP, "--db", db, "--workers", "1", "--port", "0"]
    serve = Proc("serve", argv, cluster.env, cluster.log_dir)
    cluster.procs.append(serve)
    serve.start()
    wait_until(lambda: len(started_pids(serve)) == 1, 60, serve.tail)
    return serve


def done(cluster: Cluster) -> int:
    return sum(1 for line in read_effects(cluster.effects) if line[0] == "done")


def test_a_killed_worker_is_started_again_and_the_work_goes_on(
    sqlite_url: str, tmp_path: Path
) -> None:
    with Cluster(sqlite_url, tmp_path) as cluster:
        serve = serve_one_worker(cluster, sqlite_url)
        (first,) = started_pids(serve)
        app = Tactician(settings=Settings(db=sqlite_url))
        try:
            for n in range(5):
                app.submit("work", {"key": f"before-{n}"})
            wait_until(lambda: done(cluster) == 5, 60, serve.tail)
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: len(started_pids(serve)) == 2, 30, serve.tail)
            second = started_pids(serve)[1]
            assert second != first
            assert f"worker-0 (pid {first}) exited with code -9" in serve.text()
            assert "starting it again in 1 s" in serve.text()
            for n in range(5):
                app.submit("work", {"key": f"after-{n}"})
            wait_until(lambda: done(cluster) == 10, 60, serve.tail)
        finally:
            app.close()
        assert serve.stop() == 0
        assert not serve.strays()
        for pid in (first, second):
            wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 10, serve.tail)


def test_when_the_planner_dies_the_supervisor_stops_the_workers(
    sqlite_url: str, tmp_path: Path
) -> None:
    with Cluster(sqlite_url, tmp_path) as cluster:
        serve = serve_one_worker(cluster, sqlite_url)
        (worker,) = started_pids(serve)
        serve.kill_only_the_process()  # as the OOM killer would take the planner alone
        wait_until(lambda: not Path(f"/proc/{worker}").exists(), 45, serve.tail)
        assert "is gone: stopping its children" in serve.text()
