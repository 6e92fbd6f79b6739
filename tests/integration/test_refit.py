"""Automatic refits in the live planner: after N recorded outcomes the predictors are fitted on
the store's history, saved, promoted when they beat the baseline, and served at once."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tactician.app import Tactician
from tactician.decide.scorers import get_scorer
from tactician.decide.training import fit_recorded
from tactician.domain import KindSpec, NewTask, Result
from tactician.govern.roles import Actor, Role
from tactician.plan.capacity import plan_starts
from tactician.run.planner import PlannerService
from tactician.run.ranking import LiveRanker, make_scorer
from tactician.run.refit import ModelWatch, Refitter
from tactician.run.training import from_store
from tactician.settings import Settings
from tactician.store.base import SqlStore
from tactician.store.protocol import Finish
from tactician.store.registry import ModelRegistry

KIND = KindSpec("job", pool="p")


@pytest.fixture
def store(job_store: SqlStore) -> SqlStore:
    job_store.set_pool("p", None)  # every recorded task runs at once
    return job_store


def record(store: SqlStore, count: int, rng: random.Random) -> None:
    """`count` tasks that ran for 10 s per unit of their payload's `size`."""
    kinds = store.kinds()
    sizes = [rng.randint(1, 60) for _ in range(count)]
    ids = store.submit([NewTask("job", {"size": s}) for s in sizes], kinds)
    size_of = dict(zip(ids, sizes, strict=True))
    store.plan(plan_starts, kinds)
    claims = store.claim("w", ["job"], count)
    assert len(claims) == count
    now = time.time()
    finishes = []
    for claim in claims:
        took = 10.0 * size_of[claim.task_id] * rng.uniform(0.9, 1.1)
        result = Result(claim.task_id, claim.token, True, now - took, took)
        finishes.append(Finish(result, claim.kind, claim.attempt, None))
    assert all(store.finish("w", finishes, kinds))


def test_a_refit_after_n_outcomes_is_promoted_and_served(store: SqlStore, tmp_path: Path) -> None:
    rng = random.Random(5)
    registry = ModelRegistry(tmp_path / "models")
    ranker = LiveRanker(make_scorer("learned", None), None, store)
    refit = Refitter(store, ranker, registry, every=300, check_every_s=0.0)

    record(store, 200, rng)
    refit(time.time())
    assert refit.fits == []  # fewer than 300 outcomes: nothing to do
    record(store, 200, rng)
    refit(time.time())
    assert len(refit.fits) == 1
    version = refit.fits[0]
    assert registry.active_version() == version
    assert ranker.models is not None and ranker.models.version == version
    shown = registry.show(version)
    duration = next(v for v in shown["validation"] if v["predictor"] == "duration_p50")
    assert duration["accepted"] and duration["model"] < duration["baseline"]
    assert "size" in shown["features"]

    refit(time.time())
    assert len(refit.fits) == 1  # no new outcomes since: no refit


