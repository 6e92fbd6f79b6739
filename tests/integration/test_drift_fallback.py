"""Drift in the live planner, on real databases with a real worker: a kind's run times double,
the drift watch detects it within 500 of its outcomes, audits it, notifies the bundle's
channel and engages the fallback (heuristic ranking; automated actions wait for a person)
until an operator clears it; both the switch and the clearing are in the audit chain."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tactician.app import Tactician
from tactician.domain import NewTask, Result, TaskState
from tactician.errors import Conflict, Forbidden, InvalidInput
from tactician.govern.policy import BundleError, parse_bundle
from tactician.govern.roles import Actor, Role
from tactician.observe.drift import DRIFT_ACTIONS
from tactician.observe.metrics import metrics_text
from tactician.plan.capacity import plan_starts
from tactician.run.drift import DriftWatch
from tactician.run.gate import Gate
from tactician.run.notify import NOTIFY_KIND
from tactician.run.planner import PlannerService
from tactician.run.ranking import LiveRanker, make_scorer
from tactician.run.refit import Refitter
from tactician.settings import Settings
from tactician.store.base import SqlStore
from tactician.store.protocol import Finish, TaskFilter
from tactician.store.registry import ModelRegistry
from tests.integration.test_refit import record

ROOT = Actor("root", Role.ADMIN)
OPERATOR = Actor("olga", Role.OPERATOR)
VIEWER = Actor("val", Role.VIEWER)

BUNDLE = """
name: watched
objective: {scorer: fifo}
pools: {p: 8}
channels:
  oncall: {type: webhook, url: "http://127.0.0.1:9/drift"}
drift:
  fallback: true
  scorer: edf
  notify: oncall
  confirm:
    name: confirm-remediation
    match: {kinds: [remediate]}
    approvers: {roles: [operator, admin]}
