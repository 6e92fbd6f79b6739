"""`tactician bench decide`: what deciding costs with a large backlog, learned against classic.

Setup (not timed): a history of finished tasks teaches a learned scorer as recorded outcomes
(`sim.history`), so that real LightGBM models are fitted and validated; a separate backlog of
waiting tasks from the same scenario is encoded into a `Backlog`, and a random sample of further
tasks is held back to arrive one at a time. Every pool is full and busy for about half a typical
task, and `now` is the earliest release in the backlog: the whole backlog competes for capacity.

Then, per run (each run encodes its backlog afresh) and per scorer (learned, atc, edf):

    rank       rank the whole backlog, every pool, from nothing: for `learned`, predictions are
               forgotten first and the triage starts afresh, so each repetition pays features,
               LightGBM predictions and scores (what a refit or a restart costs)
    rank_warm  rank it again with predictions kept (what each planning instant costs)
    event      one new task: add its row (encode), predict it, rank it against its pool, and
               find its position among the waiting tasks (what deciding on an arrival costs)

A scorer whose ranks do not move with time (edf) decides an arrival by ranking its row alone
and a binary search among the ranked backlog; `learned` ranks the arrival against its pool's
last full ranking (`Learned.rank_arrival`: predict the row, read its projected start from the
deadline order, binary search); `atc` has no incremental path, so its pool is ranked again.
The figures are medians over the runs of each run's percentiles; nothing here asserts a
timing.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tactician.decide.features import Backlog, KindHistory
from tactician.decide.learned import Learned
from tactician.decide.predictors import ModelSet
from tactician.decide.scorers import (
    DEFAULT_ESTIMATE,
    Atc,
    Edf,
    Incremental,
    PoolView,
    RankRequest,
    Scorer,
)
from tactician.errors import InvalidInput
from tactician.sim.policies import pretrain
from tactician.sim.scenarios import SCENARIOS, build
from tactician.sim.simulator import scored
from tactician.sim.workload import WorkloadTask

Rows = npt.NDArray[np.int64]
MIX = "mix"
SCORER_NAMES = ("learned", "atc", "edf")


@dataclass(frozen=True)
class Setup:
    """What every run shares: the fitted models and the tasks (the backlog, the arrivals)."""

    models: ModelSet | None
    fitted: ModelSet | None
    """The last fit, accepted or not (for the report)."""
    history: KindHistory
    base: Backlog
    waiting: list[WorkloadTask]
    arrivals: list[WorkloadTask]
    capacity: dict[str, int]
    fit_s: float


def _scenario_tasks(
    scenario: str, count: int, seed: int
) -> tuple[list[WorkloadTask], dict[str, int]]:
    """A scenario's tasks, or an equal mix of all four (one pool each)."""
    if scenario != MIX:
        built = build(scenario, tasks=count, seed=seed)
        return built.tasks, dict(built.capacity)
    tasks: list[WorkloadTask] = []
    capacity: dict[str, int] = {}
    names = sorted(SCENARIOS)
    for i, name in enumerate(names):
        share = count // len(names) + (1 if i < count % len(names) else 0)
        if share:
            built = build(name, tasks=share, seed=seed)
            tasks += built.tasks
            capacity |= built.capacity
    return sorted(tasks, key=lambda t: (t.submit_at, t.id)), capacity


def prepare(scenario: str, backlog: int, history: int, events: int, seed: int) -> Setup:
    past, _ = _scenario_tasks(scenario, history, seed)
    present, capacity = _scenario_tasks(scenario, backlog + events, seed + 1)
    picked = set(random.Random(seed).sample(range(len(present)), events))
    waiting = [t for i, t in enumerate(present) if i not in picked]
    arrivals = [t for i, t in enumerate(present) if i in picked]
    random.Random(seed + 1).shuffle(arrivals)

    learner = Learned()
    began = time.perf_counter()
    base = pretrain(learner, past)
    fit_s = time.perf_counter() - began
    return Setup(
        models=learner.models,
        fitted=learner.fits[-1] if learner.fits else None,
        history=learner.history,
        base=base,
        waiting=waiting,
        arrivals=arrivals,
        capacity=capacity,
        fit_s=fit_s,
    )


