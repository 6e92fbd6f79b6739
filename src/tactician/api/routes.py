"""The API's endpoints: tasks, decisions, approvals, overrides, pools, policies, models, audit,
tokens. Each mutation checks the actor's role through the gate before it changes anything."""

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from tactician.app import Tactician
from tactician.domain import NewTask, Task
from tactician.errors import InvalidInput
from tactician.govern.audit import verify
from tactician.govern.roles import SITE_NAME, Actor, Operation, parse_role
from tactician.ingest.cloudevents_in import trace_carrier
from tactician.ingest.intake import Format, Intake, parse_secrets
from tactician.observe import traces
from tactician.observe.drift import DRIFT_ACTIONS
from tactician.observe.metrics import CONTENT_TYPE, metrics_text
from tactician.store.protocol import TaskFilter

AppDep = Callable[[], Iterator[Tactician]]
ActorDep = Callable[..., Actor]
Json = dict[str, Any]


class ErrorOut(BaseModel):
    code: str
    message: str


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskIn(_In):
    kind: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)
    due_at: float | None = Field(default=None, allow_inf_nan=False)
    release_at: float | None = Field(default=None, allow_inf_nan=False)
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    estimate: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    idempotency_key: str | None = Field(default=None, max_length=500)
    depends_on: list[str] = Field(default_factory=list, max_length=1000)
    tenant: str = Field(default="default", min_length=1, max_length=200)
    tags: list[str] = Field(default_factory=list, max_length=100)


class Reason(_In):
    reason: str = Field(default="", max_length=2000)


class Reprioritize(_In):
    weight: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    due_at: float | None = Field(default=None, allow_inf_nan=False)
    clear_due: bool = False
    reason: str = Field(default="", max_length=2000)


class Vote(_In):
    reason: str = Field(min_length=1, max_length=2000)
    edits: dict[str, Any] = Field(default_factory=dict)


class OverrideIn(_In):
    what: Literal["pin", "run_now"]
    score: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    reason: str = Field(min_length=1, max_length=2000)
    expires_at: float | None = Field(default=None, allow_inf_nan=False)


class HoldIn(_In):
    reason: str = Field(min_length=1, max_length=2000)
    until: float | None = Field(default=None, allow_inf_nan=False)


class PoolIn(_In):
    capacity: int | None = Field(default=None, ge=0)


class PolicyIn(_In):
    text: str = Field(min_length=1, max_length=1_000_000)
    filename: str = Field(default="policy.yaml", min_length=1, max_length=200)
    slot: Literal["live", "shadow", "experiment"] = "live"
    share: float | None = Field(default=None, gt=0, lt=1)
    split_by: Literal["task", "tenant"] | None = None
    reason: str | None = Field(default=None, max_length=2000)


class ScheduleIn(_In):
    kind: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)
    cron: str | None = Field(default=None, max_length=200)
    every: str | None = Field(default=None, max_length=50)
    """An interval such as "30s", "5m", "1h30m"."""
    timezone: str = Field(default="UTC", max_length=100)
    jitter: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    overlap: Literal["skip", "buffer_one", "allow_all", "cancel_running"] = "skip"
    catchup_window: float = Field(default=60.0, ge=0, allow_inf_nan=False)
    paused: bool = False


class TokenIn(_In):
    name: str = Field(min_length=1, max_length=100)
    role: Literal["viewer", "operator", "approver", "admin"]
    groups: list[str] = Field(default_factory=list, max_length=50)
    site: str | None = Field(default=None, pattern=f"^{SITE_NAME.pattern}$")
    """An edge site's token: it acts only as that site's agent."""


class Page(BaseModel):
    items: list[Json]
    next: str | None = None
    """Pass as `after` for the next page; null on the last one."""


def task_json(task: Task) -> Json:
    data = asdict(task)
    data["state"] = task.state.value
    data.pop("last_traceback", None)
    return data


