"""Central or at the edge: one workload decided by a central planner, or by an agent per site.

The work runs at sites (`tactician.sim.sites`): each task at one site, on that site's units of
its pool. Two ways to decide what starts when, on the same virtual clock and the same code:

- **central**: one planner ranks and plans every site's ready tasks (one scorer, one backlog,
  the live service's `plan_starts`). Events reach it over each site's link, and its start
  orders go back the same way: while a site's link is down, the centre hears nothing from that
  site (its arrivals and finishes wait at the site and arrive when the link returns) and starts
  nothing there. The centre holds the global limits itself: a global rate is its own token
  bucket, a shared pool is counted across all sites.
- **agents**: each site has its own planner (a scorer of the same policy, its own backlog, the
  same `plan_starts`) and decides locally, link or no link. Global limits are lent by the centre
  as leased tokens (`tactician.sim.leases`): a site starts work under a global rate only with a
  token it holds, and uses a shared pool's units only while it holds them. While its link is up
  a site tops its holding up on demand and renews it at every lease round (`lease_period`); the
  centre shares tokens out by demand (what waits at the site plus what it started in the last
  `lease_ttl`: about what it would spend before its lease runs out). While its link is down a
  site spends what it holds; when its lease expires its tokens are gone and it stops the work
  on shared-pool units (fencing), which starts again later; the centre lends them out again
  from that moment.

A learning policy learns from the outcomes its planner hears of: the centre from every site's
(late, for a cut-off site), an agent from its own. Agents start from the same models (trained on
the same history, as the centre's signed bundle would carry them); retraining at the centre and
pushing new models to the agents during the run is not modelled.

Decision latency, per planning pass: the CPU time of ranking and planning, measured in this
process (`time.process_time`, so on this machine), plus for the central planner a modelled round
trip (`rtt`) for the event to reach the centre and the order to come back: every site is taken to
be remote. The schedule itself is not delayed by the round trip (tens of milliseconds against
runs of minutes); a cut link is modelled in the schedule, as above.

Not modelled: failures and retries (an attempt runs to its end unless fenced), cross-site
dependencies in agents mode (refused), and clock skew between sites and centre (a real agent
must treat its lease as expiring a margin early).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tactician.decide.features import Backlog
from tactician.decide.learned import Learned
from tactician.decide.scorers import Learner, PoolView, RankRequest, Scorer, expected_runs
from tactician.errors import InvalidInput
from tactician.plan.capacity import Candidate, CapacityView, KindLimits, plan_starts
from tactician.plan.flow import Bucket
from tactician.sim.checks import Executed
from tactician.sim.leases import PoolLeases, RateLeases, RateLimit, water_fill
from tactician.sim.policies import Policy, pretrain
from tactician.sim.simulator import SimResult, TaskRecord, scored
from tactician.sim.sites import Layout, Links, Outage
from tactician.sim.workload import WorkloadTask

CENTRAL, AGENTS = "central", "agents"
_SHIFT, _DONE, _ARRIVE, _RELEASE, _LINK_DOWN, _LINK_UP, _ROUND, _EXPIRE, _REPLAN = range(9)
_WAKE_SLACK = 1e-6
"""Seconds added to a rate limit's wake-up so that the token is whole when the planner looks."""
_IDLE_ROUNDS = 24 * 3600.0
"""Lease rounds stop after this long with nothing started or finished and nothing else due."""


