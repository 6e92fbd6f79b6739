"""Agents mode of the simulator: sites, leased global limits, outages, the independent checker."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections.abc import Sequence

import pytest
from typer.testing import CliRunner

from tactician.cli.main import cli, main
from tactician.errors import InvalidInput
from tactician.sim.agents import AGENTS, CENTRAL, AgentsOptions, run_mode
from tactician.sim.agents_compare import AgentsSetup, compare, run_counts
from tactician.sim.checks import Executed, check_schedule, over_capacity, rate_violations
from tactician.sim.leases import PoolLeases, RateLeases, RateLimit, parse_rate, water_fill
from tactician.sim.policies import get_policy
from tactician.sim.scenarios import build
from tactician.sim.sites import (
    Layout,
    Links,
    Outage,
    apportion,
    layout,
    parse_outage,
    parse_site_capacity,
)
from tactician.sim.workload import WorkloadTask


def task(
    task_id: str, site: str, submit: float, duration: float, *, pool: str = "p", due: float = 1e6
) -> WorkloadTask:
    return WorkloadTask(
        id=task_id,
        kind="k",
        submit_at=submit,
        release_at=submit,
        due_at=due,
        duration=duration,
        estimate=duration,
        resources={pool: 1},
        features={"site": site},
    )


def small_logistics(seed: int, tasks: int = 240) -> tuple[list[WorkloadTask], dict[str, int]]:
    scenario = build("logistics", tasks=tasks, seed=seed, load=1.2)
    return scenario.tasks, scenario.capacity


def sites_of(tasks: Sequence[WorkloadTask], capacity: dict[str, int], count: int) -> Layout:
    return layout(tasks, count, capacity, {}, seed=0)


# --- token leasing ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_leased_tokens_keep_the_global_envelope_whatever_the_sites_do(seed: int) -> None:
    """Sites lend, spend only what they hold, give back and go silent at random (a partitioned
    site neither renews nor gives back): the tokens that can be spent never exceed the burst,
    and the starts keep the rate's envelope in every window."""
    rng = random.Random(seed)
    limit = RateLimit(rng.uniform(0.05, 2.0), float(rng.randint(1, 20)))
    ttl = rng.uniform(5.0, 60.0)
    book = RateLeases(limit)
    holding = {name: [0, -1.0] for name in ("a", "b", "c")}  # tokens, expires at
    starts: list[float] = []
    now = 0.0
    for _ in range(400):
        now += rng.expovariate(2.0)
        name = rng.choice(list(holding))
        tokens, expires = holding[name]
        held = int(tokens) if now < expires else 0
        linked = rng.random() < 0.7
        action = rng.random()
        if action < 0.5:
            spent = min(held, rng.randint(0, 3))
            starts += [now] * spent
            holding[name][0] = held - spent
        elif linked and action < 0.8:
            got = book.lend(name, rng.randint(0, 8), now, ttl)
            holding[name] = [held + got, now + ttl]
        elif linked:
            book.give_back(name, held, now)
            holding[name] = [0, -1.0]
        book.advance(now)
        spendable = book.available + sum(int(t) for t, until in holding.values() if now < until)
        assert spendable <= limit.burst + 1e-9
        assert book.available >= -1e-9
    assert rate_violations(starts, limit) == 0


def test_a_partitioned_sites_tokens_expire_and_the_centre_lends_again() -> None:
    book = RateLeases(RateLimit(per_second=1.0, burst=10))
    assert book.lend("a", 10, 0.0, ttl=100.0) == 10  # a holds the whole burst, then goes silent
    assert book.lend("b", 5, 50.0, ttl=100.0) == 0  # a's tokens may still be spent: none for b
    assert book.next_token_at(50.0) == 100.0
    # At 100 a's lease expires: the centre cannot know what a spent, so it mints anew from then.
    assert book.lend("b", 5, 103.0, ttl=100.0) == 3
    assert book.lend("b", 20, 200.0, ttl=100.0) == 7  # the rest of the burst, and no more
    assert "a" not in book.leases

    pool = PoolLeases(3)
    assert pool.lend("a", 3, 0.0, ttl=100.0) == 3
    assert pool.lend("b", 1, 99.0, ttl=100.0) == 0
    assert pool.lend("b", 2, 100.0, ttl=100.0) == 2  # a's lease ended: its units are lent again
    pool.keep("b", 1, 120.0)  # b returns what it no longer needs
    assert pool.free(120.0) == 2