"""
STEADY, SHIFTED = 2000, 600
MS = 40.0  # the steady run time in ms; the estimate every task carries
SPREAD = 0.3  # run times vary log-normally around it


def work(ms: float) -> None:
    raise AssertionError("never run: the test's simulated executor reports the run times")


def remediate(host: str) -> str:
    raise AssertionError("never run: the test's simulated executor reports the run times")


@pytest.fixture
def app(db_url: str) -> Iterator[Tactician]:
    app = Tactician(settings=Settings(db=db_url, lease_seconds=10, poll_interval=0.01))
    app.task(work, pool="p", retries=0)
    app.task(remediate, pool="p", retries=0)
    app.gate.deploy(ROOT, BUNDLE, "watched.yaml")
    yield app
    app.close()


def watch_of(planner: PlannerService) -> DriftWatch:
    (watch,) = [hook for hook in planner.hooks if isinstance(hook, DriftWatch)]
    watch.every_s = 0.0  # read outcomes every pass: the test measures the detector
    return watch


def run(app: Tactician, planner: PlannerService, until: Callable[[], object]) -> bool:
    """Plan, and run what was granted on a simulated executor: each task "took" its payload's
    `ms` times a seeded log-normal factor, reported through the store like a worker's result
    (the run times are the stream's, not this busy machine's)."""
    store = app.store
    kinds = store.kinds()
    rng = random.Random(len(store.outcomes()))
    for _ in range(2_000):
        planner.tick()
        claims = store.claim("sim", ["work", "remediate"], 64)
        now = time.time()
        finishes = []
        for claim in claims:
            took = json.loads(claim.payload).get("ms", 1.0) / 1000 * rng.lognormvariate(0, SPREAD)
            result = Result(claim.task_id, claim.token, True, now - took, took)
            finishes.append(Finish(result, claim.kind, claim.attempt, None))
        if finishes:
            store.finish("sim", finishes, kinds)
        if until():
            return True
    return False


def scraped(app: Tactician) -> tuple[dict[str, float], float]:
    """Detections by signal, and whether the fallback is engaged, as /metrics says."""
    text = metrics_text(app.store).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    detections = {
        s.labels["signal"]: s.value
        for s in families["tactician_drift_detections"].samples
        if s.name.endswith("_total")
    }
    (engaged,) = families["tactician_drift_fallback_engaged"].samples
    return detections, engaged.value


def submit_work(app: Tactician, count: int, ms: float) -> list[str]:
    tasks = [NewTask("work", {"ms": ms}, estimate=MS / 1000.0) for _ in range(count)]
    return app.submit_many(tasks)


def test_doubled_run_times_engage_the_fallback_until_an_operator_clears_it(
    app: Tactician,
) -> None:
    store = app.store
    planner = app.planner()
    watch = watch_of(planner)
    submit_work(app, STEADY, MS)
    assert run(app, planner, lambda: not app.store.waiting(1))
    assert watch.events == [], f"a false alarm on {STEADY} steady outcomes"

    shifted = submit_work(app, SHIFTED, 2 * MS)
    assert run(app, planner, lambda: store.fallback() is not None), "no drift detected"

    # Detected within 500 outcomes of the shifted tasks (counted at the detecting outcome).
    (event,) = watch.events
    assert event.signal == "duration_error:work" and event.detector == "ADWIN"
    finished = [app.get(t) for t in shifted]
    seen = sum(1 for t in finished if t.finished_at is not None and t.finished_at <= event.at)
    print(f"drift detected after {seen} shifted outcomes: {event.text()}")
    assert 0 < seen <= 500
    assert 0.4 < event.after - event.before < 1.0  # log(2) = 0.69

    # Audited (detection, then the switch), and the channel told.
    trail = [r for r in store.audit_records() if r.action.startswith("drift.")]
    assert [r.action for r in trail] == ["drift.detected", "drift.fallback"]
    assert trail[1].details["signal"] == "duration_error:work"
    assert scraped(app) == ({"duration_error:work": 1.0}, 1.0)
    notices = store.list_tasks(TaskFilter(kind=NOTIFY_KIND))
    assert len(notices) == 1 and "drift detected: duration_error:work" in str(notices[0].payload)

    # The fallback ranks with the heuristic, and a remediation waits for a person.
    assert planner.ranker is not None and planner.ranker.scorer.name == "edf"  # type: ignore[attr-defined]
    fix = app.submit("remediate", {"host": "db-1"})
    assert run(app, planner, lambda: app.get(fix).state is TaskState.AWAITING_APPROVAL)
    (approval,) = store.approvals("pending")
    assert approval.task_id == fix and approval.rule.name == "confirm-remediation"
    switched = trail[1].seq

    def granted_since() -> list[Any]:
        return [r for r in store.audit_records(after_seq=switched) if r.action == "task.granted"]

    assert run(app, planner, granted_since)
    assert {r.details["fallback"] for r in granted_since()} == {"duration_error:work"}
    assert {r.details["scorer"] for r in granted_since()} == {"edf"}

    # Clearing: refused to a viewer (audited refusal, nothing changed), done by an operator.
    with pytest.raises(Forbidden, match=r"may not drift\.clear"):
        app.gate.clear_drift(VIEWER, "looks fine")
    assert store.fallback() is not None
    with pytest.raises(InvalidInput, match="needs a reason"):
        app.gate.clear_drift(OPERATOR, "  ")
    cleared = app.gate.clear_drift(OPERATOR, "the new disks are in; durations re-estimated")
    assert cleared.signal == "duration_error:work"
    with pytest.raises(Conflict, match="nothing to clear"):
        app.gate.clear_drift(OPERATOR, "again")
    trail = [r for r in store.audit_records() if r.action.startswith("drift.")]
    assert [r.action for r in trail] == ["drift.detected", "drift.fallback", "drift.cleared"]
    assert trail[-1].actor == "olga"
    assert scraped(app) == ({"duration_error:work": 1.0}, 0.0)
    refused = [r for r in store.audit_records() if r.action == "access.refused"]
    assert [r.details["operation"] for r in refused] == ["drift.clear"]

    # The planner follows the clearing: its own scorer again, remediations run unasked.
    fix2 = app.submit("remediate", {"host": "db-2"})
    assert run(app, planner, lambda: app.get(fix2).state is TaskState.SUCCEEDED)
    assert planner.ranker.fallback is None and planner.ranker.scorer.name == "fifo"  # type: ignore[attr-defined]
    assert app.get(fix).state is TaskState.AWAITING_APPROVAL  # asked before: still a person's call


def test_a_deploy_or_another_process_never_ends_the_fallback_unasked(app: Tactician) -> None:
    planner = app.planner()
    ranker = planner.ranker
    assert isinstance(ranker, LiveRanker)
    app.store.engage_fallback("miss_rate", "miss rate rose", "v1", {})  # by another planner
    planner.tick()
    assert (ranker.fallback, ranker.scorer.name) == ("miss_rate", "edf")
    wspt = BUNDLE.replace("objective: {scorer: fifo}", "objective: {scorer: wspt}")
    app.gate.deploy(ROOT, wspt, "wspt.yaml")
    planner.tick()  # the gate hook follows the deploy; the drift watch engages again at once
    assert (ranker.fallback, ranker.scorer.name) == ("miss_rate", "edf")
    app.gate.clear_drift(OPERATOR, "fixed")
    planner.tick()
    assert (ranker.fallback, ranker.scorer.name) == (None, "wspt")


def test_without_fallback_a_drift_is_only_recorded(app: Tactician) -> None:
    app.gate.deploy(ROOT, BUNDLE.replace("fallback: true", "fallback: false"), "b.yaml")
    planner = app.planner()
    watch = watch_of(planner)
    submit_work(app, 300, MS)
    assert run(app, planner, lambda: not app.store.waiting(1))
    submit_work(app, SHIFTED, 2 * MS)
    assert run(app, planner, lambda: watch.events)
    assert app.store.fallback() is None
    actions = [r.action for r in app.store.audit_records() if r.action.startswith("drift.")]
    assert actions == ["drift.detected"]
    with pytest.raises(Conflict, match="nothing to clear"):
        app.gate.clear_drift(ROOT, "nothing happened")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ("scorer: edf", r"drift.scorer: .*'fifo', 'edf', 'wspt' or 'atc'"),
        ("notify: oncall", r"drift.notify: channel 'pager' is not defined"),
        ("fallback: true", r"drift.fallback: must be true or false"),
    ],
)
def test_a_bad_drift_section_is_refused_with_its_line(change: str, error: str) -> None:
    bad = {
        "scorer: edf": "scorer: learned",
        "notify: oncall": "notify: pager",
        "fallback: true": "fallback: 'yes'",
    }[change]
    with pytest.raises(BundleError, match=r"^w.yaml:\d+: " + error):
        parse_bundle(BUNDLE.replace(change, bad), "w.yaml")


def test_a_shifted_feature_is_caught_by_its_stability_index(
    job_store: SqlStore, tmp_path: Path
) -> None:
    """The active models keep a sample of their training rows; tasks whose `size` comes from
    another range than the trained one raise a PSI event naming that feature, and only it."""
    store = job_store
    store.set_pool("p", None)
    record(store, 400, random.Random(3))  # sizes 1-60, 10 s a unit
    ranker = LiveRanker(make_scorer("learned", None), None, store)
    Refitter(store, ranker, ModelRegistry(tmp_path / "models"), every=300, check_every_s=0.0)(
        time.time()
    )
    assert ranker.models is not None and len(ranker.models.reference) == 400 * 4 // 5
    watch = DriftWatch(Gate(store), ranker, every_s=0.0)
    rng = random.Random(4)

    def rank(low: int, high: int) -> list[str]:
        kinds = store.kinds()
        store.submit([NewTask("job", {"size": rng.randint(low, high)}) for _ in range(300)], kinds)
        store.plan(plan_starts, kinds, ranker)  # the ranker meets them: their rows are added
        watch(time.time())
        return [e.signal for e in watch.events]

    watch(time.time())
    assert rank(1, 60) == []
    assert rank(200, 400) == ["feature:size"]
    (event,) = watch.events
    assert event.detector == "PSI" and event.after > 0.25
    assert [r.action for r in store.audit_records(actions=DRIFT_ACTIONS)] == ["drift.detected"]