@dataclass(frozen=True)
class AgentsOptions:
    """How the sites share global limits and talk to the centre."""

    rates: Mapping[str, RateLimit] = field(default_factory=dict)
    """Kind → a rate shared by all sites."""
    pools: Mapping[str, int] = field(default_factory=dict)
    """Pool → units shared by all sites (at most this many in use at once, anywhere)."""
    outages: tuple[Outage, ...] = ()
    rtt: float = 0.05
    """Seconds for an event to reach the centre and its decision to come back (modelled)."""
    lease_period: float = 60.0
    """Seconds between lease rounds (renewal and sharing out)."""
    lease_ttl: float = 600.0
    """Seconds a lease lasts unrenewed."""

    def __post_init__(self) -> None:
        if not (self.rtt >= 0 and math.isfinite(self.rtt)):
            raise InvalidInput(f"--rtt must be a non-negative number of seconds, got {self.rtt}")
        if not 0 < self.lease_period < self.lease_ttl:
            raise InvalidInput(
                f"the lease period ({self.lease_period:g} s) must be positive and shorter "
                f"than the lease's time to live ({self.lease_ttl:g} s)"
            )


@dataclass(frozen=True)
class ModeResult:
    """One mode's run of the workload."""

    mode: str
    result: SimResult
    runs: list[Executed]
    """Every attempt as executed, in start order."""
    decision_cpu_s: list[float]
    """CPU seconds of each planning pass (ranking and planning)."""
    rtt_s: float
    """The modelled round trip added to each central decision (0 for agents)."""
    fenced: int
    """Attempts stopped when their site's lease on a shared pool expired."""


@dataclass
class _Attempt:
    task: int
    site: str
    start: float
    end: float | None = None
    fenced: bool = False


class _Planner:
    """One deciding place: the centre (every site) or an agent (its own site)."""

    def __init__(self, name: str, sites: tuple[str, ...], scorer: Scorer, backlog: Backlog):
        self.name = name
        self.sites = sites
        self.scorer = scorer
        self.learner = scorer if isinstance(scorer, Learner) else None
        self.history = getattr(scorer, "history", None)
        self.backlog = backlog
        self.index_of: list[int] = [-1] * len(backlog)
        """Backlog row → task index (-1: a row of history)."""
        self.waiting: dict[str, dict[int, None]] = {}
        """Site pool → its ready tasks, as this planner knows them."""
        self.used: dict[str, int] = {}
        """Site pool → units in use as this planner knows (the centre hears finishes late)."""
        self.end_sum: dict[str, float] = {}
        self.running: dict[str, dict[int, float]] = {}
        """Site pool → task → expected end."""
        self.buckets: dict[str, Bucket] = {}
        self.dirty = False
        self.cpu = 0.0
        self.samples: list[float] = []