def test_a_site_cut_off_past_its_lease_is_fenced_and_another_site_gets_the_units() -> None:
    """A holds both units of a shared pool when its link drops for hours; B's task waits until
    A's lease expires, then runs; A's two tasks are stopped at that moment and run again once
    its link is back. Centrally, B waits until the centre hears that A's tasks finished."""
    tasks = [
        task("a1", "a", 0.0, 5000.0),
        task("a2", "a", 0.0, 5000.0),
        task("b1", "b", 50.0, 100.0),
    ]
    sites = layout(tasks, 2, {"p": 4}, {}, seed=0, site_capacity=None)
    site_a = sites.site_of["a1"]
    outage = Outage(site_a, 10.0, 20_000.0)
    options = AgentsOptions(pools={"p": 2}, outages=(outage,), lease_period=60.0, lease_ttl=300.0)
    agents = run_mode(tasks, sites, get_policy("edf"), options, AGENTS)
    records = agents.result.records
    assert records["b1"].start == 300.0  # A's lease, last renewed at 0, expired at 300
    by_task = {name: [r for r in agents.runs if r.task == name] for name in ("a1", "a2", "b1")}
    for name in ("a1", "a2"):
        stopped, again = by_task[name]
        assert (stopped.start, stopped.end, stopped.completed) == (0.0, 300.0, False)
        assert again.start == 20_000.0 and again.completed  # its link came back
    assert agents.fenced == 2
    checked = check_schedule(agents.runs, rates={}, pools={"p": 2}, site_capacity=sites.capacity_at)
    assert checked.global_limits == 0 and checked.site_capacity == 0
    assert run_counts(tasks, agents.runs)["completed_once"] == 3

    central = run_mode(tasks, sites, get_policy("edf"), options, CENTRAL)
    assert central.result.records["b1"].start == 20_000.0
    assert central.fenced == 0 and len(central.runs) == 3


def test_water_fill_meets_small_claims_and_shares_the_rest() -> None:
    assert water_fill(10, {"a": 2, "b": 20, "c": 20}) == {"a": 2, "b": 4, "c": 4}
    assert water_fill(2, {"a": 5, "b": 5, "c": 5}) == {"a": 1, "b": 1, "c": 0}
    assert water_fill(0, {"a": 5}) == {"a": 0}
    assert sum(water_fill(7, {"a": 3, "b": 0, "c": 9}).values()) == 7


# --- the checker -----------------------------------------------------------------------------


def run(task_id: str, start: float, end: float, *, site: str = "s1") -> Executed:
    return Executed(task_id, site, "k", "p", 1, start, end)


def test_the_checker_catches_each_kind_of_violation() -> None:
    limit = RateLimit(per_second=1.0, burst=3)
    assert rate_violations([0.0, 0.0, 0.0, 1.0, 2.0], limit) == 0
    assert rate_violations([0.0, 0.0, 0.0, 0.0], limit) == 1  # burst + 1 at one instant
    assert rate_violations([0.0, 0.0, 0.0, 0.5], limit) == 1  # the refill is not yet whole
    assert rate_violations([10.0, 10.0, 10.0, 11.0, 11.5], limit) == 1  # 5 in 1.5 s
    runs = [run("a", 0.0, 10.0), run("b", 10.0, 20.0)]
    assert over_capacity(runs, lambda _: 1) == 0  # b takes the unit a frees at 10
    assert over_capacity([*runs, run("c", 5.0, 6.0)], lambda _: 1) == 1
    checked = check_schedule(
        [*runs, run("c", 5.0, 6.0, site="s2")],
        rates={"k": limit},
        pools={"p": 1},
        site_capacity=lambda site, pool, at: 1,
    )
    assert checked.pool == {"p": 1} and checked.site_capacity == 0 and checked.rate == {"k": 0}
    assert checked.global_limits == 1


