"""Prometheus metrics on real databases: the exposition parses with prometheus-client's own
parser, and the counters move as a real worker runs tasks, an operator intervenes, a rule
holds a task for approval and an event is dead-lettered."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tactician.app import Tactician
from tactician.domain import NewTask
from tactician.govern.approvals import Match, RuleSpec
from tactician.govern.records import NewApproval
from tactician.govern.roles import Actor, Role
from tactician.observe.metrics import metrics_text
from tests.integration.driving import final, make_app, run_until

pytestmark = pytest.mark.timeout(60)
OPS = Actor("ops", Role.OPERATOR)


def noop(n: int) -> None:
    """Does nothing (module level: runs in a forked runner)."""


def scrape(app: Tactician) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(metrics_text(app.store).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


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
