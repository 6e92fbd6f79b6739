"""Prometheus metrics on real databases: the exposition parses with prometheus-client's own
parser, and the counters move as a real planner and worker run tasks (successes, a retry, a
failure, a timeout, rate-limited work, deadlines met and missed), as an operator intervenes, a
rule holds a task for approval, an event is dead-lettered and the LLM advisor is asked.

Scrapes go through the real API, served over HTTP. What only the planner's and workers' memory
sees is flushed to the database every few seconds (here every 0.1 s) and at exit."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tactician.app import Tactician
from tactician.clock import SYSTEM_CLOCK
from tactician.decide.advice import AdviceRequest
from tactician.decide.decision import Action, Decision, Reason, Tier
from tactician.domain import NewTask
from tactician.govern.approvals import Match, RuleSpec
from tactician.govern.records import NewApproval
from tactician.govern.roles import Actor, Role
from tactician.observe import counters
from tactician.observe.metrics import metrics_text
from tactician.run.advisor import AdvisorConfig, BackgroundAdvisor, LLMAdvisor
from tactician.run.worker import WorkerOptions
from tactician.settings import Settings
from tests.e2e.serving import serving
from tests.integration.driving import final, make_app, run_until

pytestmark = pytest.mark.timeout(90)
OPS = Actor("ops", Role.OPERATOR)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --- handlers (module level: they run in forked runner processes) ----------------------------


def noop(n: int) -> None:
    """Does nothing."""


def boom(n: int) -> None:
    raise RuntimeError("boom")


def flaky(marker: str) -> None:
    """Fails on its first attempt, succeeds on the next."""
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise RuntimeError("first attempt fails")


def nap(seconds: float) -> None:
    time.sleep(seconds)


# --- scraping ---------------------------------------------------------------------------------


def parse(text: str) -> Samples:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(app: Tactician) -> Samples:
    return parse(metrics_text(app.store).decode())


def over_http(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def moved(after: Samples, before: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture
def fresh_counters() -> Iterator[counters.Counters]:
    """This process's counters, emptied of what earlier tests counted, flushed often."""
    default = counters.DEFAULT
    saved = default.enabled, default.flush_every_s
    default.enabled, default.flush_every_s = True, 0.1
    default.take()
    yield default
    default.enabled, default.flush_every_s = saved
    default.take()


@pytest.fixture
def app(db_url: str) -> Iterator[Tactician]:
    app = make_app(db_url)
    app.task(noop, name="job", pool="p")
    app.pool("p", 2)
    yield app
    app.close()


def test_the_counters_move_as_work_runs(app: Tactician) -> None:
    before = scrape(app)
    assert before[("tactician_access_refused_total", ())] == 0
    ids = app.submit_many([NewTask("job", {"n": i}) for i in range(5)])
    waiting = scrape(app)
    assert waiting[("tactician_tasks", (("pool", "p"), ("state", "ready")))] == 5
    assert waiting[("tactician_oldest_ready_task_age_seconds", (("pool", "p"),))] >= 0
    assert run_until(app, final(app, *ids), timeout=30)
    after = scrape(app)
    done = (("kind", "job"), ("outcome", "succeeded"))
    assert after[("tactician_attempts_total", done)] == 5
    assert after[("tactician_tasks_finished_total", (("pool", "p"), ("state", "succeeded")))] == 5
    assert after[("tactician_run_seconds_total", (("kind", "job"),))] >= 0
    assert ("tactician_tasks", (("pool", "p"), ("state", "ready"))) not in after


def test_interventions_approvals_and_dead_letters_are_counted(app: Tactician) -> None:
    (task_id,) = app.submit_many([NewTask("job", {"n": 1})], actor=OPS)
    app.store.set_override(task_id, "pin", 0.5, OPS, "vip")
    app.store.hold(task_id, OPS, "freeze")
    rule = RuleSpec("check", Match(kinds=("job",)), roles=("approver",))
    app.store.submit(
        [NewTask("job", {"n": 2})], app.known_kinds(), approvals={0: NewApproval(rule, "v", "ops")}
    )
    app.store.dead_letter("shop", "the body is not JSON", b"{oops", {})
    samples = scrape(app)
    assert samples[("tactician_manual_interventions_total", (("action", "override.set"),))] == 1
    assert samples[("tactician_manual_interventions_total", (("action", "task.held"),))] == 1
    assert samples[("tactician_approvals_pending", ())] == 1
    assert samples[("tactician_dead_letters_total", ())] == 1
    assert samples[("tactician_pool_utilization_ratio", (("pool", "p"),))] == 0


def test_each_family_is_declared_once_however_many_pools_and_targets(app: Tactician) -> None:
    app.pool("q", 4)
    app.store.set_pool("r", None)
    text = metrics_text(app.store).decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    samples = parse(text)
    assert samples[("tactician_pool_utilization_ratio", (("pool", "q"),))] == 0
    assert ("tactician_pool_utilization_ratio", (("pool", "r"),)) not in samples  # unbounded
    for name, spec in counters.METRICS.items():
        assert (name if spec.buckets else f"{name}_total") in types