def test_the_checker_finds_one_start_injected_into_a_real_schedule() -> None:
    tasks, capacity = small_logistics(3)
    sites = sites_of(tasks, capacity, 3)
    shared = sum(c["drivers"] for c in sites.capacity.values()) - 6
    options = AgentsOptions(
        rates={"deliver": RateLimit(0.005, 4)}, pools={"drivers": shared}, lease_ttl=300.0
    )
    result = run_mode(tasks, sites, get_policy("edf"), options, AGENTS)

    def check(runs: list[Executed]) -> tuple[int, int]:
        found = check_schedule(
            runs, rates=options.rates, pools=options.pools, site_capacity=sites.capacity_at
        )
        return sum(found.rate.values()), sum(found.pool.values())

    assert check(result.runs) == (0, 0)
    # One more start where the rate's envelope has less than a token to spare.
    limit = options.rates["deliver"]
    starts = sorted(r.start for r in result.runs)
    spare = [
        min(limit.burst + limit.per_second * (t - starts[i]) - (j - i + 1) for i in range(j + 1))
        for j, t in enumerate(starts)
    ]
    tight = min(range(len(starts)), key=lambda j: spare[j])
    assert spare[tight] < 1  # the limit binds somewhere
    extra = dataclasses.replace(result.runs[0], task="injected", start=starts[tight])
    assert check([*result.runs, extra])[0] >= 1
    # One more unit in use where the shared pool is full.
    full = next(
        r
        for r in result.runs
        if sum(o.units for o in result.runs if o.start <= r.start < o.end) == shared
    )
    assert check([*result.runs, dataclasses.replace(full, task="injected", kind="x")])[1] >= 1


# --- the modes -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_agents_keep_every_limit_under_outages(seed: int) -> None:
    """Tight global limits, random outages: the independent checker finds nothing, and no site
    spent a token or used a unit it did not hold (the simulator asserts that at each start)."""
    tasks, capacity = small_logistics(seed)
    sites = sites_of(tasks, capacity, 3)
    rng = random.Random(seed)
    outages = tuple(
        Outage(rng.choice(sites.sites), start, start + rng.uniform(600, 5400))
        for start in (rng.uniform(0, 20_000) for _ in range(3))
    )
    shared = sum(c["drivers"] for c in sites.capacity.values()) - 5
    options = AgentsOptions(
        rates={"deliver": RateLimit(0.02, 5)},
        pools={"drivers": shared},
        outages=outages,
        lease_ttl=rng.choice((120.0, 600.0, 3600.0)),
    )
    for mode in (CENTRAL, AGENTS):
        result = run_mode(tasks, sites, get_policy("edf"), options, mode)
        checked = check_schedule(
            result.runs, rates=options.rates, pools=options.pools, site_capacity=sites.capacity_at
        )
        assert checked.global_limits == 0 and checked.site_capacity == 0, (mode, checked)
        assert checked.busiest_minute["deliver"] <= 5 + 0.02 * 60
        counts = run_counts(tasks, result.runs)
        assert counts["completed_once"] == len(tasks), (mode, counts)


def test_no_task_is_lost_or_run_twice_in_either_mode() -> None:
    tasks, capacity = small_logistics(1, tasks=300)
    setup = AgentsSetup(
        sites=3,
        options=AgentsOptions(
            rates={"deliver": RateLimit(0.03, 20)},
            pools={"drivers": 12},
            lease_ttl=600.0,
        ),
        random_outages=3,
        outage_length=3600.0,
        seed=1,
    )
    out = compare(tasks, capacity, {}, get_policy("atc"), setup)
    assert len(out["setup"]["outages"]) >= 2
    for mode in (CENTRAL, AGENTS):
        figures = out["modes"][mode]
        counts = figures["runs"]
        assert counts["completed_once"] == figures["completed"] == len(tasks)
        assert counts["completed_twice"] == counts["never_completed"] == 0
        assert counts["attempts"] == len(tasks) + counts["fenced"]
        assert figures["global_limit_violations"] == 0
        assert set(figures["outage_cost"]) == {
            "missed_deadlines",
            "weighted_tardiness",
            "mean_wait_s",
        }
    # Central orders cannot reach a cut-off site: that costs waiting, which agents avoid here.
    assert out["modes"][CENTRAL]["outage_cost"]["mean_wait_s"] > 0
    central, agents = out["modes"][CENTRAL], out["modes"][AGENTS]
    assert central["decision_latency_ms"]["modelled_rtt"] == 50.0
    assert agents["decision_latency_ms"]["modelled_rtt"] == 0.0
    assert central["decision_latency_ms"]["p50"] >= 50.0 > agents["decision_latency_ms"]["p50"]


