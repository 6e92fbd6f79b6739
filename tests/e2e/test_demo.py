"""`tactician demo` as a user runs it: a real process that serves the console while the logistics
scenario streams in, then stops by itself when its --duration is up."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.e2e.serving import free_port

TACTICIAN = Path(sys.executable).parent / "tactician"
BANNER = re.compile(r"Console: (http://127\.0\.0\.1:\d+)/console/\s+token: (\S+)")


def test_the_demo_serves_the_console_with_work_arriving_and_approvals_waiting(
    tmp_path: Path,
) -> None:
    port = free_port()
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    command = [str(TACTICIAN), "demo", "--port", str(port), "--duration", "20", "--db", db]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert process.stdout is not None
    stdout = process.stdout

    def read() -> None:
        for line in stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 15
        banner = None
        while banner is None and time.monotonic() < deadline:
            banner = next((m for line in lines if (m := BANNER.search(line))), None)
            time.sleep(0.1)
        assert banner is not None, "".join(lines)
        base, token = banner.group(1), banner.group(2)
        assert base == f"http://127.0.0.1:{port}"

        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/readyz").status_code == 200
            auth = {"Authorization": f"Bearer {token}"}
            assert client.get("/tasks").status_code == 401
            states: set[str] = set()
            seen: set[str] = set()
            pending: list[object] = []
            deadline = time.monotonic() + 16
            while time.monotonic() < deadline:
                page = client.get("/tasks", params={"limit": 1000}, headers=auth)
                assert page.status_code == 200
                items = page.json()["items"]
                seen |= {t["id"] for t in items}
                states |= {t["state"] for t in items}
                pending = client.get("/approvals", headers=auth).json()
                if "succeeded" in states and pending and len(seen) > 70:
                    break
                time.sleep(0.5)
            assert "succeeded" in states, states
            assert len(seen) > 70, "tasks keep arriving after the first bookings"
            assert pending, "a sensitive delivery waits for an approver"
            assert all(a["rule"] == "sensitive-deliveries" for a in pending)  # type: ignore[index]
            console = client.get("/console/kpis", follow_redirects=False)
            assert console.status_code == 303  # the console asks for a sign-in

        assert process.wait(timeout=20) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(5)
        stdout.close()
    output = "".join(lines)
    assert re.search(r"arrived +\d+", output)
    assert "stopped" in output
