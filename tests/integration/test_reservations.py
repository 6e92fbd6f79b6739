"""EASY reservations in the live planner, on both databases: with the bundle's
`objective.reserve`, the first task of a full pool is reserved the units the running tasks free
by their expected ends (kept with each grant), and a later task starts before it only if it is
expected to end first."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tactician.app import Tactician
from tactician.domain import KindSpec, NewTask
from tactician.govern.roles import Actor, Role
from tactician.observe import traces
from tactician.settings import Settings

ROOT = Actor("root", Role.ADMIN)
POLICY = "name: easy\nobjective: {scorer: edf, reserve: %s}\npools: {p: 4}\n"


@pytest.fixture
def app(db_url: str) -> Iterator[Tactician]:
    app = Tactician(settings=Settings(db=db_url, scorer="edf"))
    app.store.register_kinds([KindSpec("job", pool="p")])
    yield app
    app.close()


def job(name: str, units: int, estimate: float, due_in: float, now: float) -> NewTask:
    return NewTask(
        "job", {"name": name}, due_at=now + due_in, estimate=estimate, resources={"p": units}
    )


def leased(app: Tactician) -> set[str]:
    return {str(t.payload["name"]) for t in app.tasks() if t.state == "leased"}


@pytest.fixture(params=["untraced", "traced"])
def tracing(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each pass as it runs by default, and wrapped in a `plan` span (its ranker timed)."""
    if request.param == "traced":
        traces.enable(SimpleSpanProcessor(InMemorySpanExporter()))
    yield
    traces.disable()


@pytest.mark.parametrize(("reserve", "starts"), [("true", "short"), ("false", "long")])
def test_a_reservation_keeps_a_long_task_from_delaying_the_wide_one(
    app: Tactician, tracing: None, reserve: str, starts: str
) -> None:
    app.gate.deploy(ROOT, POLICY % reserve, "policy.yaml")
    planner = app.planner()
    now = app.store.db_now()
    app.submit_many([job("running", 3, 100.0, 10.0, now)])
    planner.tick()
    assert len(app.store.claim("w", ["job"], 1)) == 1  # runs from now, expected for 100 s
    app.submit_many(
        [
            job("wide", 4, 50.0, 20.0, now),  # first by deadline; 1 unit free, 4 in 100 s
            job("long", 1, 1000.0, 30.0, now),  # would still hold its unit then
            job("short", 1, 10.0, 40.0, now),  # expected to end before the running task
        ]
    )
    planner.tick()
    planner.tick()
    # Greedy: the long task takes the free unit and the wide one waits for it too (1,000 s).
    # Reserved: the long task waits; the short one ends before the wide one could start.
    assert leased(app) == {starts}


def test_without_an_expected_run_the_reservation_cannot_be_placed(app: Tactician) -> None:
    """A task granted while reservations were off carries no expected run: its end is unknown,
    so nothing can be promised to the wide task and later ones fill the free unit."""
    app.gate.deploy(ROOT, POLICY % "false", "greedy.yaml")
    planner = app.planner()
    now = app.store.db_now()
    app.submit_many([job("running", 3, 100.0, 10.0, now)])
    planner.tick()
    assert len(app.store.claim("w", ["job"], 1)) == 1
    app.gate.deploy(ROOT, POLICY % "true", "easy.yaml")
    app.submit_many([job("wide", 4, 50.0, 20.0, now), job("long", 1, 1000.0, 30.0, now)])
    planner.tick()
    assert leased(app) == {"long"}