def test_the_same_seed_gives_the_same_schedule() -> None:
    tasks, capacity = small_logistics(2)
    setup = AgentsSetup(
        sites=3,
        options=AgentsOptions(rates={"deliver": RateLimit(0.03, 6)}),
        random_outages=2,
        outage_length=1800.0,
        seed=5,
    )
    sites = layout(tasks, 3, capacity, {}, seed=5)
    options = dataclasses.replace(setup.options, outages=(Outage("s2", 3600.0, 9000.0),))
    for mode in (CENTRAL, AGENTS):
        first = run_mode(tasks, sites, get_policy("ai"), options, mode)
        again = run_mode(tasks, sites, get_policy("ai"), options, mode)
        assert first.result.records == again.result.records
        assert first.runs == again.runs
    one = compare(tasks, capacity, {}, get_policy("edf"), setup)
    two = compare(tasks, capacity, {}, get_policy("edf"), setup)
    assert one["setup"] == two["setup"]
    measured = {"wall_s", "decision_latency_ms", "decide_cpu_us"}
    for mode in (CENTRAL, AGENTS):
        assert {k: v for k, v in one["modes"][mode].items() if k not in measured} == {
            k: v for k, v in two["modes"][mode].items() if k not in measured
        }
    other = compare(tasks, capacity, {}, get_policy("edf"), dataclasses.replace(setup, seed=6))
    assert other["setup"]["outages"] != one["setup"]["outages"]


def test_without_limits_or_outages_agents_and_central_agree_on_a_static_rule() -> None:
    """edf ranks each task the same wherever it is decided: with no shared limit and no outage
    the two modes start the same tasks at the same times."""
    tasks, capacity = small_logistics(4)
    sites = sites_of(tasks, capacity, 3)
    central = run_mode(tasks, sites, get_policy("edf"), AgentsOptions(), CENTRAL)
    agents = run_mode(tasks, sites, get_policy("edf"), AgentsOptions(), AGENTS)
    assert central.result.records == agents.result.records


def test_agents_refuse_dependencies_across_sites() -> None:
    tasks = [task("a", "x", 0, 10), dataclasses.replace(task("b", "y", 0, 10), depends_on=("a",))]
    sites = layout(tasks, 2, {"p": 2}, {}, seed=0)
    with pytest.raises(InvalidInput, match="agents mode needs dependencies within a site"):
        run_mode(tasks, sites, get_policy("edf"), AgentsOptions(), AGENTS)
    central = run_mode(tasks, sites, get_policy("edf"), AgentsOptions(), CENTRAL)
    assert central.result.records["b"].start == 10.0


# --- sites -----------------------------------------------------------------------------------


def test_tasks_go_to_sites_by_their_zone_and_capacity_follows_the_work() -> None:
    scenario = build("incidents", tasks=600, seed=0, load=1.2, capacity={"oncall": 12})
    sites = layout(scenario.tasks, 3, scenario.capacity, scenario.calendar, seed=0)
    assert sites.key == "service"
    assert sorted(v for values in sites.groups.values() for v in values) == sorted(
        {str(t.features["service"]) for t in scenario.tasks}
    )
    for t in scenario.tasks:
        assert str(t.features["service"]) in sites.groups[sites.site_of[t.id]]
    assert sum(c["oncall"] for c in sites.capacity.values()) == 12
    capacity, calendar = sites.totals()
    assert capacity == {"oncall": 12}
    # Shifts are split at every change point; each site keeps at least one engineer.
    for at, total in scenario.calendar["oncall"]:
        shares = [sites.capacity_at(s, "oncall", at) for s in sites.sites]
        assert min(shares) >= 1 and sum(shares) >= total
    assert [at for at, _ in calendar["oncall"]] == [at for at, _ in scenario.calendar["oncall"]]


def test_without_a_site_feature_tasks_are_hashed_to_sites() -> None:
    tasks = [dataclasses.replace(task(f"t{n}", "x", 0, 10), features={}) for n in range(200)]
    one = layout(tasks, 4, {"p": 8}, {}, seed=0)
    assert one.key is None and set(one.site_of.values()) == set(one.sites)
    assert layout(tasks, 4, {"p": 8}, {}, seed=0).site_of == one.site_of
    assert layout(tasks, 4, {"p": 8}, {}, seed=1).site_of != one.site_of


def test_apportion_keeps_the_total_and_a_unit_for_every_site_with_work() -> None:
    assert apportion(10, {"a": 1.0, "b": 1.0, "c": 2.0}) == {"a": 3, "b": 2, "c": 5}
    assert apportion(2, {"a": 1.0, "b": 1.0, "c": 8.0}) == {"a": 1, "b": 1, "c": 2}
    assert apportion(5, {"a": 0.0, "b": 1.0}) == {"a": 0, "b": 5}