# --- a mixed run, scraped over HTTP while it runs ---------------------------------------------


def test_a_run_moves_every_counter_by_what_happened(
    db_url: str, tmp_path: Path, fresh_counters: counters.Counters
) -> None:
    app = make_app(db_url)
    app.task(noop, name="ok", pool="p")
    app.task(flaky, name="flaky", pool="p", retries=1, backoff=0.01)
    app.task(boom, name="boom", pool="p", retries=0)
    app.task(nap, name="slow", pool="p", retries=0, timeout=0.5)
    app.task(noop, name="limited", pool="p", rate="1/s")
    app.task(nap, name="late", pool="p", retries=0)
    app.pool("p", 3)
    settings = Settings(db=db_url)
    try:
        with serving(settings) as client:
            before = over_http(client)
            now = app.store.db_now()
            ids = app.submit_many(
                [NewTask("ok", {"n": i}) for i in range(4)]
                + [NewTask("ok", {"n": 9}, due_at=now + 3600)]  # met
                + [NewTask("late", {"seconds": 0.3}, due_at=now + 0.01)]  # missed
                + [NewTask("flaky", {"marker": str(tmp_path / "flaky")})]
                + [NewTask("boom", {"n": 0}), NewTask("slow", {"seconds": 5.0})]
                + [NewTask("limited", {"n": i}) for i in range(3)]
            )
            during: list[tuple[Samples, bool]] = []
            last = [0.0]

            def look() -> None:  # from the worker's loop: scrape every 0.2 s while it runs
                if time.monotonic() - last[0] >= 0.2:
                    last[0] = time.monotonic()
                    done = all(app.get(t).state.is_final for t in ids)
                    during.append((over_http(client), done))

            assert run_until(
                app,
                final(app, *ids),
                timeout=40,
                options=WorkerOptions(concurrency=3, poll_interval=0.01),
                each=look,
            )
            after = over_http(client)
    finally:
        app.close()

    # Scraped while tasks were still running, the counters had moved already, never backwards.
    running = [samples for samples, done in during if not done]
    assert running, "no scrape happened while the run was under way"
    assert any(moved(s, before, "tactician_decisions_total") > 0 for s in running)
    assert any(moved(s, before, "tactician_dispatch_latency_seconds_count") > 0 for s in running)
    for name in ("tactician_decisions_total", "tactician_dispatch_latency_seconds_count"):
        seen = [moved(s, before, name) for s, _ in during] + [moved(after, before, name)]
        assert seen == sorted(seen), f"{name} went backwards: {seen}"

    # What the database holds.
    assert moved(after, before, "tactician_attempts_total", kind="ok", outcome="succeeded") == 5
    assert moved(after, before, "tactician_attempts_total", kind="flaky", outcome="failed") == 1
    assert moved(after, before, "tactician_attempts_total", kind="flaky", outcome="succeeded") == 1
    assert moved(after, before, "tactician_attempts_total", kind="boom", outcome="failed") == 1
    assert moved(after, before, "tactician_attempts_total", kind="slow", outcome="timeout") == 1
    assert moved(after, before, "tactician_retries_total") == 1
    assert moved(after, before, "tactician_tasks_finished_total", pool="p", state="dead") == 2
    assert moved(after, before, "tactician_deadlines_total", pool="p", outcome="met") == 1
    assert moved(after, before, "tactician_deadlines_total", pool="p", outcome="missed") == 1

    # What only the planner's and the worker's memory saw, flushed.
    assert moved(after, before, "tactician_rate_limit_waits_total", kind="limited") == 2
    assert moved(after, before, "tactician_decisions_total") == 12  # each task once
    assert moved(after, before, "tactician_decisions_out_of_distribution_total") == 0
    assert moved(after, before, "tactician_decision_confidence_count") == 12
    passes = moved(after, before, "tactician_decision_latency_seconds_count", tier="1")
    assert passes >= 3  # at least one pass per rate-limited start
    assert moved(after, before, "tactician_decision_latency_seconds_sum", tier="1") > 0
    assert moved(after, before, "tactician_decision_latency_seconds_count", tier="2") == 0
    # 12 first attempts and the flaky task's retry; two limited tasks waited 1 s and 2 s.
    assert moved(after, before, "tactician_dispatch_latency_seconds_count") == 13
    quick = moved(after, before, "tactician_dispatch_latency_seconds_bucket", le="0.5")
    assert quick <= 11
    assert moved(after, before, "tactician_dispatch_latency_seconds_sum") >= 2.5
    assert moved(after, before, "tactician_dispatch_latency_seconds_bucket", le="+Inf") == 13
    assert moved(after, before, "tactician_llm_calls_total") == 0