def test_a_refused_refit_is_saved_but_not_served(store: SqlStore, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    ranker = LiveRanker(get_scorer("edf"), None, store)
    refit = Refitter(store, ranker, registry, every=100, check_every_s=0.0)
    kinds = store.kinds()
    ids = store.submit([NewTask("job", {"size": 1}) for _ in range(150)], kinds)
    store.plan(plan_starts, kinds)
    claims = store.claim("w", ["job"], 150)
    now = time.time()
    # Run times that nothing known at submission explains: no model can beat the median.
    rng = random.Random(1)
    store.finish(
        "w",
        [
            Finish(
                Result(c.task_id, c.token, True, now - (t := rng.expovariate(0.1)), t),
                c.kind,
                c.attempt,
                None,
            )
            for c in claims
        ],
        kinds,
    )
    assert len(ids) == 150
    refit(time.time())
    assert len(refit.fits) == 1
    assert registry.active_version() is None
    assert ranker.models is None


ROOT = Actor("root", Role.ADMIN)


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[Tactician]:
    app = Tactician(settings=Settings(db=db_url, scorer="learned", models_dir=str(tmp_path)))
    app.store.register_kinds([KIND])
    app.store.set_pool("p", None)
    yield app
    app.close()


def two_fits(store: SqlStore, registry: ModelRegistry) -> tuple[str, str]:
    """Two model sets fitted on different outcomes, saved (neither promoted)."""
    record(store, 300, random.Random(1))
    first = registry.save(fit_recorded(from_store(store.outcomes(limit=300))))
    record(store, 300, random.Random(2))
    second = registry.save(fit_recorded(from_store(store.outcomes(limit=600))))
    assert first != second
    return first, second


def serving(app: Tactician, planner: PlannerService) -> str | None:
    """Run one planner pass and say which models the ranker serves."""
    watch = next(h for h in planner.hooks if isinstance(h, ModelWatch))
    watch.every_s = 0.0  # look every pass, not every 2 s
    planner.tick()
    assert isinstance(planner.ranker, LiveRanker)
    return planner.ranker.model_version


def test_the_planner_serves_the_pinned_models_and_follows_promotions(
    app: Tactician, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = ModelRegistry(tmp_path)
    first, second = two_fits(app.store, registry)
    planner = app.planner()
    assert serving(app, planner) is None  # nothing promoted, nothing pinned
    registry.promote(first)
    assert serving(app, planner) == first  # `models promote`, seen without a restart
    pinned = f"name: pinned\nmodels: {{default: {second[:12]}}}\n"
    app.gate.deploy(ROOT, pinned, "pinned.yaml")
    assert serving(app, planner) == second
    assert app.ranker().model_version == second  # `tasks why` explains with the pinned set
    registry.promote(first)
    assert serving(app, planner) == second  # a pin outlasts promotions
    app.gate.deploy(ROOT, "name: unpinned\n", "unpinned.yaml")
    assert serving(app, planner) == first
    app.gate.rollback(ROOT, "back to the pinned set")
    assert serving(app, planner) == second
    caplog.set_level(logging.ERROR, "tactician.decide")
    app.gate.deploy(ROOT, "name: unknown\nmodels: {default: abcdef012345}\n", "unknown.yaml")
    assert serving(app, planner) == second  # cannot be found: the models in service stay
    assert serving(app, planner) == second
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # said once, not every pass
    assert "no model set has version 'abcdef012345'" in errors[0]


def test_a_refit_under_a_pin_is_saved_but_not_promoted(db_url: str, tmp_path: Path) -> None:
    settings = Settings(db=db_url, scorer="learned", models_dir=str(tmp_path), refit_every=100)
    app = Tactician(settings=settings)
    try:
        app.store.register_kinds([KIND])
        app.store.set_pool("p", None)
        registry = ModelRegistry(tmp_path)
        first, _ = two_fits(app.store, registry)
        app.gate.deploy(ROOT, f"name: pinned\nmodels: {{default: {first[:12]}}}\n", "p.yaml")
        planner = app.planner()
        (refit,) = [h for h in planner.hooks if isinstance(h, Refitter)]
        refit.check_every_s = 0.0
        record(app.store, 150, random.Random(3))
        assert serving(app, planner) == first  # the tick ran the refit too
        assert len(refit.fits) == 1 and registry.promotions() == []  # saved, not promoted
        assert registry.active_version() is None
        app.gate.deploy(ROOT, "name: unpinned\n", "u.yaml")
        record(app.store, 150, random.Random(4))
        assert serving(app, planner) == refit.fits[1] == registry.active_version()
    finally:
        app.close()


def test_the_policys_ood_limit_replaces_the_trained_one_until_it_is_lifted(
    app: Tactician, tmp_path: Path
) -> None:
    registry = ModelRegistry(tmp_path)
    first, _ = two_fits(app.store, registry)
    registry.promote(first)
    trained = registry.load(first).limit
    planner = app.planner()
    ranker = planner.ranker
    assert isinstance(ranker, LiveRanker)

    def served(text: str) -> float:
        app.gate.deploy(ROOT, text, "policy.yaml")
        planner.tick()
        assert ranker.models is not None and ranker.model_version == first
        return ranker.models.limit

    assert served("name: own\n") == trained
    assert served("name: strict\nthresholds: {ood: 2.5}\n") == 2.5
    assert served("name: lifted\n") == trained
