"""The composition root: `Tactician` wires settings, the store, kinds, workers and the planner."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import math
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from tactician.clock import SYSTEM_CLOCK
from tactician.decide.decision import Decision, Tier
from tactician.decide.service import DecidePolicy, MergeRule, decide, pending_reason
from tactician.decide.shares import FairShare
from tactician.domain import ExecutorKind, KindSpec, NewTask, RateLimit, RetryPolicy, Task
from tactician.errors import InvalidInput, TacticianError, UnknownKind
from tactician.govern.policy import SERVED_MODELS, limited
from tactician.govern.roles import SYSTEM, Actor, Operation
from tactician.observe import traces
from tactician.run.advisor import AdvisorConfig, BackgroundAdvisor, LLMAdvisor
from tactician.run.drift import DriftWatch
from tactician.run.escalation import Escalator
from tactician.run.executors import Handler
from tactician.run.gate import DEFAULT_POLICY, Gate, GateHook
from tactician.run.merging import Merger
from tactician.run.notify import NOTIFY_KIND, notify, notify_kind
from tactician.run.planner import PlannerService
from tactician.run.ranking import LiveRanker, make_scorer
from tactician.run.refit import ModelWatch, Refitter
from tactician.run.supervise import STOP_WAIT_S, Supervisor
from tactician.run.worker import Worker, WorkerOptions
from tactician.settings import Settings
from tactician.store.base import SqlStore
from tactician.store.open import open_store, open_store_waiting
from tactician.store.protocol import TaskFilter
from tactician.store.registry import ModelRegistry

F = TypeVar("F", bound=Callable[..., Any])
When = float | dt.datetime | dt.timedelta | None
log = logging.getLogger("tactician")


class Tactician:
    """One application: its task kinds, pools, and the database they live in."""

    def __init__(self, db: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env(db=db)
        self.kinds: dict[str, KindSpec] = {}
        self.handlers: dict[str, Handler] = {}
        self.pool_capacity: dict[str, int | None] = {}
        self.merge_rules: list[MergeRule] = []
        self.leased_kinds: set[str] = set()
        """Kinds whose rate the centre lends as tokens (an edge agent's): the bundle's rate
        for them is global, not this process's."""
        self._store: SqlStore | None = None
        self._gate: Gate | None = None
        # The engine's own notifications (approval escalations, alerts) are tasks like any
        # other, so every app's workers can deliver them.
        self.kinds[NOTIFY_KIND] = notify_kind()
        self.handlers[NOTIFY_KIND] = notify

    # --- declaring work --------------------------------------------------------------------

    def task(
        self,
        fn: F | None = None,
        *,
        name: str | None = None,
        **options: Any,
    ) -> Any:
        """Register a Python handler (sync or async) as a task kind.

        Options: pool, units, retries, timeout, concurrency_key, rate, burst, backoff,
        max_backoff, max_concurrency, breaker_threshold, breaker_cooldown.
        """

        def register(handler: F) -> F:
            kind_name = name or handler.__name__
            self._add_kind(kind_name, "python", options)
            self.handlers[kind_name] = handler
            return handler

        return register(fn) if fn is not None else register

    def http_task(self, name: str, url: str, **options: Any) -> KindSpec:
        """A kind whose attempts POST the payload as JSON to `url` (2xx is success)."""
        options.setdefault("max_concurrency", 32)
        return self._add_kind(name, "http", {**options, "url": url})

    def shell_task(self, name: str, command: Sequence[str], **options: Any) -> KindSpec:
        """A kind whose attempts run `command` with the payload on stdin (exit 0 is success)."""
        return self._add_kind(name, "shell", {**options, "command": tuple(command)})

    def pool(self, name: str, capacity: int | None) -> None:
        """Declare a pool's capacity in units (None: unbounded)."""
        if capacity is not None and capacity < 0:
            raise InvalidInput(f"pool {name}: capacity must be >= 0")
        self.pool_capacity[name] = capacity
        if self._store is not None:
            self._store.set_pool(name, capacity)

    def merge(self, kind: str, key: str, window_s: float) -> None:
        """Fold tasks of `kind` whose `key` template (e.g. "{kind}/{features.fingerprint}",
        features being the payload's top-level values) matches that of a waiting task submitted
        at most `window_s` earlier: they become that one task, carrying all their payloads."""
        if not (window_s > 0 and math.isfinite(window_s)):
            raise InvalidInput(f"merge window for {kind} must be a positive number of seconds")
        rule = MergeRule(kind, key, window_s)
        with contextlib.suppress(KeyError):  # a feature an empty payload lacks is fine
            rule.key_of(kind, None, {})  # an unknown template field fails here, not later
        self.merge_rules.append(rule)

    def _add_kind(self, name: str, executor: ExecutorKind, options: Mapping[str, Any]) -> KindSpec:
        options = dict(options)
        retries = int(options.pop("retries", 3))
        if retries < 0:
            raise InvalidInput(f"kind {name}: retries must be >= 0")
        retry = RetryPolicy(
            max_attempts=retries + 1,
            initial_delay=float(options.pop("backoff", 1.0)),
            max_delay=float(options.pop("max_backoff", 300.0)),
        )
        rate_text = options.pop("rate", None)
        burst = options.pop("burst", None)
        rate = RateLimit.parse(rate_text, burst) if rate_text else None
        unknown = set(options) - _KIND_OPTIONS
        if unknown:
            raise InvalidInput(f"kind {name}: unknown option {sorted(unknown)[0]!r}")
        spec = KindSpec(name=name, executor=executor, retry=retry, rate=rate, **options)
        self.kinds[name] = spec
        if self._store is not None:
            self._store.register_kinds([spec])
        return spec

    # --- the store ---------------------------------------------------------------------------

    @property
    def store(self) -> SqlStore:
        if self._store is None:
            self._store = self._prepared(open_store(self.settings.db, self.settings))
        return self._store

    def _prepared(self, store: SqlStore) -> SqlStore:
        if self.kinds:
            store.register_kinds(list(self.kinds.values()))
        for pool, capacity in self.pool_capacity.items():
            store.set_pool(pool, capacity)
        return store

    def _reach_store(self, stop: threading.Event) -> bool:
        """Open the store for a service, waiting for a database that is not up yet; False if
        told to stop meanwhile."""
        if self._store is None:
            store = open_store_waiting(self.settings.db, self.settings, stop.is_set)
            if store is None:
                return False
            self._store = self._prepared(store)
        return True

    @property
    def gate(self) -> Gate:
        """Roles, approvals, the live policy bundle, tokens (every mutation goes through it)."""
        if self._gate is None:
            self._gate = Gate(self.store)
        return self._gate

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        self._gate = None

    def user_kinds(self) -> list[str]:
        """The kinds this app declared (the engine's own notification kind left out)."""
        return [name for name in self.kinds if name != NOTIFY_KIND]

    def known_kinds(self) -> Mapping[str, KindSpec]:
        """This app's kinds, and those other apps registered in the database, under the live
        bundle's limits."""
        return self.with_limits({**self.store.kinds(), **self.kinds})

    def with_limits(self, kinds: Mapping[str, KindSpec]) -> Mapping[str, KindSpec]:
        """`kinds` with the live bundle's `limits` over what their code declared."""
        return limited(kinds, self.gate.policy().bundle.limits, self.leased_kinds)

    # --- submitting ----------------------------------------------------------------------------

    def submit(
        self,
        kind: str,
        payload: Mapping[str, Any] | None = None,
        *,
        due_at: When = None,
        release_at: When = None,
        weight: float = 1.0,
        estimate: float | None = None,
        idempotency_key: str | None = None,
        depends_on: Iterable[str] = (),
        tenant: str = "default",
        tags: Iterable[str] = (),
        source: str = "api",
    ) -> str:
        """Commit one task and return its id (the existing id for a known idempotency key)."""
        task = NewTask(
            kind=kind,
            payload=dict(payload or {}),
            due_at=self._at(due_at),
            release_at=self._at(release_at),
            weight=weight,
            estimate=estimate,
            idempotency_key=idempotency_key,
            depends_on=tuple(depends_on),
            tenant=tenant,
            tags=tuple(tags),
            source=source,
        )
        return self.submit_many([task])[0]

    def _at(self, when: When) -> float | None:
        """Epoch seconds from a number, an aware datetime, or a delay from the database's now."""
        if when is None or isinstance(when, int | float):
            return None if when is None else float(when)
        if isinstance(when, dt.timedelta):
            return self.store.db_now() + when.total_seconds()
        if isinstance(when, dt.datetime):
            if when.tzinfo is None:
                raise InvalidInput("datetimes must carry a time zone")
            return when.timestamp()
        raise InvalidInput(f"not a time: {when!r}")

    def submit_many(self, tasks: Sequence[NewTask], actor: Actor | None = None) -> list[str]:
        """Commit all tasks in one transaction, or none of them. Tasks that an approval rule
        of the live policy matches wait for approval. With an `actor` (CLI, API), the actor's
        role is checked first; without one, the caller is this process (trusted code)."""
        if traces.enabled():
            tasks = traces.continued(tasks)
        with traces.span("gate", {"tactician.tasks": len(tasks)}):
            if actor is not None:
                self.gate.authorize(actor, Operation.SUBMIT, tasks[0].kind if tasks else "-")
                if any(t.kind == NOTIFY_KIND for t in tasks):
                    raise InvalidInput(
                        f"{NOTIFY_KIND} tasks are the engine's own: notifications go to the "
                        "policy bundle's channels"
                    )
            mine = all(t.kind in self.kinds for t in tasks)
            kinds = self.with_limits(self.kinds) if mine else self.known_kinds()
            unknown = sorted({t.kind for t in tasks} - set(kinds))
            if unknown:
                raise UnknownKind(f"unknown kind {unknown[0]!r}")
            who = actor or SYSTEM
            approvals = self.gate.approvals_for(tasks, who)
        return self.store.submit(tasks, kinds, actor=who, approvals=approvals)

    def get(self, task_id: str) -> Task:
        return self.store.get(task_id)

    def tasks(self, query: TaskFilter | None = None) -> list[Task]:
        return self.store.list_tasks(query or TaskFilter())

    def cancel(self, task_id: str) -> Task:
        return self.store.cancel(task_id)

    def retry(self, task_id: str) -> Task:
        return self.store.retry(task_id)

    # --- running -------------------------------------------------------------------------------

    def worker(self, options: WorkerOptions | None = None) -> Worker:
        """A worker for this app's kinds and the engine's own notifications."""
        traces.configure(self.settings)
        return Worker(
            self.store,
            self.kinds,
            self.handlers,
            options or WorkerOptions(),
            self.settings.lease_seconds,
        )

    def planner(self) -> PlannerService:
        from tactician.run.schedules import ScheduleService

        self.store  # noqa: B018 (registers kinds and pools before the first tick)
        traces.configure(self.settings)
        ranker = self.ranker()
        hooks: list[Callable[[float], int]] = [
            ScheduleService(self.store, self).fire_due,
            ranker.refresh,
        ]
        gate_hook = GateHook(self.gate, ranker)
        gate_hook.follow(self.gate.policy())  # the live bundle from the first pass on
        hooks += [gate_hook, DriftWatch(self.gate, ranker)]
        escalator = self.escalator(ranker)
        if escalator is not None:
            hooks.append(escalator)
        if self.merge_rules:
            hooks.append(Merger(self.store, ranker, tuple(self.merge_rules)))
        registry = ModelRegistry(self.settings.models_dir)
        hooks.append(ModelWatch(ranker, lambda: self.served_models(registry), registry.load))
        if self.settings.refit_every > 0:
            hooks.append(
                Refitter(
                    self.store,
                    ranker,
                    registry,
                    self.settings.refit_every,
                    pinned=lambda: SERVED_MODELS in self.gate.policy().bundle.models,
                )
            )
        return PlannerService(
            self.store, self.settings, ranker=ranker, hooks=tuple(hooks), limits=self.with_limits
        )

    def escalator(self, ranker: LiveRanker) -> Escalator | None:
        """Tier 2 when an advisor is configured (TACTICIAN_LLM_BASE_URL and _MODEL)."""
        if not os.environ.get("TACTICIAN_LLM_BASE_URL"):
            return None
        advisor = BackgroundAdvisor(LLMAdvisor(AdvisorConfig.from_env(os.environ), SYSTEM_CLOCK))
        return Escalator(self.store, ranker, advisor, self.decide_policy)

    def decide_policy(self) -> DecidePolicy:
        """The live bundle's decision thresholds (settings' confidence threshold until a bundle
        is deployed)."""
        policy = self.gate.policy()
        threshold = policy.bundle.thresholds.confidence
        if policy is DEFAULT_POLICY:
            threshold = self.settings.confidence_threshold
        return DecidePolicy(version=policy.version, confidence_threshold=threshold)

    def served_models(self, registry: ModelRegistry) -> str | None:
        """The model version the decision service serves: the live policy's pin (`models:
        {default: …}`), else the registry's active set (None: none promoted)."""
        pin = self.gate.policy().bundle.models.get(SERVED_MODELS)
        return registry.active_version() if pin is None else registry.resolve(pin)

    def ranker(self) -> LiveRanker:
        """The decision service's scorer (settings.scorer) with the models it serves
        (`served_models`); without them (none promoted, or unreadable: logged) the scorer
        works from estimates and each kind's recorded durations."""
        registry = ModelRegistry(self.settings.models_dir)
        try:
            version = self.served_models(registry)
            models = None if version is None else registry.load(version)
        except TacticianError as exc:
            log.error("decision models unavailable, ranking without them: %s", exc)
            models = None
        return LiveRanker(make_scorer(self.settings.scorer, models), models, self.store)

    def decisions(
        self, now: float | None = None, explain: Sequence[str] = ()
    ) -> tuple[list[Decision], dict[str, str], str]:
        """The decision service's advice for every waiting task under the live policy and the
        active models, operators' overrides shown; why each task waits; the scorer's name.
        Tasks in `explain` carry their scorer's factors as reasons."""
        from tactician.plan.capacity import CapacityView

        policy = self.gate.policy()
        ranker = self.ranker()
        GateHook(self.gate, ranker).follow(policy)
        fallback = self.store.fallback()
        if fallback is not None:
            spec = policy.bundle.drift
            ranker.use_fallback(fallback.signal, make_scorer(spec.scorer, None))
        waiting = self.store.waiting(self.settings.plan_batch)
        usage = self.store.pools()
        view = CapacityView(
            pool_capacity={u.pool.name: u.pool.capacity for u in usage},
            pool_used={u.pool.name: u.used for u in usage},
        )
        now = self.store.db_now() if now is None else now
        scorer = ranker.scorer
        if ranker.fair is not None:  # the planner's shift, from the tenants' recent usage
            ranker.refresh(now)
            book = ranker.fair
            scorer = FairShare(scorer, book.shares, weight=book.weight, book=book)
        snapshot, rows = ranker.snapshot(waiting, view, now)
        decisions = decide(
            snapshot,
            scorer,
            self.decide_policy(),
            model_version=ranker.model_version,
            explain=[rows[t] for t in explain if t in rows],
        )
        overrides = {o.task_id: o for o in self.store.overrides()}
        shown = []
        for d in decisions:
            o = overrides.get(d.task_id)
            if o is not None and (o.expires_at is None or o.expires_at > now):
                what = "run now" if o.what == "run_now" else f"score pinned at {o.value:g}"
                d = d.evolve(tier=Tier.HUMAN, note=f"overridden by {o.actor}: {what} ({o.reason})")
            shown.append(d)
        reasons = {d.task_id: pending_reason(snapshot, rows[d.task_id], d) for d in shown}
        return shown, reasons, ranker.scorer.name

    def run_worker(self, options: WorkerOptions | None = None) -> None:
        """Run a worker in this process until SIGTERM or SIGINT."""
        stop = _stop_on_signals()
        try:
            if self._reach_store(stop):
                self.worker(options).run(stop.is_set)
        finally:
            traces.flush()  # a forked worker ends without atexit handlers

    def run_planner(self) -> None:
        stop = _stop_on_signals()
        try:
            if self._reach_store(stop):
                self.planner().run(stop.is_set)
        finally:
            traces.flush()

    def serve(
        self,
        workers: int = 2,
        options: WorkerOptions | None = None,
        services: Sequence[tuple[str, Callable[[], None]]] = (),
    ) -> None:
        """A planner in this process; `workers` worker processes and a process for each of
        `services` (name, what it runs: bus ingestion), kept running by a supervisor process
        (`run.supervise`); until SIGTERM/SIGINT."""
        if workers and not self.user_kinds():
            raise InvalidInput(
                "serve needs an app with task kinds (--app module:app) for its "
                "workers, or --workers 0 for a planner only"
            )
        # Migrate and register before the children start (waiting for the database).
        if not self._reach_store(_stop_on_signals()):
            return
        for sig in (signal.SIGTERM, signal.SIGINT):  # until each process sets its own
            signal.signal(sig, signal.SIG_DFL)
        self.close()  # the supervisor forks with no connection to inherit
        children: list[tuple[str, Callable[[], None]]] = [
            (f"worker-{i}", functools.partial(_child_worker, self, options)) for i in range(workers)
        ]
        children += services
        supervisor = None
        if children:
            ctx = multiprocessing.get_context("fork")
            supervisor = ctx.Process(target=Supervisor(children).run, name="supervisor")
            supervisor.start()
        try:
            self.run_planner()
        finally:
            if supervisor is not None:
                supervisor.terminate()  # it stops its children, then itself
                supervisor.join(STOP_WAIT_S + 10)


_KIND_OPTIONS = {
    "pool",
    "units",
    "timeout",
    "concurrency_key",
    "url",
    "command",
    "max_concurrency",
    "breaker_threshold",
    "breaker_cooldown",
}


def _child_worker(app: Tactician, options: WorkerOptions | None) -> None:
    app._store = None  # a fresh connection in this process
    app.run_worker(options)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    return stop