class _World:
    """One simulation of the sites in one mode."""

    def __init__(
        self,
        tasks: Sequence[WorkloadTask],
        sites: Layout,
        policy: Policy,
        history: Sequence[WorkloadTask],
        options: AgentsOptions,
        mode: str,
    ) -> None:
        self.tasks = tasks
        self.layout = sites
        self.policy = policy
        self.options = options
        self.mode = mode
        self.reserve = policy.reserve
        self.links = Links(options.outages)
        order = sorted(range(len(tasks)), key=lambda i: (tasks[i].submit_at, i))
        self.seq = [0] * len(tasks)
        for position, i in enumerate(order):
            self.seq[i] = position
        self.site_of = [sites.site_of[t.id] for t in tasks]
        self.scored = [scored(t, self.seq[i]) for i, t in enumerate(tasks)]
        self.pool = [s.pool for s in self.scored]
        self.units = [s.units for s in self.scored]
        self.site_pool = [
            f"{s.pool}@{site}" for s, site in zip(self.scored, self.site_of, strict=True)
        ]
        self._links_tasks(tasks)
        self.cap: dict[str, int | None] = {}
        for site in sites.sites:
            for pool, units in sites.capacity[site].items():
                self.cap[f"{pool}@{site}"] = units
        for pool, units in options.pools.items():
            if units < max(
                (u for p, u in zip(self.pool, self.units, strict=True) if p == pool), default=0
            ):
                raise InvalidInput(f"shared pool {pool}: {units} units, less than a task needs")
        self.site_used: dict[str, int] = {}
        """Site pool → units in use at the site (what is physically true)."""
        if mode == CENTRAL:
            centre = _Planner(CENTRAL, sites.sites, *self._scorer(policy, history))
            self.planners = [centre]
            self.planner_of = {site: centre for site in sites.sites}
        else:
            self.planners = [
                _Planner(site, (site,), *self._scorer(policy, history)) for site in sites.sites
            ]
            self.planner_of = {p.name: p for p in self.planners}
        self.row = [-1] * len(tasks)
        self.released = [False] * len(tasks)
        self.missing = [0] * len(tasks)
        self.done_known = [False] * len(tasks)
        self.start = [math.nan] * len(tasks)
        self.finish = [math.nan] * len(tasks)
        self.attempt_of = [-1] * len(tasks)
        self.attempts: list[_Attempt] = []
        self.finished = 0
        self.fenced = 0
        self.outbox: dict[str, list[tuple[int, int]]] = {s: [] for s in sites.sites}
        """Central mode: what a cut-off site will tell the centre when its link returns."""
        self.rate_books = {kind: RateLeases(limit) for kind, limit in options.rates.items()}
        self.pool_books = {pool: PoolLeases(units) for pool, units in options.pools.items()}
        self.tokens = {s: dict.fromkeys(options.rates, 0) for s in sites.sites}
        self.tokens_expire = {s: dict.fromkeys(options.rates, -math.inf) for s in sites.sites}
        self.held = {s: dict.fromkeys(options.pools, 0) for s in sites.sites}
        self.held_expire = {s: dict.fromkeys(options.pools, -math.inf) for s in sites.sites}
        self.expire_due: dict[str, float | None] = dict.fromkeys(sites.sites)
        self.recent: dict[str, deque[tuple[float, str]]] = {s: deque() for s in sites.sites}
        """Per site: (time, kind) of its recent starts, for its share of a global rate."""
        self.events: list[tuple[float, int, int, int]] = []
        self.counter = 0
        self.last_progress = 0.0

    def _links_tasks(self, tasks: Sequence[WorkloadTask]) -> None:
        index = {t.id: i for i, t in enumerate(tasks)}
        if len(index) != len(tasks):
            raise InvalidInput("task ids must be unique")
        self.children: list[list[int]] = [[] for _ in tasks]
        self.parents: list[list[int]] = [[] for _ in tasks]
        for i, t in enumerate(tasks):
            for dep in set(t.depends_on):
                if dep not in index:
                    raise InvalidInput(f"task {t.id}: depends_on names unknown task {dep!r}")
                parent = index[dep]
                if self.mode == AGENTS and self.site_of[parent] != self.site_of[i]:
                    raise InvalidInput(
                        f"task {t.id} at site {self.site_of[i]} depends on {dep} at site "
                        f"{self.site_of[parent]}: agents mode needs dependencies within a site "
                        "(choose --site-key so that they share one)"
                    )
                self.children[parent].append(i)
                self.parents[i].append(parent)

    @staticmethod
    def _scorer(policy: Policy, history: Sequence[WorkloadTask]) -> tuple[Scorer, Backlog]:
        scorer = policy.make()
        if isinstance(scorer, Learned) and history:
            return scorer, pretrain(scorer, history)
        return scorer, Backlog()

    # --- the event loop ------------------------------------------------------------------

    def push(self, at: float, what: int, i: int) -> None:
        self.counter += 1
        heapq.heappush(self.events, (at, self.counter, what, i))

    def run(self) -> ModeResult:
        sites = self.layout.sites
        self.shifts: list[tuple[str, int]] = []
        for site, pools in self.layout.calendar.items():
            for pool, changes in pools.items():
                for at, units in changes:
                    self.shifts.append((f"{pool}@{site}", units))
                    self.push(at, _SHIFT, len(self.shifts) - 1)
        for i, t in enumerate(self.tasks):
            self.push(t.submit_at, _ARRIVE, i)
        for site, start, end in self.links.spans():
            self.push(start, _LINK_DOWN, sites.index(site))
            self.push(end, _LINK_UP, sites.index(site))
        if self.mode == AGENTS and (self.rate_books or self.pool_books):
            self.push(0.0, _ROUND, -1)
        while self.events:
            now = self.events[0][0]
            while self.events and self.events[0][0] == now:
                _, _, what, i = heapq.heappop(self.events)
                self.apply(what, i, now)
            for planner in self.planners:
                if planner.dirty:
                    self.plan(planner, now)
        return self.result()

    def result(self) -> ModeResult:
        records = {
            t.id: TaskRecord(
                t.id,
                None if math.isnan(self.start[i]) else self.start[i],
                None if math.isnan(self.finish[i]) else self.finish[i],
            )
            for i, t in enumerate(self.tasks)
        }
        samples = [s for p in self.planners for s in p.samples]
        result = SimResult(
            self.policy.name,
            records,
            len(samples),
            sum(p.cpu for p in self.planners),
            len(self.attempts),
        )
        runs = [
            Executed(
                task=self.tasks[a.task].id,
                site=a.site,
                kind=self.tasks[a.task].kind,
                pool=self.pool[a.task],
                units=self.units[a.task],
                start=a.start,
                end=math.inf if a.end is None else a.end,
                completed=not a.fenced and a.end is not None,
            )
            for a in self.attempts
        ]
        rtt = self.options.rtt if self.mode == CENTRAL else 0.0
        return ModeResult(self.mode, result, runs, samples, rtt, self.fenced)

    def apply(self, what: int, i: int, now: float) -> None:
        if what == _SHIFT:
            site_pool, units = self.shifts[i]
            self.cap[site_pool] = units
            self.planner_of[site_pool.rpartition("@")[2]].dirty = True
        elif what == _ARRIVE:
            site = self.site_of[i]
            if self.mode == CENTRAL and not self.links.up(site, now):
                self.outbox[site].append((_ARRIVE, i))
            else:
                self.know(i, now)
        elif what == _RELEASE:
            self.release(i)
        elif what == _DONE:
            self.done(i, now)
        elif what == _LINK_DOWN:
            self.planner_of[self.layout.sites[i]].dirty = True
        elif what == _LINK_UP:
            site = self.layout.sites[i]
            for kind, task in self.outbox[site]:
                if kind == _ARRIVE:
                    self.know(task, now)
                else:
                    self.heard_done(task)
            self.outbox[site].clear()
            self.planner_of[site].dirty = True
        elif what == _ROUND:
            self.lease_round(now)
        elif what == _EXPIRE:
            site = self.layout.sites[i]
            self.expire(site, now)
            self._next_expiry(site, now)
        elif what == _REPLAN:
            self.planners[i].dirty = True

    # --- what a planner knows ------------------------------------------------------------

    def know(self, i: int, now: float) -> None:
        """Task i reaches its planner."""
        planner = self.planner_of[self.site_of[i]]
        began = time.process_time()
        task = dataclasses.replace(self.scored[i], pool=self.site_pool[i])
        self.row[i] = planner.backlog.add(task, planner.history)
        planner.index_of.append(i)
        for parent in self.parents[i]:
            if not self.done_known[parent]:
                self.missing[i] += 1
                if self.row[parent] >= 0:
                    planner.backlog.dependents[self.row[parent]] += self.tasks[i].weight
        planner.cpu += time.process_time() - began
        if self.tasks[i].release_at <= now:
            self.release(i)
        else:
            self.push(self.tasks[i].release_at, _RELEASE, i)

    def release(self, i: int) -> None:
        self.released[i] = True
        if self.missing[i] == 0:
            self.ready(i)

    def ready(self, i: int) -> None:
        planner = self.planner_of[self.site_of[i]]
        planner.waiting.setdefault(self.site_pool[i], {})[i] = None
        planner.dirty = True

    def done(self, k: int, now: float) -> None:
        """Attempt k ends at its site."""
        attempt = self.attempts[k]
        if attempt.fenced:
            return
        i = attempt.task
        attempt.end = now
        self.site_used[self.site_pool[i]] -= self.units[i]
        self.finish[i] = now
        self.finished += 1
        self.last_progress = now
        site = self.site_of[i]
        if self.mode == CENTRAL and not self.links.up(site, now):
            self.outbox[site].append((_DONE, i))
        else:
            self.heard_done(i)

    def heard_done(self, i: int) -> None:
        """Task i's planner hears that it finished."""
        planner = self.planner_of[self.site_of[i]]
        self.done_known[i] = True
        self._stopped(planner, i)
        attempt = self.attempts[self.attempt_of[i]]
        if planner.learner is not None:
            began = time.process_time()
            planner.learner.observe(
                planner.backlog,
                self.row[i],
                self.tasks[i].duration,
                failed=False,
                started_at=attempt.start,
                finished_at=self.finish[i],
            )
            planner.cpu += time.process_time() - began
        for child in self.children[i]:
            if self.row[child] >= 0:
                self.missing[child] -= 1
                if self.missing[child] == 0 and self.released[child]:
                    self.ready(child)

    def _stopped(self, planner: _Planner, i: int) -> None:
        site_pool = self.site_pool[i]
        planner.used[site_pool] -= self.units[i]
        expected_end = planner.running[site_pool].pop(i)
        planner.end_sum[site_pool] -= self.units[i] * expected_end
        planner.dirty = True

    # --- planning ------------------------------------------------------------------------

    def capacity(self, planner: _Planner, site_pool: str, now: float) -> int | None:
        """Units the planner may fill: the site's capacity in force, and for an agent under a
        shared pool, no more than the units its lease gives it."""
        cap = self.cap.get(site_pool)
        pool, _, site = site_pool.rpartition("@")
        if self.mode == AGENTS and pool in self.pool_books:
            held = self.held[site][pool] if now < self.held_expire[site][pool] else 0
            cap = held if cap is None else min(cap, held)
        return cap

    def plan(self, planner: _Planner, now: float) -> None:
        planner.dirty = False
        linked = {s for s in planner.sites if self.mode == AGENTS or self.links.up(s, now)}
        caps = {sp: self.capacity(planner, sp, now) for sp in planner.waiting}
        open_pools = [
            sp
            for sp, waiting in planner.waiting.items()
            if waiting
            and sp.rpartition("@")[2] in linked
            and (self.reserve or caps[sp] is None or planner.used.get(sp, 0) < (caps[sp] or 0))
        ]
        if not open_pools:
            self.top_up(planner, now)
            return
        began = time.process_time()
        backlog = planner.backlog
        tasks = [i for sp in sorted(open_pools) for i in planner.waiting[sp]]
        rows = np.fromiter((self.row[i] for i in tasks), dtype=np.int64, count=len(tasks))
        code = backlog.vocabulary.code
        views = {
            code("pool", sp): PoolView(
                capacity=caps[sp],
                busy_units=planner.used.get(sp, 0),
                busy_work=max(0.0, planner.end_sum.get(sp, 0.0) - now * planner.used.get(sp, 0)),
            )
            for sp in open_pools
        }
        ranks = np.asarray(planner.scorer.rank(RankRequest(backlog, rows, now, views)))
        keep = np.flatnonzero(np.isfinite(ranks))
        order = keep[np.lexsort((backlog.seq[rows[keep]], ranks[keep]))]
        view = CapacityView(pool_capacity=caps, pool_used=dict(planner.used))
        self._limits(planner, view, now)
        expected = expected_runs(backlog, rows[order]) if self.reserve else None
        if self.reserve:
            view.reserve = True
            view.running_ends = {
                sp: sorted((end, self.units[i]) for i, end in running.items())
                for sp, running in planner.running.items()
            }
        plan = plan_starts(
            self._offer(planner, view, tasks, order, ranks, expected),
            view,
            now,
            len(self.tasks),
        )
        spent = time.process_time() - began
        planner.samples.append(spent)
        planner.cpu += spent
        if plan.starts:
            started = [int(c.id) for c in plan.starts]
            guess = expected_runs(backlog, np.array([self.row[i] for i in started]))
            for i, run_for in zip(started, guess.tolist(), strict=True):
                self.begin(planner, i, now, float(run_for))
        if self.mode == CENTRAL:
            planner.buckets.update(plan.buckets)
            if plan.wake_in is not None:
                self.push(now + plan.wake_in + _WAKE_SLACK, _REPLAN, self.planners.index(planner))
        else:
            site = planner.sites[0]
            for c in plan.starts:
                if c.kind in self.tokens[site]:
                    self.tokens[site][c.kind] -= 1
                    assert self.tokens[site][c.kind] >= 0, f"{site} spent a token it did not hold"
        self.top_up(planner, now)

    def _limits(self, planner: _Planner, view: CapacityView, now: float) -> None:
        """Global rates as the planner's token buckets: the centre's own bucket, or the tokens
        an agent holds (a bucket that does not refill within the pass)."""
        if self.mode == CENTRAL:
            view.kind_limits = {
                kind: KindLimits(limit.per_second, limit.burst)
                for kind, limit in self.options.rates.items()
            }
            view.buckets = {
                f"kind:{kind}": planner.buckets.get(f"kind:{kind}", Bucket(limit.burst, 0.0))
                for kind, limit in self.options.rates.items()
            }
            return
        site = planner.sites[0]
        held = {kind: self.valid_tokens(site, kind, now) for kind in self.options.rates}
        view.kind_limits = {kind: KindLimits(1.0, float(n)) for kind, n in held.items()}
        view.buckets = {f"kind:{kind}": Bucket(float(n), now) for kind, n in held.items()}

    def _offer(
        self,
        planner: _Planner,
        view: CapacityView,
        tasks: list[int],
        order: np.ndarray,
        ranks: np.ndarray,
        expected: np.ndarray | None,
    ) -> Iterator[Candidate]:
        """The ranked tasks, best first, as the planner's candidates. Tasks whose site pool is
        full are not offered (the planner would skip them) unless reservations need them; in
        central mode, nor are tasks that would take a shared pool over its units anywhere."""
        shared = self.options.pools if self.mode == CENTRAL else {}
        sites = planner.sites
        for n, k in enumerate(order.tolist()):
            i = tasks[k]
            site_pool, units = self.site_pool[i], self.units[i]
            cap = view.pool_capacity.get(site_pool)
            if (
                not self.reserve
                and cap is not None
                and view.pool_used.get(site_pool, 0) + units > cap
            ):
                continue
            total = shared.get(self.pool[i])
            if total is not None:
                in_use = sum(view.pool_used.get(f"{self.pool[i]}@{s}", 0) for s in sites)
                if in_use + units > total:
                    continue
            yield Candidate(
                str(i),
                self.tasks[i].kind,
                site_pool,
                units,
                None,
                f"sim:{self.tasks[i].kind}",
                float(ranks[k]),
                None if expected is None else float(expected[n]),
            )

    def begin(self, planner: _Planner, i: int, now: float, run_for: float) -> None:
        site, site_pool, units = self.site_of[i], self.site_pool[i], self.units[i]
        del planner.waiting[site_pool][i]
        planner.used[site_pool] = planner.used.get(site_pool, 0) + units
        planner.end_sum[site_pool] = planner.end_sum.get(site_pool, 0.0) + units * (now + run_for)
        planner.running.setdefault(site_pool, {})[i] = now + run_for
        self.site_used[site_pool] = self.site_used.get(site_pool, 0) + units
        cap = self.cap.get(site_pool)
        assert cap is None or self.site_used[site_pool] <= cap, f"{site_pool} over capacity"
        if self.mode == AGENTS and self.pool[i] in self.pool_books:
            held = self.valid_units(site, self.pool[i], now)
            assert self.site_used[site_pool] <= held, f"{site} used units it did not hold"
        if math.isnan(self.start[i]):
            self.start[i] = now
        self.attempt_of[i] = len(self.attempts)
        self.attempts.append(_Attempt(i, site, now))
        self.recent[site].append((now, self.tasks[i].kind))
        self.last_progress = now
        self.push(now + self.tasks[i].duration, _DONE, self.attempt_of[i])

    # --- leases (agents) -----------------------------------------------------------------

    def valid_tokens(self, site: str, kind: str, now: float) -> int:
        return self.tokens[site][kind] if now < self.tokens_expire[site][kind] else 0

    def valid_units(self, site: str, pool: str, now: float) -> int:
        return self.held[site][pool] if now < self.held_expire[site][pool] else 0

    def _rate_need(self, site: str, kind: str) -> int:
        """Tasks of `kind` waiting at the site that its pools have room for now."""
        planner = self.planner_of[site]
        need = 0
        for site_pool, waiting in planner.waiting.items():
            cap = self.cap.get(site_pool)
            room = len(waiting) if cap is None else cap - self.site_used.get(site_pool, 0)
            need += min(max(0, room), sum(1 for i in waiting if self.tasks[i].kind == kind))
        return need

    def _pool_need(self, site: str, pool: str) -> int:
        """Units of `pool` the site could use now: in use plus what waits, up to capacity."""
        site_pool = f"{pool}@{site}"
        in_use = self.site_used.get(site_pool, 0)
        waiting = sum(self.units[i] for i in self.planner_of[site].waiting.get(site_pool, {}))
        cap = self.cap.get(site_pool)
        return in_use + (waiting if cap is None else min(max(0, cap - in_use), waiting))

    def _renewed(
        self, site: str, now: float, *, kind: str | None = None, pool: str | None = None
    ) -> None:
        """The site's lease on `kind`'s tokens or `pool`'s units now runs to now + ttl, as the
        centre's does."""
        if kind is not None:
            self.tokens_expire[site][kind] = now + self.options.lease_ttl
        if pool is not None:
            self.held_expire[site][pool] = now + self.options.lease_ttl
        if self.expire_due[site] is None:
            self._next_expiry(site, now)

    def _next_expiry(self, site: str, now: float) -> None:
        """One pending expiry event per site, at its earliest lease expiry still to come."""
        times = [t for t in self.tokens_expire[site].values() if t > now]
        times += [t for t in self.held_expire[site].values() if t > now]
        self.expire_due[site] = min(times) if times else None
        if times:
            self.push(min(times), _EXPIRE, self.layout.sites.index(site))

    def top_up(self, planner: _Planner, now: float) -> None:
        """An agent with its link up asks the centre for what it lacks now, and returns the
        shared units it has no use for."""
        if self.mode != AGENTS:
            return
        site = planner.sites[0]
        if not self.links.up(site, now):
            return
        ttl = self.options.lease_ttl
        again = False
        for kind, book in self.rate_books.items():
            held = self.valid_tokens(site, kind, now)
            want = self._rate_need(site, kind) - held
            if want <= 0:
                continue
            got = book.lend(site, want, now, ttl)
            self.tokens[site][kind] = held + got
            self._renewed(site, now, kind=kind)
            again = again or got > 0
            if got < want:
                at = book.next_token_at(now)
                if at is not None and at > now:
                    self.push(at, _REPLAN, self.planners.index(planner))
        for pool, pool_book in self.pool_books.items():
            held = self.valid_units(site, pool, now)
            need = self._pool_need(site, pool)
            if need > held:
                got = pool_book.lend(site, need - held, now, ttl)
                self.held[site][pool] = held + got
                self._renewed(site, now, pool=pool)
                again = again or got > 0
            elif need < held:
                pool_book.keep(site, need, now)
                self.held[site][pool] = need
                for other in self.planners:
                    if other is not planner and other.waiting.get(f"{pool}@{other.name}"):
                        self.push(now, _REPLAN, self.planners.index(other))
        if again:
            self.push(now, _REPLAN, self.planners.index(planner))

    def lease_round(self, now: float) -> None:
        """Every linked site renews: returns its unspent tokens and receives a share by demand
        (what waits there now plus what it started in the last `lease_ttl`: what it may need
        before its lease runs out, and what it can keep working with if its link drops)."""
        linked = [s for s in self.layout.sites if self.links.up(s, now)]
        ttl, period = self.options.lease_ttl, self.options.lease_period
        for site in linked:
            recent = self.recent[site]
            while recent and recent[0][0] <= now - ttl:
                recent.popleft()
        for kind, book in self.rate_books.items():
            for site in linked:
                book.give_back(site, self.valid_tokens(site, kind, now), now)
                self.tokens[site][kind] = 0
            demands = {
                site: self._rate_need(site, kind)
                + sum(1 for _, k in self.recent[site] if k == kind)
                for site in linked
            }
            book.advance(now)
            shares = water_fill(math.floor(book.available + 1e-9), demands)
            for site in linked:
                self.tokens[site][kind] = book.lend(site, shares[site], now, ttl)
                self._renewed(site, now, kind=kind)
        for pool, pool_book in self.pool_books.items():
            for site in linked:
                held = min(self.valid_units(site, pool, now), self._pool_need(site, pool))
                pool_book.keep(site, held, now)
                self.held[site][pool] = held
            wants = {s: self._pool_need(s, pool) - self.held[s][pool] for s in linked}
            shares = water_fill(pool_book.free(now), wants)
            for site in linked:
                self.held[site][pool] += pool_book.lend(site, shares[site], now, ttl)
                self._renewed(site, now, pool=pool)
        for site in linked:
            self.planner_of[site].dirty = True
        others_due = any(e[2] not in (_ROUND, _EXPIRE, _REPLAN) for e in self.events)
        waiting = any(w for p in self.planners for w in p.waiting.values())
        if self.finished < len(self.tasks) and (
            others_due or (waiting and now - self.last_progress < _IDLE_ROUNDS)
        ):
            self.push(now + period, _ROUND, -1)

    def expire(self, site: str, now: float) -> None:
        """The site's lease has run out unrenewed: its tokens are void, and the work it runs on
        shared-pool units stops (fencing) and waits to start again."""
        planner = self.planner_of[site]
        for kind in self.rate_books:
            if self.tokens_expire[site][kind] <= now:
                self.tokens[site][kind] = 0
        for pool in self.pool_books:
            if self.held_expire[site][pool] > now:
                continue
            self.held[site][pool] = 0
            site_pool = f"{pool}@{site}"
            for i in list(planner.running.get(site_pool, {})):
                attempt = self.attempts[self.attempt_of[i]]
                attempt.fenced = True
                attempt.end = now
                self.fenced += 1
                self.site_used[site_pool] -= self.units[i]
                self._stopped(planner, i)
                self.ready(i)


def run_mode(
    tasks: Sequence[WorkloadTask],
    sites: Layout,
    policy: Policy,
    options: AgentsOptions,
    mode: str,
    *,
    history: Sequence[WorkloadTask] = (),
) -> ModeResult:
    """Simulate `tasks` at their sites, decided centrally or by an agent per site."""
    if mode not in (CENTRAL, AGENTS):
        raise InvalidInput(f"no mode {mode!r}; choose {CENTRAL} or {AGENTS}")
    for outage in options.outages:
        if outage.site not in sites.sites:
            raise InvalidInput(f"outage at unknown site {outage.site!r}")
    return _World(tasks, sites, policy, history, options, mode).run()