def _plain(value: Any) -> Any:
    """Dataclasses as JSON objects, NaN (an empty arm's KPI) as null, all the way down."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


async def _raw_body(request: Request) -> bytes:
    return await request.body()


def build(current_app: AppDep, actor_of: ActorDep) -> APIRouter:
    router = APIRouter()
    App = Annotated[Tactician, Depends(current_app)]
    Who = Annotated[Actor, Depends(actor_of)]

    def allowed(app: Tactician, actor: Actor, operation: Operation, subject: str) -> None:
        app.gate.authorize(actor, operation, subject)

    @router.get("/healthz", tags=["health"], response_model=Json)
    def healthz() -> Json:
        """The process is up."""
        return {"status": "ok"}

    @router.get("/metrics", tags=["health"], include_in_schema=False)
    def metrics(app: App) -> Response:
        """Prometheus exposition, read from the database at each scrape."""
        return Response(metrics_text(app.store), media_type=CONTENT_TYPE)

    @router.get("/readyz", tags=["health"], response_model=Json)
    def readyz(app: App) -> Json:
        """The database answers."""
        return {"status": "ok", "db_time": app.store.db_now()}

    # --- tasks -------------------------------------------------------------------------------

    @router.get("/tasks", tags=["tasks"], response_model=Page)
    def list_tasks(
        app: App,
        _: Who,
        state: str | None = None,
        kind: str | None = None,
        source: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: str | None = None,
    ) -> Page:
        tasks = app.tasks(
            TaskFilter(state=state, kind=kind, source=source, limit=limit, after_id=after)
        )
        next_after = tasks[-1].id if len(tasks) == limit else None
        return Page(items=[task_json(t) for t in tasks], next=next_after)

    @router.post("/tasks", tags=["tasks"], status_code=201, response_model=Json)
    def submit(app: App, actor: Who, body: TaskIn, request: Request) -> Json:
        """A task; a W3C `traceparent` header makes its run part of the caller's trace."""
        incoming = traces.carrier(request.headers)
        with traces.ingest_span(incoming, {"tactician.source": "api"}) as trace_context:
            return _submit(app, actor, body, trace_context)

    def _submit(app: Tactician, actor: Actor, body: TaskIn, trace_context: str | None) -> Json:
        task = NewTask(
            kind=body.kind,
            payload=body.payload,
            due_at=body.due_at,
            release_at=body.release_at,
            weight=body.weight,
            estimate=body.estimate,
            idempotency_key=body.idempotency_key,
            depends_on=tuple(body.depends_on),
            tenant=body.tenant,
            tags=tuple(body.tags),
            source="api",
            trace_context=trace_context,
        )
        (task_id,) = app.submit_many([task], actor=actor)
        return {"id": task_id, "state": app.get(task_id).state.value}

    @router.get("/tasks/{task_id}", tags=["tasks"], response_model=Json)
    def get_task(app: App, _: Who, task_id: str) -> Json:
        task = app.get(task_id)
        attempts = [asdict(a) for a in app.store.attempts(task_id)]
        return {**task_json(task), "attempts": attempts}

    @router.get("/tasks/{task_id}/why", tags=["decisions"], response_model=Json)
    def why(app: App, _: Who, task_id: str) -> Json:
        """The task's current decision: action, score, confidence, reasons, versions."""
        task = app.get(task_id)
        if task.state.value not in ("pending", "ready", "retry_wait", "leased"):
            return {"id": task_id, "state": task.state.value, "decision": None}
        decisions, reasons, scorer = app.decisions(explain=[task_id])
        decision = next((d for d in decisions if d.task_id == task_id), None)
        if decision is None:
            return {"id": task_id, "state": task.state.value, "decision": None}
        body = asdict(decision)
        body["action"] = decision.action.value
        body["tier"] = int(decision.tier)
        return {
            "id": task_id,
            "state": task.state.value,
            "pending_reason": reasons[task_id],
            "scorer": scorer,
            "why": decision.why(),
            "decision": body,
        }

    @router.post("/tasks/{task_id}/cancel", tags=["tasks"], response_model=Json)
    def cancel(app: App, actor: Who, task_id: str, body: Reason) -> Json:
        allowed(app, actor, Operation.CANCEL, task_id)
        return task_json(app.store.cancel(task_id, actor, body.reason))

    @router.post("/tasks/{task_id}/retry", tags=["tasks"], response_model=Json)
    def retry(app: App, actor: Who, task_id: str) -> Json:
        allowed(app, actor, Operation.RETRY, task_id)
        return task_json(app.store.retry(task_id, actor))

    @router.post("/tasks/{task_id}/reprioritize", tags=["tasks"], response_model=Json)
    def reprioritize(app: App, actor: Who, task_id: str, body: Reprioritize) -> Json:
        allowed(app, actor, Operation.REPRIORITIZE, task_id)
        task = app.store.reprioritize(
            task_id,
            weight=body.weight,
            due_at=body.due_at,
            clear_due=body.clear_due,
            actor=actor,
            reason=body.reason,
        )
        return task_json(task)

    # --- approvals ---------------------------------------------------------------------------

    @router.get("/approvals", tags=["approvals"], response_model=list[Json])
    def approvals(
        app: App,
        _: Who,
        state: Literal["pending", "approved", "rejected", "withdrawn", "all"] = "pending",
    ) -> list[Json]:
        rows = app.store.approvals(None if state == "all" else state)
        return [
            {
                "task_id": r.task_id,
                "rule": r.rule.name,
                "state": r.state,
                "requested_by": r.requested_by,
                "requested_at": r.requested_at,
                "expires_at": r.expires_at,
                "tally": r.tally().text(),
                "editable": list(r.rule.editable),
                "votes": [asdict(v) for v in r.votes],
            }
            for r in rows
        ]

    def vote(app: Tactician, actor: Actor, task_id: str, verdict: str, body: Vote) -> Json:
        row = app.gate.vote(actor, task_id, verdict, body.reason, body.edits)
        return {"task_id": task_id, "state": row.state, "tally": row.tally().text()}

    @router.post("/approvals/{task_id}/approve", tags=["approvals"], response_model=Json)
    def approve(app: App, actor: Who, task_id: str, body: Vote) -> Json:
        return vote(app, actor, task_id, "approve", body)

    @router.post("/approvals/{task_id}/reject", tags=["approvals"], response_model=Json)
    def reject(app: App, actor: Who, task_id: str, body: Vote) -> Json:
        return vote(app, actor, task_id, "reject", body)

    # --- overrides ---------------------------------------------------------------------------

    @router.get("/overrides", tags=["overrides"], response_model=list[Json])
    def overrides(app: App, _: Who) -> list[Json]:
        return [asdict(o) for o in app.store.overrides()]

    @router.post("/tasks/{task_id}/overrides", tags=["overrides"], response_model=Json)
    def set_override(app: App, actor: Who, task_id: str, body: OverrideIn) -> Json:
        allowed(app, actor, Operation.OVERRIDE, task_id)
        if body.what == "pin" and body.score is None:
            raise InvalidInput("a pin needs a score between 0 and 1")
        value = body.score if body.what == "pin" else None
        row = app.store.set_override(task_id, body.what, value, actor, body.reason, body.expires_at)
        return asdict(row)

    @router.delete(
        "/tasks/{task_id}/overrides/{what}",
        tags=["overrides"],
        status_code=204,
        response_class=Response,
    )
    def clear_override(
        app: App, actor: Who, task_id: str, what: Literal["pin", "run_now"], reason: str = ""
    ) -> Response:
        allowed(app, actor, Operation.CLEAR_OVERRIDE, task_id)
        app.store.clear_override(task_id, what, actor, reason)
        return Response(status_code=204)

    @router.post("/tasks/{task_id}/hold", tags=["overrides"], response_model=Json)
    def hold(app: App, actor: Who, task_id: str, body: HoldIn) -> Json:
        allowed(app, actor, Operation.OVERRIDE, task_id)
        return task_json(app.store.hold(task_id, actor, body.reason, body.until))

    @router.post("/tasks/{task_id}/release", tags=["overrides"], response_model=Json)
    def release(app: App, actor: Who, task_id: str, body: HoldIn) -> Json:
        allowed(app, actor, Operation.OVERRIDE, task_id)
        return task_json(app.store.release(task_id, actor, body.reason))

    # --- schedules ---------------------------------------------------------------------------

    @router.get("/schedules", tags=["schedules"], response_model=list[Json])
    def schedules(app: App, _: Who) -> list[Json]:
        return [
            {**row.spec, "paused": row.paused, "last_tick": row.last_tick}
            for row in app.store.schedules()
        ]

    @router.put("/schedules/{name}", tags=["schedules"], response_model=Json)
    def save_schedule(app: App, actor: Who, name: str, body: ScheduleIn) -> Json:
        """Create or replace a schedule: a cron expression or an interval."""
        from tactician.plan.schedules import ScheduleSpec, parse_every
        from tactician.run.schedules import ScheduleService

        allowed(app, actor, Operation.SCHEDULE, name)
        spec = ScheduleSpec(
            name=name,
            kind=body.kind,
            payload=body.payload,
            cron=body.cron,
            every=parse_every(body.every) if body.every else None,
            timezone=body.timezone,
            jitter=body.jitter,
            overlap=body.overlap,
            catchup_window=body.catchup_window,
            paused=body.paused,
        )
        ScheduleService(app.store, app).save(spec)
        app.gate.record(actor, "schedule.saved", name, {"kind": body.kind, "cron": body.cron})
        return {"name": name, "saved": True}

    @router.post("/schedules/{name}/{change}", tags=["schedules"], response_model=Json)
    def change_schedule(
        app: App, actor: Who, name: str, change: Literal["pause", "resume"]
    ) -> Json:
        allowed(app, actor, Operation.SCHEDULE, name)
        app.store.set_schedule_paused(name, change == "pause")
        app.gate.record(actor, f"schedule.{change}d", name)
        return {"name": name, "paused": change == "pause"}

    @router.delete(
        "/schedules/{name}", tags=["schedules"], status_code=204, response_class=Response
    )
    def delete_schedule(app: App, actor: Who, name: str) -> Response:
        allowed(app, actor, Operation.SCHEDULE, name)
        app.store.delete_schedule(name)
        app.gate.record(actor, "schedule.deleted", name)
        return Response(status_code=204)

    # --- pools -------------------------------------------------------------------------------

    @router.get("/pools", tags=["pools"], response_model=list[Json])
    def pools(app: App, _: Who) -> list[Json]:
        return [
            {
                "name": u.pool.name,
                "capacity": u.pool.capacity,
                "used": u.used,
                "ready": u.ready,
                "leased": u.leased,
                "running": u.running,
            }
            for u in app.store.pools()
        ]

    @router.put("/pools/{name}", tags=["pools"], response_model=Json)
    def set_pool(app: App, actor: Who, name: str, body: PoolIn) -> Json:
        allowed(app, actor, Operation.SET_POOL, name)
        app.store.set_pool(name, body.capacity)
        app.gate.record(actor, "pool.set", name, {"capacity": body.capacity})
        return {"name": name, "capacity": body.capacity}

    # --- policies ----------------------------------------------------------------------------

    @router.get("/policies", tags=["policies"], response_model=list[Json])
    def policy_history(
        app: App, _: Who, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[Json]:
        return [asdict(d) for d in app.store.deployments(limit=limit)]

    @router.get("/policies/live", tags=["policies"], response_model=Json)
    def live_policy(app: App, _: Who) -> Json:
        slots = app.gate.slots()
        return {
            slot: {
                "version": d.policy.version,
                "name": d.policy.bundle.name,
                "share": d.deployment.share,
                "split_by": d.deployment.split_by,
            }
            for slot, d in slots.items()
        } or {"live": {"version": "builtin", "name": "builtin", "share": None, "split_by": None}}

    @router.get("/policies/compare", tags=["policies"], response_model=Json)
    def compare(app: App, _: Who, since: float | None = None) -> Json:
        """The experiment's arms (KPIs with 95 % intervals) and the shadow's agreement."""
        report: Json = _plain(app.gate.compare(since))
        return report

    @router.post("/policies", tags=["policies"], status_code=201, response_model=Json)
    def deploy(app: App, actor: Who, body: PolicyIn) -> Json:
        deployment = app.gate.deploy(
            actor,
            body.text,
            body.filename,
            slot=body.slot,
            share=body.share,
            split_by=body.split_by,
            reason=body.reason,
        )
        return asdict(deployment)

    @router.post("/policies/rollback", tags=["policies"], response_model=Json)
    def rollback(app: App, actor: Who, body: Reason) -> Json:
        return asdict(app.gate.rollback(actor, body.reason or None))

    # --- ingestion -----------------------------------------------------------------------------

    def intake(app: Tactician) -> Intake:
        return Intake(
            app.store,
            lambda tasks, actor: app.submit_many(tasks, actor=actor),
            parse_secrets(app.settings.webhook_secrets),
        )

    def ingest(app: Tactician, request: Request, body: bytes, source: str, format: Format) -> Json:
        """Signed sources prove themselves by signature, the others by a bearer token that may
        submit; the event's tasks are committed before the answer. A W3C `traceparent` (the
        request's, or a CloudEvent's own) is the parent of the `ingest` span."""
        headers = dict(request.headers)
        incoming = traces.carrier(headers)
        if format == "cloudevents" and traces.enabled():
            incoming = trace_carrier(headers, body) or incoming
        attributes = {"tactician.source": source, "tactician.format": format}
        with traces.ingest_span(incoming, attributes) as trace_context:
            return _ingest(app, request, headers, body, source, format, trace_context)

    def _ingest(
        app: Tactician,
        request: Request,
        headers: dict[str, str],
        body: bytes,
        source: str,
        format: Format,
        trace_context: str | None,
    ) -> Json:
        taker = intake(app)
        signature = None
        if taker.signed(source):
            signature = taker.check_signature(source, headers, body)
            actor = taker.source_actor(source)
        else:
            actor = actor_of(app, request.headers.get("authorization"))
            app.gate.authorize(actor, Operation.SUBMIT, f"events:{source}")
        templates = app.gate.policy().bundle.templates
        try:
            accepted = taker.take(
                source, format, headers, body, templates, actor, trace_context=trace_context
            )
        except InvalidInput:
            raise  # dead-lettered: sending it again would not help
        except Exception:
            if signature is not None:  # not taken for a passing reason: it may come again
                app.store.forget_signature(signature)
            raise
        return {"tasks": accepted.tasks, "cancelled": accepted.cancelled}

    Body = Annotated[bytes, Depends(_raw_body)]

    @router.post("/events/{source}", tags=["ingest"], status_code=202, response_model=Json)
    def event(app: App, request: Request, body: Body, source: str) -> Json:
        """A JSON object, turned into tasks by the live bundle's templates for `source`
        (an `Idempotency-Key` header makes repeats one task)."""
        return ingest(app, request, body, source, "json")

    @router.post(
        "/events/{source}/cloudevents", tags=["ingest"], status_code=202, response_model=Json
    )
    def cloudevent(app: App, request: Request, body: Body, source: str) -> Json:
        """A CloudEvent 1.0, structured or binary content mode."""
        return ingest(app, request, body, source, "cloudevents")

    @router.post(
        "/events/{source}/alertmanager", tags=["ingest"], status_code=202, response_model=Json
    )
    def alertmanager(app: App, request: Request, body: Body, source: str) -> Json:
        """A Prometheus Alertmanager webhook (version 4): firing alerts become tasks (one per
        fingerprint and start), resolved ones cancel the tasks that have not started."""
        return ingest(app, request, body, source, "alertmanager")

    @router.get("/dead-letters", tags=["ingest"], response_model=Page)
    def dead_letters(
        app: App,
        _: Who,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: str | None = None,
    ) -> Page:
        rows = app.store.dead_letters(limit=limit, after_id=after)
        next_after = rows[-1].id if len(rows) == limit else None
        return Page(items=[r.to_json() for r in rows], next=next_after)

    # --- models, audit, tokens -----------------------------------------------------------------

    class PromoteIn(_In):
        force: bool = False

    @router.post("/models/{version}/promote", tags=["models"], response_model=Json)
    def promote_model(app: App, actor: Who, version: str, body: PromoteIn) -> Json:
        """Make a saved model set the active one (audited)."""
        from tactician.store.registry import ModelRegistry

        registry = ModelRegistry(app.settings.models_dir)
        event = app.gate.promote_model(actor, registry, version, force=body.force)
        return {"version": event.version, "previous": event.previous}

    @router.post("/models/rollback", tags=["models"], response_model=Json)
    def rollback_model(app: App, actor: Who) -> Json:
        """Make the previously active model set active again (audited)."""
        from tactician.store.registry import ModelRegistry

        event = app.gate.rollback_model(actor, ModelRegistry(app.settings.models_dir))
        return {"version": event.version, "previous": event.previous}

    # --- drift -------------------------------------------------------------------------------

    @router.get("/drift", tags=["drift"], response_model=Json)
    def drift(app: App, _: Who, since: float | None = None) -> Json:
        """The fallback (null when not engaged) and the drift records since `since` (epoch
        seconds; default: the last 7 days)."""
        store = app.store
        start = store.db_now() - 7 * 86_400 if since is None else since
        engaged = store.fallback()
        records = store.audit_records(since=start, actions=DRIFT_ACTIONS)
        return {
            "fallback": None if engaged is None else asdict(engaged),
            "records": [r.to_json() for r in records],
        }

    class ClearIn(_In):
        reason: str = Field(min_length=1, max_length=2000)

    @router.post("/drift/clear", tags=["drift"], response_model=Json)
    def clear_drift(app: App, actor: Who, body: ClearIn) -> Json:
        """End the drift fallback: the models decide again (audited)."""
        return asdict(app.gate.clear_drift(actor, body.reason))

    class PurgeIn(_In):
        before: float = Field(allow_inf_nan=False)
        """Epoch seconds: the tasks that ended before this go."""
        dry_run: bool = False

    @router.post("/tasks/purge", tags=["tasks"], response_model=Json)
    def purge(app: App, actor: Who, body: PurgeIn) -> Json:
        """Remove the tasks that ended before `before`, with their attempts, approvals and
        overrides (audited; the chain keeps their records). `dry_run`: count only."""
        if body.dry_run:
            return {
                "before": body.before,
                "purged": 0,
                "would": app.store.purge(body.before, dry_run=True),
            }
        app.gate.authorize(actor, Operation.PURGE, f"before {body.before}")
        count = app.store.purge(body.before, actor)
        return {"before": body.before, "purged": count, "would": count}

    @router.get("/models", tags=["models"], response_model=list[Json])
    def models(app: App, _: Who) -> list[Json]:
        from tactician.store.registry import ModelRegistry

        return [e.to_json() for e in ModelRegistry(app.settings.models_dir).list()]

    @router.get("/audit", tags=["audit"], response_model=Page)
    def audit(
        app: App,
        _: Who,
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Page:
        items = []
        for record in app.store.audit_records(after_seq=after):
            items.append(record.to_json())
            if len(items) == limit:
                break
        next_after = str(items[-1]["seq"]) if len(items) == limit else None
        return Page(items=items, next=next_after)

    @router.get("/audit/head", tags=["audit"], response_model=Json)
    def audit_head(app: App, _: Who) -> Json:
        seq, digest = app.store.audit_head()
        return {"seq": seq, "hash": digest}

    @router.get("/audit/verify", tags=["audit"], response_model=Json)
    def audit_verify(app: App, _: Who) -> Json:
        verdict = verify(app.store.audit_records())
        return {**asdict(verdict), "text": verdict.text()}

    @router.get("/tokens", tags=["tokens"], response_model=list[Json])
    def tokens(app: App, actor: Who) -> list[Json]:
        return [
            {
                "name": t.name,
                "role": t.role.value,
                "groups": sorted(t.groups),
                "site": t.site,
                "created_at": t.created_at,
                "created_by": t.created_by,
                "revoked_at": t.revoked_at,
            }
            for t in app.store.tokens()
        ]

    @router.post("/tokens", tags=["tokens"], status_code=201, response_model=Json)
    def create_token(app: App, actor: Who, body: TokenIn) -> Json:
        secret = app.gate.create_token(
            actor, body.name, parse_role(body.role), body.groups, body.site
        )
        return {"name": body.name, "role": body.role, "site": body.site, "token": secret}

    @router.delete("/tokens/{name}", tags=["tokens"], status_code=204, response_class=Response)
    def revoke_token(app: App, actor: Who, name: str) -> Response:
        app.gate.revoke_token(actor, name)
        return Response(status_code=204)

    return router
