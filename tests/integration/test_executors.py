"""The HTTP and shell executors through a real worker, against a local HTTP server and sh."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tactician.app import Tactician
from tactician.domain import TargetState, TaskState
from tactician.plan.flow import BACKOFF_FACTOR
from tests.integration.driving import final, make_app, pid_alive, run_until

pytestmark = pytest.mark.timeout(60)


# --- a scripted HTTP server ----------------------------------------------------------------------


@dataclass
class Received:
    path: str
    body: Any
    content_type: str | None


@dataclass
class Server:
    """Answers each path from its script (status codes in order, then `default`)."""

    url: str = ""
    scripts: dict[str, list[int]] = field(default_factory=dict)
    defaults: dict[str, int] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, path: str, body: Any, content_type: str | None) -> int:
        with self.lock:
            self.received.append(Received(path, body, content_type))
            script = self.scripts.get(path)
            if script:
                return script.pop(0)
            return self.defaults.get(path, 200)

    def hits(self, path: str) -> int:
        with self.lock:
            return sum(1 for r in self.received if r.path == path)


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status = state.answer(self.path, json.loads(raw), self.headers.get("Content-Type"))
            body = f"status {status} for {self.path}".encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


# --- driving ---------------------------------------------------------------------------------


def target(app: Tactician, name: str) -> TargetState:
    return {t.target: t for t in app.store.targets()}[name]


@pytest.fixture
def app(db_url: str) -> Iterator[Tactician]:
    the_app = make_app(db_url)
    yield the_app
    the_app.close()


# --- HTTP ------------------------------------------------------------------------------------


def test_http_2xx_succeeds_and_posts_the_payload(app: Tactician, server: Server) -> None:
    server.defaults["/hook"] = 202
    app.http_task("notify", f"{server.url}/hook")
    payload = {"incident": 42, "text": "disk full", "tags": ["a", "b"]}
    task_id = app.submit("notify", payload)

    assert run_until(app, final(app, task_id))

    task = app.get(task_id)
    assert task.state is TaskState.SUCCEEDED, task.last_error
    assert task.attempt == 1
    assert server.received == [Received("/hook", payload, "application/json")]


def test_http_500_is_retried(app: Tactician, server: Server) -> None:
    server.scripts["/flaky"] = [500, 502]
    app.http_task("flaky", f"{server.url}/flaky", retries=3, backoff=0.02)
    task_id = app.submit("flaky", {"n": 1})

    assert run_until(app, final(app, task_id))

    task = app.get(task_id)
    assert task.state is TaskState.SUCCEEDED
    assert task.attempt == 3
    assert server.hits("/flaky") == 3
    attempts = app.store.attempts(task_id)
    assert [a.outcome for a in attempts] == ["failed", "failed", "succeeded"]
    assert attempts[0].error is not None and "answered 500" in attempts[0].error
    assert attempts[1].error is not None and "answered 502" in attempts[1].error


def test_http_4xx_is_dead_at_once(app: Tactician, server: Server) -> None:
    server.defaults["/gone"] = 404
    app.http_task("gone", f"{server.url}/gone", retries=5, backoff=0.01)
    task_id = app.submit("gone", {"n": 1})

    assert run_until(app, final(app, task_id))

    task = app.get(task_id)
    assert task.state is TaskState.DEAD
    assert task.attempt == 1
    assert task.last_error is not None and "answered 404" in task.last_error
    assert server.hits("/gone") == 1


def test_an_unreachable_target_is_retried(app: Tactician, server: Server) -> None:
    app.http_task("nowhere", "http://127.0.0.1:9/none", retries=1, backoff=0.01)
    task_id = app.submit("nowhere", {})

    assert run_until(app, final(app, task_id))

    task = app.get(task_id)
    assert task.state is TaskState.DEAD
    assert task.attempt == 2
    assert task.last_error is not None and "POST http://127.0.0.1:9/none failed" in task.last_error


@pytest.mark.parametrize("status", [429, 503])
def test_overload_lowers_the_adaptive_limit_and_successes_raise_it(
    app: Tactician, server: Server, status: int
) -> None:
    server.defaults["/busy"] = status
    app.http_task("busy", f"{server.url}/busy", retries=0, max_concurrency=10)
    app.http_task("fine", f"{server.url}/fine", max_concurrency=10)

    first = app.submit("busy", {"n": 1})
    assert run_until(app, final(app, first))
    task = app.get(first)
    assert task.state is TaskState.DEAD
    assert task.last_error is not None and task.last_error.startswith("TargetOverloaded")
    after_one = target(app, server.url).limit
    assert after_one == pytest.approx(10 * BACKOFF_FACTOR)

    second = app.submit("busy", {"n": 2})
    assert run_until(app, final(app, second))
    after_two = target(app, server.url).limit
    assert after_two == pytest.approx(10 * BACKOFF_FACTOR**2)

    recovered = app.submit("fine", {"n": 3})
    assert run_until(app, final(app, recovered))
    assert app.get(recovered).state is TaskState.SUCCEEDED
    after_success = target(app, server.url).limit
    assert after_success is not None and after_two is not None
    assert after_success == pytest.approx(after_two + 1 / after_two)


def test_the_breaker_opens_then_lets_one_probe_through(app: Tactician, server: Server) -> None:
    server.defaults["/down"] = 500
    app.http_task(
        "fragile", f"{server.url}/down", retries=0, breaker_threshold=3, breaker_cooldown=1.0
    )
    failing = [app.submit("fragile", {"n": i}) for i in range(3)]
    assert run_until(app, final(app, *failing))
    assert target(app, server.url).breaker == "open"
    assert server.hits("/down") == 3

    # While open, nothing reaches the server.
    waiting = [app.submit("fragile", {"n": i}) for i in (3, 4)]
    assert not run_until(app, lambda: False, timeout=0.5)
    assert server.hits("/down") == 3
    assert {app.get(t).state for t in waiting} == {TaskState.READY}

    # After the cooldown, exactly one probe; it fails and the breaker opens again.
    assert run_until(app, lambda: any(app.get(t).state.is_final for t in waiting), timeout=4)
    assert server.hits("/down") == 4
    assert target(app, server.url).breaker == "open"
    assert not run_until(app, lambda: False, timeout=0.4)
    assert server.hits("/down") == 4
    assert sorted(app.get(t).state for t in waiting) == [TaskState.DEAD, TaskState.READY]

    # The target heals: the next probe succeeds and closes the breaker.
    server.defaults["/down"] = 200
    assert run_until(app, final(app, *waiting), timeout=4)
    assert server.hits("/down") == 5
    state = target(app, server.url)
    assert state.breaker == "closed"
    assert state.consecutive_failures == 0


def test_the_breaker_holds_back_a_burst(app: Tactician, server: Server) -> None:
    server.defaults["/down"] = 500
    app.http_task(
        "fragile", f"{server.url}/down", retries=0, breaker_threshold=3, breaker_cooldown=60.0
    )
    burst = [app.submit("fragile", {"n": i}) for i in range(10)]

    run_until(app, final(app, *burst), timeout=3)

    assert target(app, server.url).breaker == "open"
    assert server.hits("/down") == 3  # the grants made before the failures were taken back


# --- shell -----------------------------------------------------------------------------------


def test_shell_gets_the_payload_on_stdin(app: Tactician, tmp_path: Path) -> None:
    out = tmp_path / "payload.json"
    app.shell_task("save", ["sh", "-c", f"cat > {out}"])
    payload = {"user": "ada", "count": 3}
    task_id = app.submit("save", payload)

    assert run_until(app, final(app, task_id))

    assert app.get(task_id).state is TaskState.SUCCEEDED
    assert json.loads(out.read_text()) == payload


def test_shell_non_zero_exit_fails_with_the_stderr_tail(app: Tactician) -> None:
    script = "echo 'some noise'; echo 'disk quota exceeded' >&2; exit 3"
    app.shell_task("broken", ["sh", "-c", script], retries=1, backoff=0.01)
    task_id = app.submit("broken", {})

    assert run_until(app, final(app, task_id))

    task = app.get(task_id)
    assert task.state is TaskState.DEAD
    assert task.attempt == 2  # retried once
    assert task.last_error is not None
    assert "sh exited with 3" in task.last_error
    assert "disk quota exceeded" in task.last_error


def test_shell_missing_command_is_dead_at_once(app: Tactician) -> None:
    app.shell_task("missing", ["/no/such/command", "--flag"], retries=3)
    task_id = app.submit("missing", {})

    assert run_until(app, final(app, task_id))

    task = app.get(task_id)
    assert task.state is TaskState.DEAD
    assert task.attempt == 1
    assert task.last_error is not None and "command not found: /no/such/command" in task.last_error


def test_cancelling_a_shell_task_kills_its_command(sqlite_url: str, tmp_path: Path) -> None:
    app = make_app(sqlite_url, lease_seconds=1.0)
    pid_file = tmp_path / "sleep.pid"
    app.shell_task("hang", ["sh", "-c", f"echo $$ > {pid_file}; exec sleep 30"], timeout=60)
    task_id = app.submit("hang", {})
    cancelled: list[float] = []

    def cancel_once_running() -> None:
        if not cancelled and pid_file.exists() and pid_file.read_text().strip():
            app.cancel(task_id)
            cancelled.append(time.monotonic())

    assert run_until(app, final(app, task_id), each=cancel_once_running)

    assert app.get(task_id).state is TaskState.CANCELLED
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 2
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(pid), "the command outlived its cancelled task"
    app.close()


def test_a_shell_command_past_its_hard_timeout_is_killed(sqlite_url: str, tmp_path: Path) -> None:
    app = make_app(sqlite_url)
    pid_file = tmp_path / "sleep.pid"
    app.shell_task(
        "slow", ["sh", "-c", f"echo $$ > {pid_file}; exec sleep 30"], timeout=0.5, retries=0
    )
    task_id = app.submit("slow", {})

    assert run_until(app, final(app, task_id))

    task = app.get(task_id)
    assert task.state is TaskState.DEAD
    assert task.last_error is not None and "timed out" in task.last_error
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 2
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(pid), "the command outlived its timed-out task"
    app.close()