@dataclass
class Run:
    backlog: Backlog
    rows: Rows
    pool_rows: dict[int, Rows]
    """Per pool code: the backlog's rows, with room after them for the arrivals."""
    pool_size: dict[int, int]
    now: float
    pools: dict[int, PoolView]
    encode_s: float


def _encode(setup: Setup, events: int) -> Run:
    backlog = Backlog(setup.base.spec, setup.base.vocabulary)
    began = time.perf_counter()
    for seq, task in enumerate(setup.waiting):
        backlog.add(scored(task, seq), setup.history)
    encode_s = time.perf_counter() - began
    rows = np.arange(len(backlog), dtype=np.int64)
    pool_rows: dict[int, Rows] = {}
    pool_size: dict[int, int] = {}
    for code in np.unique(backlog.pool[rows]):
        mine = rows[backlog.pool[rows] == code]
        buffer = np.empty(len(mine) + events * len(SCORER_NAMES), dtype=np.int64)
        buffer[: len(mine)] = mine
        pool_rows[int(code)], pool_size[int(code)] = buffer, len(mine)
    now = float(backlog.release[rows].min()) if len(rows) else 0.0
    typical = backlog.fallback_duration(rows, DEFAULT_ESTIMATE)
    code = backlog.vocabulary.code
    pools = {}
    for pool, units in setup.capacity.items():
        mine = backlog.pool[rows] == code("pool", pool)
        mean = float(typical[mine].mean()) if mine.any() else DEFAULT_ESTIMATE
        pools[code("pool", pool)] = PoolView(units, units, units * mean / 2)
    return Run(backlog, rows, pool_rows, pool_size, now, pools, encode_s)


def _ms(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, q))


def _timed(action: Callable[[], object], repetitions: int) -> list[float]:
    spent = []
    for _ in range(repetitions):
        began = time.perf_counter()
        action()
        spent.append(time.perf_counter() - began)
    return spent


def _measure(
    name: str, setup: Setup, run: Run, repetitions: int, arrivals: Sequence[WorkloadTask]
) -> dict[str, float]:
    backlog, rows, now, pools = run.backlog, run.rows, run.now, run.pools
    scorer: Scorer

    def fresh() -> Scorer:
        if name == "learned":
            learned = Learned(learn=False)
            if setup.models is not None:
                learned.use(setup.models)
            # Forget every prediction: another scorer's id may match this one's.
            backlog.model[: len(backlog)] = -1
            return learned
        return Atc() if name == "atc" else Edf()

    def rank_cold() -> None:
        nonlocal scorer
        scorer = fresh()
        scorer.rank(RankRequest(backlog, rows, now, pools))

    scorer = fresh()
    cold = _timed(rank_cold, repetitions)
    warm = _timed(lambda: scorer.rank(RankRequest(backlog, rows, now, pools)), repetitions)
    figures = {
        "rank_ms_p50": _ms(cold, 50),
        "rank_ms_p90": _ms(cold, 90),
        "rank_warm_ms_p50": _ms(warm, 50),
    }
    if name == "learned" and setup.models is not None:
        models = setup.models
        predict = _timed(lambda: models.predict(backlog, rows, DEFAULT_ESTIMATE), repetitions)
        figures["predict_ms_p50"] = _ms(predict, 50)

    # Arrivals: the scorer is warm (every waiting row predicted and ranked once).
    ranked = {
        code: np.sort(scorer.rank(RankRequest(backlog, buffer[: run.pool_size[code]], now, pools)))
        for code, buffer in run.pool_rows.items()
    }
    sizes = dict(run.pool_size)
    history = setup.history
    spent, positions = [], []
    for seq, task in enumerate(arrivals, start=len(backlog)):
        began = time.perf_counter()
        row = backlog.add(scored(task, seq), history)
        code = int(backlog.pool[row])
        if isinstance(scorer, Incremental):
            buffer = run.pool_rows[code]
            buffer[sizes[code]] = row
            sizes[code] += 1
            arrival = scorer.rank_arrival(RankRequest(backlog, buffer[:0], now, pools), row)
            position = int(np.searchsorted(ranked[code], arrival))
        elif scorer.time_dependent:
            buffer = run.pool_rows[code]
            buffer[sizes[code]] = row
            sizes[code] += 1
            ranks = scorer.rank(RankRequest(backlog, buffer[: sizes[code]], now, pools))
            position = int((ranks[:-1] < ranks[-1]).sum())
        else:
            rank = scorer.rank(RankRequest(backlog, np.array([row], dtype=np.int64), now))
            position = int(np.searchsorted(ranked[code], rank[0]))
        spent.append(time.perf_counter() - began)
        positions.append(position / sizes[code])
    figures["event_ms_p50"] = _ms(spent, 50)
    figures["event_ms_p99"] = _ms(spent, 99)
    # Where an arrival lands among the waiting tasks of its pool: 0 first, 1 last.
    figures["arrival_position_p50"] = float(np.median(positions))
    return figures


