"""Automatic refits in the live planner: after N recorded outcomes the predictors are fitted on
the store's history, saved, promoted when they beat the baseline, and served at once."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tactician.decide.scorers import get_scorer
from tactician.domain import KindSpec, NewTask, Result
from tactician.plan.capacity import plan_starts
from tactician.run.ranking import LiveRanker, make_scorer
from tactician.run.refit import Refitter
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
