"""Drift detection: how soon a doubling of one kind's durations is seen, and how often a
stationary stream raises a false alarm, with `DriftMonitor`'s default settings.

    .venv/bin/python benchmarks/drift.py [--seeds 10] [--stationary 50000]

Two streams of outcomes, each with several kinds mixed and a miss rate of a few per cent:

    synthetic   log-normal run times (log-sd 0.35-0.6 by kind), a feature the predictor reads,
                a predictor with its own log-normal error (sd 0.15), deadlines p50 * exp(z s)
    scenarios   tasks drawn at random from the built-in logistics (outside its storm),
                campaigns and batch scenarios; the predictor is ModelSet's naive baseline (the
                estimate scaled by the kind's median actual / estimate, else the kind's median,
                both from a training prefix): heavy tails, timeouts and crashes included

For each seed: the delay (outcomes of the shifted kind after the shift) until an event names
that kind, and the number of events over a stationary stream. Prints a Markdown table and
writes it to benchmarks/drift.md.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tactician.observe.drift import AdwinOptions, DriftMonitor
from tactician.sim.scenarios import build


@dataclass(frozen=True)
class Outcome:
    kind: str
    predicted: float
    actual: float
    time_left: float

    @property
    def missed(self) -> bool:
        return self.actual > self.time_left


Stream = Callable[[random.Random], Outcome]
"""Draws one stationary outcome."""

# kind: (median seconds, log-sd of the run time, share of the stream)
KINDS = {
    "deliver": (1500.0, 0.45, 0.4),
    "send_email": (1.2, 0.35, 0.3),
    "etl": (1200.0, 0.6, 0.2),
    "remediate": (900.0, 0.55, 0.1),
}
FEATURE_EFFECT = 0.3
"""log(run time) moves this much per unit of the feature the predictor reads."""
PREDICTOR_SD = 0.15
"""The predictor's own error on top of the run time's noise."""


def _deadline(rng: random.Random, predicted: float, spread: float) -> float:
    # z between 1.3 and 2.8 standard deviations of slack: about 3-4% of tasks miss.
    return predicted * math.exp(spread * rng.uniform(1.3, 2.8))


def synthetic(rng: random.Random) -> Outcome:
    kind = rng.choices(list(KINDS), weights=[k[2] for k in KINDS.values()])[0]
    median, sd, _ = KINDS[kind]
    feature = rng.gauss(0.0, 1.0)
    actual = median * math.exp(FEATURE_EFFECT * feature + rng.gauss(0.0, sd))
    predicted = median * math.exp(FEATURE_EFFECT * feature + rng.gauss(0.0, PREDICTOR_SD))
    spread = math.hypot(sd, PREDICTOR_SD)
    return Outcome(kind, predicted, actual, _deadline(rng, predicted, spread))


def scenarios(seed: int, tasks: int = 4000) -> Stream:
    """Outcomes drawn with replacement from three built-in scenarios (so, stationary)."""
    pool = []
    for name in ("logistics", "campaigns", "batch"):
        built = build(name, tasks=tasks, seed=seed)
        storm = next((e for e in built.events if e.get("event") == "storm"), None)
        for task in built.tasks:
            hit = storm is not None and (
                task.features.get("zone") == storm["zone"]
                and storm["start"] <= task.release_at < storm["end"]
            )
            if not hit:
                pool.append(task)
    rng = random.Random(seed)
    train = rng.sample(pool, len(pool) // 4)
    by_kind: dict[str, list[float]] = {}
    ratio: dict[str, list[float]] = {}
    for task in train:
        by_kind.setdefault(task.kind, []).append(task.duration)
        if task.estimate:
            ratio.setdefault(task.kind, []).append(task.duration / task.estimate)
    median = {k: statistics.median(v) for k, v in by_kind.items()}
    scale = {k: statistics.median(v) for k, v in ratio.items()}

    def predict(kind: str, estimate: float | None) -> float:
        return estimate * scale[kind] if estimate and kind in scale else median[kind]

    errors: dict[str, list[float]] = {}
    for task in train:
        errors.setdefault(task.kind, []).append(
            math.log(max(task.duration, 1e-3) / predict(task.kind, task.estimate))
        )
    spread = {k: max(statistics.pstdev(v), 0.05) for k, v in errors.items()}

    def draw(rng: random.Random) -> Outcome:
        task = rng.choice(pool)
        predicted = predict(task.kind, task.estimate)
        return Outcome(
            task.kind,
            predicted,
            task.duration,
            _deadline(rng, predicted, spread[task.kind]),
        )

    return draw


def detection_delay(
    stream: Stream, kind: str, seed: int, *, warm: int = 2000, limit: int = 5000
) -> tuple[int | None, int]:
    """Run times of `kind` doubled once it has had `warm` outcomes: its outcomes from then on
    until an event names it (None: not within `limit`), and the events raised before the shift
    (false alarms)."""
    monitor = DriftMonitor()
    rng = random.Random(seed)
    seen = early = 0
    for n in itertools.count():
        o = stream(rng)
        shifted = seen >= warm and o.kind == kind
        if o.kind == kind:
            seen += 1
        if shifted:
            o = Outcome(o.kind, o.predicted, o.actual * 2.0, o.time_left)
        events = monitor.observe(o.kind, o.predicted, o.actual, o.missed, float(n))
        if seen <= warm:
            early += len(events)
            continue
        if any(e.signal == f"duration_error:{kind}" for e in events):
            return seen - warm, early
        if seen - warm >= limit:
            return None, early
    raise AssertionError("unreachable")


def false_alarms(stream: Stream, seed: int, count: int, options: AdwinOptions | None = None) -> int:
    monitor = DriftMonitor(options)
    rng = random.Random(seed)
    for n in range(count):
        o = stream(rng)
        monitor.observe(o.kind, o.predicted, o.actual, o.missed, float(n))
    return len(monitor.events)


def in_order(seed: int, count: int) -> list[Outcome]:
    """The three scenarios' tasks in the order they arrive (merged by the fraction of their
    trace): no change is made, but errors come in runs (a user's array of jobs, a campaign's
    launch), which is what a live stream looks like and what ADWIN's bound does not assume.
    The predictor is fitted on the first quarter of each scenario, which is left out."""
    per = count * 4 // 9 + 1
    items: list[tuple[float, Outcome]] = []
    rng = random.Random(seed)
    for name in ("logistics", "campaigns", "batch"):
        built = build(name, tasks=per, seed=seed)
        storm = next((e for e in built.events if e.get("event") == "storm"), None)
        span = max(t.release_at for t in built.tasks) or 1.0
        train, rest = built.tasks[: per // 4], built.tasks[per // 4 :]
        by_kind: dict[str, list[float]] = {}
        ratio: dict[str, list[float]] = {}
        for task in train:
            by_kind.setdefault(task.kind, []).append(task.duration)
            if task.estimate:
                ratio.setdefault(task.kind, []).append(task.duration / task.estimate)
        median = {k: statistics.median(v) for k, v in by_kind.items()}
        scale = {k: statistics.median(v) for k, v in ratio.items()}
        for task in rest:
            if storm is not None and (
                task.features.get("zone") == storm["zone"]
                and storm["start"] <= task.release_at < storm["end"]
            ):
                continue
            if task.estimate and task.kind in scale:
                predicted = task.estimate * scale[task.kind]
            else:
                predicted = median.get(task.kind, 60.0)
            time_left = _deadline(rng, predicted, 0.8)
            items.append(
                (task.release_at / span, Outcome(task.kind, predicted, task.duration, time_left))
            )
    items.sort(key=lambda item: item[0])
    return [o for _, o in items[:count]]


def alarms_in_order(seed: int, count: int, options: AdwinOptions | None = None) -> int:
    monitor = DriftMonitor(options)
    for n, o in enumerate(in_order(seed, count)):
        monitor.observe(o.kind, o.predicted, o.actual, o.missed, float(n))
    return len(monitor.events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--stationary", type=int, default=50_000)
    parser.add_argument("--out", default=str(Path(__file__).with_name("drift.md")))
    args = parser.parse_args()
    options = AdwinOptions()
    seeds = range(1, args.seeds + 1)
    began = time.perf_counter()
    made = {seed: scenarios(seed) for seed in seeds}
    streams: dict[str, tuple[Callable[[int], Stream], list[str]]] = {
        "synthetic": (lambda seed: synthetic, ["deliver", "send_email", "etl", "remediate"]),
        "scenarios": (made.__getitem__, ["deliver", "send_email", "etl", "render", "train"]),
    }
    lines = [
        f"Drift detection with the default settings (delta={options.delta}, "
        f"clock={options.clock}, min_samples={options.min_samples}, "
        f"cooldown={options.cooldown}, rises_only={options.rises_only}), {args.seeds} seeds.",
        "",
        "Run time x2 for one kind once it has had 2,000 outcomes; delay = its outcomes after the "
        "shift until an event names it (target: within 500).",
        "",
        "| stream | shifted kind | error sd | detected | delay median | delay max |",
        "|---|---|---|---|---|---|",
    ]
    for name, (make, kinds) in streams.items():
        for kind in kinds:
            rng = random.Random(0)
            sample = [o for o in (make(1)(rng) for _ in range(20_000)) if o.kind == kind]
            errors = [max(-3.0, min(3.0, math.log(o.actual / o.predicted))) for o in sample]
            delays = [detection_delay(make(seed), kind, seed)[0] for seed in seeds]
            found = [d for d in delays if d is not None]
            median = f"{statistics.median(found):.0f}" if found else "-"
            worst = f"{max(found)}" if found else "-"
            lines.append(
                f"| {name} | {kind} | {statistics.pstdev(errors):.2f} "
                f"| {len(found)}/{len(delays)} | {median} | {worst} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        f"False alarms on {args.stationary:,} stationary outcomes per seed (events of any "
        "signal; target 0):",
        "",
        "| stream | miss rate | false alarms per seed | total |",
        "|---|---|---|---|",
    ]
    for name, (make, _) in streams.items():
        rng = random.Random(0)
        miss = statistics.mean(make(1)(rng).missed for _ in range(20_000))
        alarms = [false_alarms(make(seed), 1000 + seed, args.stationary) for seed in seeds]
        lines.append(f"| {name} | {miss:.1%} | {' '.join(map(str, alarms))} | {sum(alarms)} |")
        print(lines[-1], flush=True)
    ordered = [alarms_in_order(seed, args.stationary) for seed in seeds]
    river_default = [
        alarms_in_order(seed, args.stationary, AdwinOptions(delta=0.002)) for seed in seeds
    ]
    lines += [
        f"| scenarios in arrival order | - | {' '.join(map(str, ordered))} | {sum(ordered)} |",
        f"| same, with river's default delta 0.002 | - | {' '.join(map(str, river_default))} "
        f"| {sum(river_default)} |",
        "",
        f"Took {time.perf_counter() - began:.0f} s.",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