def decide_bench(
    *,
    backlog: int = 100_000,
    history: int = 20_000,
    scenario: str = MIX,
    runs: int = 3,
    repetitions: int = 10,
    events: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the benchmark; returns one JSON object (see the module docstring)."""
    if scenario != MIX and scenario not in SCENARIOS:
        raise InvalidInput(
            f"no scenario {scenario!r}; choose {MIX} or one of {', '.join(SCENARIOS)}"
        )
    for option, value in (
        ("backlog", backlog),
        ("history", history),
        ("runs", runs),
        ("repetitions", repetitions),
        ("events", events),
    ):
        if value < 1:
            raise InvalidInput(f"--{option} must be at least 1, got {value}")
    setup = prepare(scenario, backlog, history, events, seed)
    per_run: dict[str, list[dict[str, float]]] = {name: [] for name in SCORER_NAMES}
    encode = []
    for _ in range(runs):
        run = _encode(setup, events)
        encode.append(run.encode_s)
        for name in SCORER_NAMES:
            per_run[name].append(_measure(name, setup, run, repetitions, setup.arrivals))

    paths = {
        "learned": "rank_arrival: predict the row, triage it against the pool's last full "
        "ranking, binary search",
        "atc": "full pool re-rank (the index depends on the pool's mean duration)",
        "edf": "rank the new row alone, binary search among the ranked backlog",
    }
    scorers: dict[str, dict[str, Any]] = {}
    for name, runs_of in per_run.items():
        medians = {
            key: round(statistics.median(figures[key] for figures in runs_of), 3)
            for key in runs_of[0]
        }
        scorers[name] = {
            **medians,
            "rank_ms_p50_runs": [round(figures["rank_ms_p50"], 3) for figures in runs_of],
            "event_path": paths[name],
        }
    learned = scorers["learned"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 2) if b > 0 and math.isfinite(a / b) else None

    ratios = {
        f"learned/{other}": {
            key: ratio(float(learned[key]), float(scorers[other][key]))
            for key in ("rank_ms_p50", "rank_warm_ms_p50", "event_ms_p50", "event_ms_p99")
        }
        for other in ("atc", "edf")
    }
    fitted = setup.fitted
    return {
        "scenario": scenario,
        "backlog": len(setup.waiting),
        "history": history,
        "arrivals": events,
        "runs": runs,
        "repetitions": repetitions,
        "pools": {
            pool: {
                "capacity": units,
                "waiting": sum(1 for t in setup.waiting if pool in t.resources),
            }
            for pool, units in setup.capacity.items()
        },
        "models": {
            "version": None if setup.models is None else setup.models.short,
            "lightgbm": setup.models is not None,
            "fit_s": round(setup.fit_s, 3),
            "validation": [] if fitted is None else [v.to_json() for v in fitted.validations],
        },
        "encode_ms": round(statistics.median(encode) * 1e3, 3),
        "rank_ms_p50": learned["rank_ms_p50"],
        "rank_ms_p90": learned["rank_ms_p90"],
        "event_ms_p50": learned["event_ms_p50"],
        "event_ms_p99": learned["event_ms_p99"],
        "scorers": scorers,
        "ratios": ratios,
    }