def test_dispatch_latency_counts_from_when_a_task_became_ready(
    db_url: str, fresh_counters: counters.Counters
) -> None:
    """A dependent task is ready when its dependency ends, not when it was submitted."""
    app = make_app(db_url)
    app.task(nap, name="first", pool="p")
    app.task(noop, name="then", pool="p")
    try:
        (upstream,) = app.submit_many([NewTask("first", {"seconds": 1.0})])
        (downstream,) = app.submit_many([NewTask("then", {"n": 1}, depends_on=(upstream,))])
        assert run_until(app, final(app, downstream), timeout=30)
        (waited_for_first,) = app.store.dispatch_delays([(upstream, 1)])
        (waited_for_then,) = app.store.dispatch_delays([(downstream, 1)])
        waited_since_submit = app.get(downstream).finished_at - app.get(upstream).created_at
        assert waited_since_submit >= 1.0
        assert waited_for_then < 0.5
        assert waited_for_first < 0.5
        assert app.store.dispatch_delays([(downstream, 2)]) == []  # not that attempt: unknown
    finally:
        app.close()


# --- tier 2 -----------------------------------------------------------------------------------


class ChatServer:
    """A chat-completions server on loopback: answers 200 with usage, or 500 when told."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.received = 0
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                state.received += 1
                state.gate.wait(10)
                status = state.statuses.pop(0) if state.statuses else 200
                advice = {"action": "run", "score_change": 0.1, "defer_seconds": None}
                advice |= {"confidence": 0.9, "reason": "due soon"}
                body = json.dumps(
                    {
                        "choices": [
                            {"message": {"role": "assistant", "content": json.dumps(advice)}}
                        ],
                        "usage": {"prompt_tokens": 120, "completion_tokens": 30},
                    }
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    server = ChatServer()
    yield server
    server.close()


def tier1(task_id: str) -> Decision:
    return Decision(
        task_id=task_id,
        action=Action.ESCALATE,
        score=0.5,
        confidence=0.2,
        reasons=(Reason("edf", 0.5, "due in 10 min"),),
        tier=Tier.RULES,
        model_version=None,
        policy_version="p1",
        decided_at=0.0,
    )


def request(task_id: str) -> AdviceRequest:
    return AdviceRequest(
        task_id=task_id,
        kind="deliver",
        allowed_actions=frozenset(Action),
        payload={"n": task_id},
        due_at=None,
        weight=1.0,
    )


def test_llm_calls_failures_tokens_and_a_full_queue_are_counted(
    app: Tactician, chat: ChatServer, fresh_counters: counters.Counters
) -> None:
    before = scrape(app)
    config = AdvisorConfig(base_url=chat.url, model="m", timeout_s=5.0, cache_size=0)
    with LLMAdvisor(config, SYSTEM_CLOCK) as advisor:
        chat.statuses = [200, 500, 200]
        for n in range(3):
            advisor.advise(tier1(f"t{n}"), request(f"t{n}"))
        chat.gate.clear()  # the next answer waits: the background queue (1 place) fills up
        background = BackgroundAdvisor(advisor, queue_size=1)
        try:
            assert background.submit(tier1("t3"), request("t3"), lambda d: None)
            deadline = time.monotonic() + 5
            while chat.received < 4:  # taken off the queue and asked
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert background.submit(tier1("t4"), request("t4"), lambda d: None)  # queued
            assert not background.submit(tier1("t5"), request("t5"), lambda d: None)  # refused
            chat.gate.set()
            while chat.received < 5:  # the queued question is asked too
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            chat.gate.set()
            background.close(timeout=5)  # waits for the call under way
    assert counters.flush(app.store)
    after = scrape(app)
    assert moved(after, before, "tactician_llm_calls_total") == 5  # t0-t2, t3, t4
    assert moved(after, before, "tactician_llm_failures_total", reason="http_status") == 1
    assert moved(after, before, "tactician_llm_tokens_total", type="prompt") == 4 * 120
    assert moved(after, before, "tactician_llm_tokens_total", type="completion") == 4 * 30
    assert moved(after, before, "tactician_decision_latency_seconds_count", tier="2") == 5
    assert moved(after, before, "tactician_decision_latency_seconds_sum", tier="2") > 0
    refused = {"source": "llm_advisor", "action": "refused"}
    assert moved(after, before, "tactician_backpressure_total", **refused) == 1


def test_switched_off_nothing_is_counted_and_the_families_still_parse(
    db_url: str, fresh_counters: counters.Counters
) -> None:
    app = Tactician(settings=Settings(db=db_url, poll_interval=0.01, metrics=False))
    app.task(noop, name="job", pool="p")
    try:
        ids = app.submit_many([NewTask("job", {"n": i}) for i in range(3)])
        assert run_until(app, final(app, *ids), timeout=30)
        samples = scrape(app)
    finally:
        app.close()
    assert not fresh_counters.enabled
    assert samples[("tactician_attempts_total", (("kind", "job"), ("outcome", "succeeded")))] == 3
    assert samples[("tactician_decisions_total", ())] == 0
    assert samples[("tactician_dispatch_latency_seconds_count", ())] == 0
    assert samples[("tactician_decision_latency_seconds_count", (("tier", "1"),))] == 0
