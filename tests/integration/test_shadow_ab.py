"""Shadow and A/B on real databases and a real worker: an experiment bundle orders its share
of the tasks (split by a hash, recorded with every grant) and `policy compare` reports both arms'
KPIs with intervals; a shadow bundle's decisions are stored beside the live ones and never
acted on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tactician.app import Tactician
from tactician.domain import NewTask
from tactician.govern.compare import in_experiment
from tactician.govern.policy import bundle_version
from tactician.govern.roles import Actor, Role
from tactician.run.gate import GateHook
from tests.integration.driving import final, make_app, run_until

pytestmark = pytest.mark.timeout(120)
ROOT = Actor("root", Role.ADMIN)
LIVE = "name: live\nobjective: {scorer: edf}\npools: {p: 2}\n"
TRIAL = "name: trial\nobjective: {scorer: wspt}\n"
SHADOW = "name: shade\nobjective: {scorer: fifo}\n"


def noop(n: int) -> None:
    """A task that does nothing (module level: it runs in a forked runner)."""


@pytest.fixture
def app(db_url: str) -> Iterator[Tactician]:
    app = make_app(db_url)
    app.task(noop, name="job", pool="p")
    app.gate.deploy(ROOT, LIVE, "live.yaml")
    yield app
    app.close()


def submit(app: Tactician, count: int) -> list[str]:
    now = app.store.db_now()
    return app.submit_many(
        [
            NewTask("job", {"n": i}, due_at=now + 8 - 0.05 * i, weight=1 + i % 4, estimate=1 + i)
            for i in range(count)
        ]
    )


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    tactician = str(Path(sys.executable).parent / "tactician")
    return subprocess.run(
        [tactician, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_an_experiment_decides_its_share_and_compare_reports_both_arms(
    app: Tactician, db_url: str
) -> None:
    app.gate.deploy(ROOT, TRIAL, "trial.yaml", slot="experiment", share=0.5, split_by="task")
    trial = bundle_version(TRIAL)
    ids = submit(app, 40)
    assert run_until(app, final(app, *ids), timeout=60)
    grants = [r for r in app.store.audit_records() if r.action == "task.granted"]
    in_b = {t for r in grants for t in r.details["experiment_tasks"]}
    assert all(r.details["experiment"] == trial for r in grants)
    expected = {t for t in ids if in_experiment(t, "default", 0.5, "task", trial)}
    assert in_b == expected and 0 < len(expected) < len(ids)
    result = cli("policy", "compare", "--db", db_url, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    arms = report["experiment"]["arms"]
    assert [a["version"] for a in arms] == [bundle_version(LIVE), trial]
    assert [a["tasks"] for a in arms] == [len(ids) - len(expected), len(expected)]
    for arm in arms:
        for kpi in ("missed_rate", "weighted_tardiness", "escalation_rate"):
            interval = arm[kpi]
            assert interval["low"] <= interval["value"] <= interval["high"]
    assert cli("policy", "compare", "--db", db_url).returncode == 0


def test_a_shadow_decides_beside_live_and_never_acts(app: Tactician, db_url: str) -> None:
    app.gate.deploy(ROOT, SHADOW, "shade.yaml", slot="shadow")
    ids = submit(app, 12)
    hook = GateHook(app.gate, app.ranker(), shadow_every_s=0.0)
    hook(app.store.db_now())
    live = app.store.recorded_decisions(bundle_version(LIVE))
    shade = app.store.recorded_decisions(bundle_version(SHADOW))
    assert {r.task_id for r in live} == {r.task_id for r in shade} == set(ids)
    assert {r.slot for r in shade} == {"shadow"} and {r.slot for r in live} == {"live"}
    report = json.loads(cli("policy", "compare", "--db", db_url, "--json").stdout)["shadow"]
    assert report["tasks"] == 12 and report["same_action"] == 1.0
    # Deadlines fall with submission order: earliest deadline first is fifo backwards.
    assert report["rank_correlation"] == pytest.approx(-1.0)
    assert run_until(app, final(app, *ids), timeout=60)
    grants = [r for r in app.store.audit_records() if r.action == "task.granted"]
    assert {r.details["policy"] for r in grants} == {bundle_version(LIVE)}  # never the shadow