def test_links_and_outage_parsing() -> None:
    links = Links([Outage("s1", 10.0, 20.0), Outage("s1", 15.0, 30.0), Outage("s2", 5.0, 6.0)])
    assert links.up("s1", 9.9) and not links.up("s1", 10.0) and not links.up("s1", 29.0)
    assert links.up("s1", 30.0) and links.up_again("s1", 12.0) == 30.0
    assert links.spans() == [("s2", 5.0, 6.0), ("s1", 10.0, 30.0)]
    assert parse_outage("s2:2h-150m", ["s1", "s2"]) == Outage("s2", 7200.0, 9000.0)
    assert parse_outage("s1:90-120s", ["s1"]) == Outage("s1", 90.0, 120.0)
    for bad, message in (
        ("s3:1h-2h", "no site 's3'"),
        ("s1:2h-1h", "the end must come after the start"),
        ("s1-1h-2h", "must look like SITE:START-END"),
        ("s1:soon-2h", "is not a time such as"),
    ):
        with pytest.raises(InvalidInput, match=message):
            parse_outage(bad, ["s1", "s2"])


def test_rate_and_site_capacity_parsing() -> None:
    assert parse_rate("deliver=120/h") == ("deliver", RateLimit(120 / 3600, 2.0))
    assert parse_rate("x=3/s,burst=10") == ("x", RateLimit(3.0, 10.0))
    assert parse_rate("x=1/min") == ("x", RateLimit(1 / 60, 1.0))
    for bad in ("deliver", "deliver=3/week", "=3/s", "x=3/s,cap=2", "x=fast/s", "x=3/s,burst=0"):
        with pytest.raises(InvalidInput):
            parse_rate(bad)
    assert parse_site_capacity(["p=3", "s2:p=5"], ["s1", "s2"]) == {
        "s1": {"p": 3},
        "s2": {"p": 5},
    }
    with pytest.raises(InvalidInput, match="no site 's9'"):
        parse_site_capacity(["s9:p=1"], ["s1"])
    with pytest.raises(InvalidInput, match="pool=N or SITE:pool=N"):
        parse_site_capacity(["p=0"], ["s1"])


# --- the command -----------------------------------------------------------------------------


def test_cli_simulate_agents_json_reports_both_modes() -> None:
    result = CliRunner().invoke(
        cli,
        [
            *("simulate", "--scenario", "logistics", "--tasks", "200", "--seed", "1"),
            *("--agents", "2", "--policy", "edf", "--global-rate", "deliver=90/h,burst=30"),
            *("--outage", "s1:1h-2h", "--random-outages", "1", "--rtt", "0.08", "--json"),
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(result.stdout)
    assert set(data) == {"modes", "setup", "workload"}
    assert set(data["modes"]) == {"central", "agents"}
    for figures in data["modes"].values():
        assert figures["tasks"] == figures["completed"] == 200
        assert figures["global_limit_violations"] == 0
        assert set(figures["decision_latency_ms"]) >= {"p50", "p99", "modelled_rtt"}
        assert figures["outage_cost"] is not None
        assert {"missed_deadlines", "weighted_tardiness", "mean_wait_s"} <= set(figures)
    assert data["modes"]["central"]["decision_latency_ms"]["modelled_rtt"] == 80.0
    assert data["setup"]["global_rates"] == {"deliver": {"per_second": 0.025, "burst": 30.0}}
    assert {"site": "s1", "start": 3600.0, "end": 7200.0} in data["setup"]["outages"]


def test_cli_simulate_agents_prints_a_table() -> None:
    args = ["simulate", "--scenario", "incidents", "--tasks", "200", "--capacity", "oncall=6"]
    result = CliRunner().invoke(cli, [*args, "--agents", "2", "--policy", "edf"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "central" in result.stdout and "agents" in result.stdout
    assert "modelled round trip of 50 ms" in result.stdout


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["tactician", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return int(exited.value.code or 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--outage", "s1:1h-2h"), "--outage applies to --agents only"),
        (("--agents", "2", "--outage", "s3:1h-2h"), "--outage s3:1h-2h: no site 's3'"),
        (("--agents", "2", "--policy", "edf,ai"), "--agents compares central and agents"),
        (("--agents", "2", "--global-rate", "deliver=fast"), "--global-rate must look like"),
        (("--agents", "9"), "--agents 9: the tasks have only 5 values of 'zone'"),
        (("--agents", "2", "--global-pool", "drivers=0"), "--global-pool must look like pool=N"),
        (("--agents", "2", "--lease-ttl", "30s"), "the lease period (60 s) must be positive"),
        (("--agents", "2", "--site-key", "colour"), "--site-key colour: task d"),
    ],
)
def test_cli_simulate_agents_bad_input_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    common = ("simulate", "--scenario", "logistics", "--tasks", "50")
    assert run_main(monkeypatch, *common, *args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: {message}"), captured.err
