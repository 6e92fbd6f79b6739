"""The model registry on a temporary directory: versions, promotion, rollback, corruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tactician.clock import FakeClock
from tactician.decide.predictors import ModelSet
from tactician.errors import Conflict, InvalidInput, NotFound
from tactician.sim.history import fit_recorded, from_workload
from tactician.sim.scenarios import build
from tactician.store.registry import ModelRegistry


@pytest.fixture(scope="module")
def accepted() -> ModelSet:
    """Incidents: the models beat the naive durations, so the set can be promoted."""
    models = fit_recorded(from_workload(build("incidents", tasks=600, seed=1).tasks))
    assert models.manifest()["predictors"]["duration"]
    return models


@pytest.fixture(scope="module")
def other() -> ModelSet:
    models = fit_recorded(from_workload(build("batch", tasks=600, seed=2).tasks))
    assert models.manifest()["predictors"]["duration"]
    return models


@pytest.fixture(scope="module")
def refused() -> ModelSet:
    """Logistics: the route planner's estimate beats the duration model on held-out tasks."""
    models = fit_recorded(from_workload(build("logistics", tasks=600, seed=0).tasks))
    assert not models.manifest()["predictors"]["duration"]
    return models


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def registry(tmp_path: Path, clock: FakeClock) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models", clock)


def test_save_writes_the_bytes_named_by_their_hash_and_indexes_the_manifest(
    registry: ModelRegistry, accepted: ModelSet, clock: FakeClock
) -> None:
    assert registry.list() == [] and registry.active() is None
    version = registry.save(accepted)
    assert version == accepted.version
    assert registry.path(version).read_bytes() == accepted.to_bytes()

    [entry] = registry.list()
    assert (entry.version, entry.created_at, entry.active) == (version, clock.now(), False)
    shown = registry.show(version)
    assert shown["version"] == version and shown["rows"] == 600
    assert shown["features"][:2] == ["estimate", "weight"] and "severity" in shown["features"]
    assert (shown["trained_from"], shown["trained_to"]) == (
        accepted.trained_from,
        accepted.trained_to,
    )
    p50 = next(v for v in shown["validation"] if v["predictor"] == "duration_p50")
    assert p50["metric"] == "mae_s" and p50["model"] < p50["baseline"] and p50["accepted"]
    assert shown["active"] is False and shown["created_at"] == clock.now()

    index = json.loads((registry.directory / "index.json").read_text())
    assert [m["version"] for m in index["models"]] == [version]
    # Saving the same set again changes nothing; no temporary file is left behind.
    clock.advance(60)
    assert registry.save(accepted) == version
    assert [e.created_at for e in registry.list()] == [clock.now() - 60]
    assert sorted(p.name for p in registry.directory.iterdir()) == [
        ".lock",
        f"{version}.json",
        "index.json",
    ]


def test_load_round_trips_exactly_and_takes_an_unambiguous_prefix(
    registry: ModelRegistry, accepted: ModelSet, other: ModelSet
) -> None:
    first, second = registry.save(accepted), registry.save(other)
    loaded = registry.load(first[:6])
    assert loaded.version == first and loaded.to_bytes() == accepted.to_bytes()
    assert registry.load(second.upper()).to_bytes() == other.to_bytes()
    assert [e.version for e in registry.list()] == [first, second]

    with pytest.raises(InvalidInput, match="at least 6 characters"):
        registry.load(first[:5])
    with pytest.raises(NotFound, match="no model set has version 'ffffff0'"):
        registry.load("ffffff0")


def test_an_ambiguous_prefix_names_the_candidates(registry: ModelRegistry) -> None:
    registry.directory.mkdir(parents=True)
    index = {
        "format": 1,
        "models": [
            {"version": f"abcdef{n}0000000000", "created_at": 0.0, "manifest": {}} for n in (1, 2)
        ],
        "stack": [],
        "promotions": [],
    }
    (registry.directory / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidInput, match="ambiguous: abcdef10000000000, abcdef20000000000"):
        registry.resolve("abcdef")
    assert registry.resolve("abcdef2") == "abcdef20000000000"


def test_promote_and_roll_back_through_the_history(
    registry: ModelRegistry, accepted: ModelSet, other: ModelSet, clock: FakeClock
) -> None:
    first, second = registry.save(accepted), registry.save(other)
    with pytest.raises(Conflict, match="none was ever promoted"):
        registry.rollback()

    event = registry.promote(first[:8])
    assert (event.action, event.version, event.previous, event.forced) == (
        "promote",
        first,
        None,
        False,
    )
    active = registry.active()
    assert active is not None and active.to_bytes() == accepted.to_bytes()
    assert [e.active for e in registry.list()] == [True, False]
    with pytest.raises(Conflict, match=f"{first} is the first"):
        registry.rollback()

    clock.advance(10)
    registry.promote(second)
    registry.promote(second)  # already active: no new history entry
    assert registry.active_version() == second and registry.show(second)["active"]

    back = registry.rollback()
    assert (back.action, back.version, back.previous, back.at) == (
        "rollback",
        first,
        second,
        clock.now(),
    )
    assert registry.active_version() == first
    assert [(p.action, p.version) for p in registry.promotions()] == [
        ("promote", first),
        ("promote", second),
        ("rollback", first),
    ]
    # A fresh registry object on the same directory sees the same state.
    assert ModelRegistry(registry.directory).active_version() == first


def test_a_set_whose_duration_model_was_refused_needs_force(
    registry: ModelRegistry, refused: ModelSet
) -> None:
    version = registry.save(refused)  # saved, so it can be inspected
    with pytest.raises(Conflict, match=r"duration predictor was refused \(mae_s .* --force"):
        registry.promote(version)
    assert registry.active_version() is None
    event = registry.promote(version, force=True)
    assert event.forced and registry.active_version() == version


def test_a_corrupted_or_missing_file_is_refused_and_nothing_changes(
    registry: ModelRegistry, accepted: ModelSet, other: ModelSet
) -> None:
    first, second = registry.save(accepted), registry.save(other)
    registry.promote(first)
    path = registry.path(second)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match=f"model set {second}: .* is corrupted"):
        registry.load(second)
    with pytest.raises(InvalidInput, match="corrupted"):
        registry.promote(second)
    assert registry.active_version() == first

    path.write_bytes(b"")
    with pytest.raises(InvalidInput, match="corrupted"):
        registry.load(second)
    path.unlink()
    with pytest.raises(NotFound, match=f"model set {second}: its file .* is missing"):
        registry.load(second)
    assert registry.load(first).version == first


def test_a_corrupted_index_is_one_clear_error(registry: ModelRegistry, accepted: ModelSet) -> None:
    registry.save(accepted)
    index = registry.directory / "index.json"
    for text in ("{not json", '{"format": 1}', "[]", '{"format": 1, "models": [{}]}'):
        index.write_text(text)
        with pytest.raises(InvalidInput, match=r"model registry index .* is corrupted"):
            registry.list()
        with pytest.raises(InvalidInput, match="is corrupted"):
            registry.save(accepted)
    good = {
        "format": 1,
        "models": [{"version": "../../etc", "created_at": 0, "manifest": {}}],
        "stack": [],
        "promotions": [],
    }
    index.write_text(json.dumps(good))
    with pytest.raises(InvalidInput, match="not a model version"):
        registry.list()
