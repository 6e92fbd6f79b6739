"""Drift detectors: PSI of features against training, ADWIN on outcomes."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from tactician.decide.features import BASE_FEATURES, FeatureSpec
from tactician.errors import InvalidInput
from tactician.observe.drift import (
    PSI_THRESHOLD,
    AdwinOptions,
    DriftEvent,
    DriftMonitor,
    FeatureDrift,
    Reference,
    psi,
)
from tactician.store.protocol import OutcomeRow

# --- PSI -------------------------------------------------------------------------------------


def test_psi_of_the_same_distribution_is_near_zero() -> None:
    rng = np.random.default_rng(1)
    reference = Reference.numeric("distance_km", rng.lognormal(2.0, 0.6, 20_000))
    assert len(reference.expected) == 10
    assert psi(reference, rng.lognormal(2.0, 0.6, 2_000)) < 0.02


def test_psi_of_a_shifted_distribution_exceeds_the_threshold() -> None:
    rng = np.random.default_rng(2)
    reference = Reference.numeric("distance_km", rng.lognormal(2.0, 0.6, 20_000))
    assert psi(reference, rng.lognormal(2.0 + math.log(2.0), 0.6, 2_000)) > PSI_THRESHOLD
    assert 0.02 < psi(reference, rng.lognormal(2.1, 0.6, 2_000)) < PSI_THRESHOLD


def test_psi_of_a_categorical_shift() -> None:
    rng = random.Random(3)
    zones = ["north", "south", "east", "west", "centre"]
    reference = Reference.categorical_of("zone", rng.choices(zones, k=10_000))
    assert psi(reference, rng.choices(zones, k=2_000)) < 0.02
    skewed = rng.choices(zones, weights=[6, 1, 1, 1, 1], k=2_000)
    assert psi(reference, skewed) > PSI_THRESHOLD
    # A category never seen in training lands in its own bin, and counts as a shift.
    assert psi(reference, ["harbour"] * 500 + rng.choices(zones, k=1_500)) > PSI_THRESHOLD


def test_empty_bins_give_a_finite_psi() -> None:
    reference = Reference.numeric("stops", [1, 1, 2, 2, 3, 3, 4, 5])
    beyond = psi(reference, [50.0] * 100)  # all in a bin that training left empty
    assert math.isfinite(beyond) and beyond > PSI_THRESHOLD
    only_one = psi(reference, [1.0] * 100)  # every other bin empty on the live side
    assert math.isfinite(only_one) and only_one > PSI_THRESHOLD


def test_missing_values_have_their_own_bin_when_allowed() -> None:
    values = [float(v) for v in range(100)] + [math.nan] * 10
    reference = Reference.numeric("estimate", values, allow_missing=True)
    assert reference.expected[-1] == pytest.approx(10 / 110)
    assert psi(reference, values) == pytest.approx(0.0)
    assert psi(reference, [math.nan] * 60 + list(range(40))) > PSI_THRESHOLD


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: Reference.numeric("x", []), "empty"),
        (lambda: Reference.categorical_of("x", []), "empty"),
        (lambda: Reference.numeric("x", [1.0, math.nan, 2.0]), "NaN"),
        (lambda: Reference.categorical_of("x", ["a", None]), "NaN"),
        (lambda: Reference.numeric("x", ["a", "b"]), "not all numbers"),
        (lambda: Reference.numeric("x", [1.0, 2.0], bins=1), "bins"),
        (lambda: psi(Reference.numeric("x", [1.0, 2.0, 3.0]), [1.0, math.nan]), "NaN"),
        (lambda: psi(Reference.numeric("x", [1.0, 2.0, 3.0]), []), "no live values"),
        (lambda: psi(Reference.categorical_of("x", ["a"]), [float("nan")]), "NaN"),
        (lambda: FeatureDrift([]), "no features"),
        (lambda: FeatureDrift([Reference.numeric("x", [1.0])], window=10, min_live=20), "min_live"),
    ],
)
def test_bad_input_is_invalid_with_one_line(make: object, needle: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        make()  # type: ignore[operator]
    assert needle in str(caught.value)
    assert "\n" not in str(caught.value)


def _training(rng: np.random.Generator, rows: int, distance: float) -> np.ndarray:
    spec = FeatureSpec(numeric=("distance_km",), categorical=("zone",))
    static = np.full((rows, len(spec.names)), math.nan)
    static[:, spec.names.index("weight")] = rng.uniform(1.0, 3.0, rows)
    static[:, spec.names.index("kind")] = 0.0
    static[:, spec.names.index("distance_km")] = rng.lognormal(distance, 0.6, rows)
    static[:, spec.names.index("zone")] = rng.integers(0, 5, rows)
    return static


def test_feature_drift_names_the_shifted_feature_once_per_crossing() -> None:
    rng = np.random.default_rng(4)
    spec = FeatureSpec(numeric=("distance_km",), categorical=("zone",))
    monitor = FeatureDrift.from_training(spec, _training(rng, 5_000, 2.0), window=1_000)
    assert set(monitor.references) == set(BASE_FEATURES) | {"distance_km", "zone"}
    assert monitor.references["zone"].categorical
    assert monitor.check(now=0.0) == []  # nothing live yet

    monitor.observe_rows(_training(rng, 1_000, 2.0), spec.names)
    assert monitor.drifted() == []
    assert max(monitor.scores().values()) < 0.05

    monitor.observe_rows(_training(rng, 1_000, 2.0 + math.log(2.0)), spec.names)
    shifted = monitor.drifted()
    assert [s.feature for s in shifted] == ["distance_km"]
    assert shifted[0].psi > PSI_THRESHOLD and shifted[0].window == 1_000
    events = monitor.check(now=100.0)
    assert [e.signal for e in events] == ["feature:distance_km"]
    assert events[0].detector == "PSI" and events[0].at == 100.0
    assert events[0].text().startswith("feature distance_km shifted from training: PSI ")
    assert monitor.check(now=101.0) == []  # still above: no second event

    monitor.observe_rows(_training(rng, 1_000, 2.0), spec.names)
    assert monitor.check(now=102.0) == [] and monitor.drifted() == []


def test_feature_drift_takes_one_task_at_a_time() -> None:
    rng = random.Random(5)
    monitor = FeatureDrift(
        [Reference.categorical_of("tier", rng.choices(["standard", "premium"], k=1_000))],
        window=300,
        min_live=100,
    )
    for _ in range(99):
        monitor.observe({"tier": "premium"})
    assert monitor.scores() == {}  # fewer than min_live
    monitor.observe({"tier": "premium"})
    assert [s.feature for s in monitor.drifted()] == ["tier"]


# --- ADWIN on outcomes -----------------------------------------------------------------------

# kind: (median seconds, log-sd of the run time, share of the stream)
KINDS = {
    "deliver": (1500.0, 0.45, 0.4),
    "send_email": (1.2, 0.35, 0.3),
    "etl": (1200.0, 0.6, 0.2),
    "remediate": (900.0, 0.55, 0.1),
}


def _outcome(
    rng: random.Random, *, factor: dict[str, float] | None = None, slack: tuple[float, float]
) -> tuple[str, float, float, bool]:
    """One outcome: a feature the predictor reads, its own error, a deadline p50 * exp(z s)
    with z drawn from `slack` ((1.3, 2.8) gives a miss rate of 3-4%)."""
    kind = rng.choices(list(KINDS), weights=[k[2] for k in KINDS.values()])[0]
    median, sd, _ = KINDS[kind]
    feature = rng.gauss(0.0, 1.0)
    actual = median * math.exp(0.3 * feature + rng.gauss(0.0, sd))
    actual *= (factor or {}).get(kind, 1.0)
    predicted = median * math.exp(0.3 * feature + rng.gauss(0.0, 0.15))
    time_left = predicted * math.exp(math.hypot(sd, 0.15) * rng.uniform(*slack))
    return kind, predicted, actual, actual > time_left


NORMAL = (1.3, 2.8)


def _run(
    monitor: DriftMonitor,
    rng: random.Random,
    count: int,
    start: int = 0,
    factor: dict[str, float] | None = None,
    slack: tuple[float, float] = NORMAL,
) -> list[tuple[int, dict[str, int], DriftEvent]]:
    """Feed `count` outcomes; each event with its index and the outcomes seen per kind."""
    seen: dict[str, int] = {}
    found = []
    for n in range(start, start + count):
        kind, predicted, actual, missed = _outcome(rng, factor=factor, slack=slack)
        seen[kind] = seen.get(kind, 0) + 1
        for event in monitor.observe(kind, predicted, actual, missed, float(n)):
            found.append((n, dict(seen), event))
    return found


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["deliver", "etl"])
def test_doubling_one_kinds_durations_is_detected_within_500_of_its_outcomes(
    seed: int, kind: str
) -> None:
    rng = random.Random(seed)
    monitor = DriftMonitor()
    assert _run(monitor, rng, 5_000) == []
    after = _run(monitor, rng, 3_000, start=5_000, factor={kind: 2.0})
    errors = [(seen, e) for _, seen, e in after if e.signal.startswith("duration_error:")]
    assert errors, "the shift was not detected"
    seen, event = errors[0]
    assert event.signal == f"duration_error:{kind}"
    assert seen[kind] <= 500
    # The other kinds did not change and raise nothing; one drift gives one event.
    assert [e.signal for _, e in errors] == [f"duration_error:{kind}"]
    assert event.before == pytest.approx(0.0, abs=0.15)
    assert event.after == pytest.approx(math.log(2.0), abs=0.3)
    assert event.rose and event.detector == "ADWIN"
    assert event.text().startswith(f"duration error of kind {kind} rose: mean log-ratio ")


def test_a_jump_in_the_miss_rate_is_detected() -> None:
    rng = random.Random(6)
    monitor = DriftMonitor()
    assert _run(monitor, rng, 5_000) == []
    # Deadlines get tighter: about one task in six misses, run times unchanged.
    after = _run(monitor, rng, 2_000, start=5_000, slack=(0.5, 1.5))
    assert [e.signal for _, _, e in after] == ["miss_rate"]
    n, _, event = after[0]
    assert n - 5_000 <= 500
    assert event.before < 0.06 and event.after > 0.1
    assert event.text().startswith("miss rate rose: ")
    assert "%" in event.text()


def test_a_drop_in_error_or_misses_raises_nothing() -> None:
    rng = random.Random(7)
    monitor = DriftMonitor()
    _run(monitor, rng, 5_000)
    # Everything runs twice as fast: the error and the miss rate fall.
    faster = dict.fromkeys(KINDS, 0.5)
    assert _run(monitor, rng, 3_000, start=5_000, factor=faster) == []
    both = DriftMonitor(AdwinOptions(rises_only=False))
    rng = random.Random(7)
    _run(both, rng, 5_000)
    found = _run(both, rng, 3_000, start=5_000, factor=faster)
    assert found and not found[0][2].rose
    assert " fell: " in found[0][2].text()


@pytest.mark.parametrize("seed", [11, 12])
def test_a_stationary_stream_of_50000_raises_no_alarm(seed: int) -> None:
    monitor = DriftMonitor()
    assert _run(monitor, random.Random(seed), 50_000) == []
    assert monitor.events == []


def test_no_event_before_min_samples_and_during_the_cooldown() -> None:
    options = AdwinOptions(min_samples=400, cooldown=10_000)
    monitor = DriftMonitor(options)
    rng = random.Random(8)
    # Doubled from the start for 200, then back: no alarm yet (fewer than 400 seen)...
    for n in range(200):
        monitor.observe("deliver", 100.0, 100.0 * math.exp(rng.gauss(0.0, 0.4)), None, n)
    for n in range(200, 300):
        events = monitor.observe("deliver", 100.0, 200.0 * math.exp(rng.gauss(0, 0.4)), None, n)
        assert events == []
    # ... a real shift later is caught, and a second within the cool-down is not reported.
    found = []
    for n in range(300, 4_000):
        level = 100.0 if n < 1_500 else 200.0 if n < 2_500 else 400.0
        found += monitor.observe("deliver", 100.0, level * math.exp(rng.gauss(0, 0.4)), None, n)
    assert [e.at >= 1_500 for e in found] == [True]


def test_observe_row_reads_the_run_time_and_the_deadline() -> None:
    monitor = DriftMonitor()

    def row(outcome: str, due: float | None) -> OutcomeRow:
        return OutcomeRow(
            task_id="t1",
            kind="deliver",
            payload={},
            created_at=0.0,
            release_at=0.0,
            due_at=due,
            weight=1.0,
            estimate=None,
            pool="drivers",
            units=1,
            tenant="default",
            attempt=1,
            started_at=10.0,
            finished_at=130.0,
            outcome=outcome,
        )

    assert monitor.observe_row(row("failed", 100.0), 100.0, now=130.0) == []
    assert "deliver" not in monitor._errors  # a crash is not a duration
    monitor.observe_row(row("succeeded", 100.0), 100.0, now=130.0)
    monitor.observe_row(row("succeeded", None), 100.0, now=130.0)
    assert monitor._errors["deliver"].recent[-1] == pytest.approx(math.log(120.0 / 100.0))
    assert monitor._misses is not None and list(monitor._misses.recent) == [1.0]


@pytest.mark.parametrize(
    ("predicted", "actual"), [(math.nan, 1.0), (0.0, 1.0), (1.0, math.inf), (1.0, -1.0)]
)
def test_an_impossible_outcome_is_invalid(predicted: float, actual: float) -> None:
    with pytest.raises(InvalidInput):
        DriftMonitor().observe("deliver", predicted, actual, False, 0.0)


def test_event_text_and_json_are_one_line() -> None:
    event = DriftEvent("duration_error:deliver", "ADWIN", 0.02, 0.69, 5.0, 137)
    assert event.text() == (
        "duration error of kind deliver rose: mean log-ratio 0.02 → 0.69 "
        "(ADWIN, after 137 outcomes)"
    )
    assert event.to_json()["text"] == event.text()
    miss = DriftEvent("miss_rate", "ADWIN", 0.031, 0.148, 5.0, 212)
    assert miss.text() == "miss rate rose: 3.1% → 14.8% (ADWIN, after 212 outcomes)"
    with pytest.raises(InvalidInput):
        AdwinOptions(delta=0.0)
