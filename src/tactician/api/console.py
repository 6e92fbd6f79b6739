"""The web console: server-rendered pages for operators, beside the REST API.

Logging in trades a bearer token for a session: the browser gets a random session id in an
HttpOnly, SameSite=Strict cookie, and the token stays in this process's memory (sessions end
when the process does, and each uvicorn process has its own). The token is resolved through the
gate on every request, so a revoked token ends its sessions at once. Every form carries the
session's CSRF value as a hidden field and every POST is refused (403) without it; the login
form, which has no session yet, is protected the same way by a short-lived cookie of its own.
Every mutation goes through the gate as the session's actor, and an expected refusal (a role,
a self-approval, a task in the wrong state) comes back as a one-line message on the page.
"""

import json
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from tactician.api.kpis import kpi_page
from tactician.app import Tactician
from tactician.clock import SYSTEM_CLOCK, Clock
from tactician.domain import Task, TaskState
from tactician.errors import Forbidden, InvalidInput, NotFound, TacticianError
from tactician.govern.audit import AuditRecord, verify
from tactician.govern.roles import Actor, Operation
from tactician.store.protocol import TaskFilter
from tactician.store.registry import ModelRegistry

AppDep = Callable[[], Iterator[Tactician]]

HERE = Path(__file__).parent
SESSION_COOKIE = "tct_session"
LOGIN_COOKIE = "tct_login"
SESSION_TTL_S = 12 * 3600.0
"""A session ends this long after its login, whatever it did meanwhile."""
QUEUE_ROWS = 200
"""Rows the live queue shows at most (the counts cover every task)."""
AUDIT_ROWS = 100
TIMELINE_ROWS = 200
DECIDED = ("pending", "ready", "retry_wait", "leased")
"""The states the decision service advises on."""
QUEUE_STATES = ("running", "leased", "ready", "retry_wait", "pending", "awaiting_approval", "held")
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class LoginNeeded(Exception):
    """No live session: the page redirects to the login form."""


class CsrfRefused(Exception):
    """A POST without the session's CSRF value."""


@dataclass
class Session:
    token: str
    csrf: str
    started: float
    flash: list[tuple[str, str]] = field(default_factory=list)
    """Messages for the next page shown: (ok | error, text)."""


class Sessions:
    """Session id → session, in memory, guarded for the server's threads."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, ttl: float = SESSION_TTL_S) -> None:
        self._clock, self._ttl = clock, ttl
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, token: str) -> str:
        sid = secrets.token_urlsafe(32)
        session = Session(token, secrets.token_urlsafe(32), self._clock.monotonic())
        with self._lock:
            now = self._clock.monotonic()  # forget abandoned sessions as new ones open
            for old in [k for k, v in self._sessions.items() if now - v.started > self._ttl]:
                del self._sessions[old]
            self._sessions[sid] = session
        return sid

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None and self._clock.monotonic() - session.started > self._ttl:
                del self._sessions[sid]
                return None
            return session

    def close(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)


@dataclass
class Page:
    """What every console request has: the app, the session and the actor it acts as."""

    app: Tactician
    request: Request
    session: Session
    actor: Actor

    def say(self, kind: str, text: str) -> None:
        self.session.flash.append((kind, " ".join(text.split())))

    def attempt(self, done: str, change: Callable[[], object]) -> None:
        """Make a change; its expected refusal becomes a message, not an error page."""
        try:
            change()
        except TacticianError as exc:
            self.say("error", exc.message)
        else:
            self.say("ok", done)


def _same_site_path(target: str, fallback: str) -> str:
    """Only paths inside the console are followed after a form (no open redirect)."""
    return target if target.startswith("/console/") and "//" not in target else fallback


def _span(seconds: float) -> str:
    """A duration in its largest whole unit: "3h", "12s", "<1s"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return "<1s"


def _when(ts: float | None, now: float) -> str:
    """A time relative to now: "in 5m", "3h ago"."""
    if ts is None:
        return "—"
    delta = ts - now
    if abs(delta) < 1:
        return "now"
    text = _span(abs(delta))
    return f"in {text}" if delta > 0 else f"{text} ago"


def _site_line(site: dict[str, Any], live_version: str) -> dict[str, Any]:
    """A site as `GET /sites` shows it, with whether its bundle is the live policy."""
    bundle = site["bundle_version"]
    state = None if bundle is None else "current" if bundle == live_version else "behind"
    return {**site, "bundle_state": state}


def _utc(ts: float | None) -> str:
    import datetime as dt

    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _compact(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _names_task(record: AuditRecord, task_id: str) -> bool:
    if record.subject == task_id:
        return True
    if task_id not in record.detail:  # cheap text check before parsing
        return False
    tasks = record.details.get("tasks")
    return isinstance(tasks, list) and task_id in tasks


def _float(text: str, what: str) -> float | None:
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise InvalidInput(f"{what} must be a number, got {text!r}") from None


def install(api: FastAPI, current_app: AppDep, clock: Clock = SYSTEM_CLOCK) -> None:
    """Mount the console on the API: its pages, its static files and its two refusals."""
    api.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    api.include_router(build(current_app, Sessions(clock)))

    @api.exception_handler(LoginNeeded)
    async def login_needed(_: Request, __: LoginNeeded) -> Response:
        return RedirectResponse("/console/login", status_code=303)

    @api.exception_handler(CsrfRefused)
    async def csrf_refused(_: Request, __: CsrfRefused) -> Response:
        body = "<!doctype html><title>Refused</title><p>Refused: this form is stale or was not "
        body += 'sent by the console. <a href="/console/">Back to the console</a></p>'
        return HTMLResponse(body, status_code=403, headers=HEADERS)


def build(current_app: AppDep, sessions: Sessions) -> APIRouter:
    router = APIRouter(prefix="/console", include_in_schema=False)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals.update(when=_when, span=_span, utc=_utc, compact=_compact)
    App = Annotated[Tactician, Depends(current_app)]

    def page_of(request: Request, app: App) -> Page:
        sid = request.cookies.get(SESSION_COOKIE)
        session = sessions.get(sid)
        if session is None:
            raise LoginNeeded
        try:
            actor = app.gate.actor(session.token)
        except Forbidden:  # revoked since the login
            sessions.close(sid)
            raise LoginNeeded from None
        return Page(app, request, session, actor)

    async def posted(request: Request, page: Annotated[Page, Depends(page_of)]) -> Page:
        form = await request.form()
        sent = form.get("csrf")
        if not isinstance(sent, str) or not secrets.compare_digest(sent, page.session.csrf):
            raise CsrfRefused
        return page

    Viewer = Annotated[Page, Depends(page_of)]
    Poster = Annotated[Page, Depends(posted)]
    Text = Annotated[str, Form()]

    def render(page: Page, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        flash: list[tuple[str, str]] = []
        if not name.startswith("_"):  # a polled fragment leaves messages to the next page
            flash, page.session.flash = page.session.flash, []
        pending = len(page.app.store.approvals("pending"))
        context.update(
            fallback=page.app.store.fallback(),
            actor=page.actor,
            csrf=page.session.csrf,
            flash=flash,
            pending_approvals=pending,
            path=page.request.url.path,
            now=page.app.store.db_now(),
        )
        return templates.TemplateResponse(
            page.request, name, context, status_code=status, headers=HEADERS
        )

    def back(to: str) -> RedirectResponse:
        return RedirectResponse(to, status_code=303)

    # --- logging in --------------------------------------------------------------------------

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, error: str = "") -> HTMLResponse:
        nonce = secrets.token_urlsafe(32)
        response = templates.TemplateResponse(
            request, "login.html", {"csrf": nonce, "error": error}, headers=HEADERS
        )
        _cookie(response, request, LOGIN_COOKIE, nonce, max_age=3600)
        return response

    def refused(request: Request, error: str) -> HTMLResponse:
        response = login_form(request, error)
        response.status_code = 401
        return response

    @router.post("/login")
    def login(request: Request, app: App, token: Text = "", csrf: Text = "") -> Response:
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not secrets.compare_digest(csrf, expected):
            raise CsrfRefused
        if not token.strip():
            return refused(request, "Enter a token to sign in.")
        try:
            actor = app.gate.actor(token.strip())
        except Forbidden as exc:
            return refused(request, f"Sign-in refused: {exc.message}.")
        sid = sessions.open(token.strip())
        app.gate.record(actor, "console.login", actor.name)
        response = back("/console/")
        response.delete_cookie(LOGIN_COOKIE, path="/console")
        _cookie(response, request, SESSION_COOKIE, sid, max_age=int(SESSION_TTL_S))
        return response

    @router.post("/logout")
    def logout(page: Poster) -> Response:
        sessions.close(page.request.cookies.get(SESSION_COOKIE))
        response = back("/console/login")
        response.delete_cookie(SESSION_COOKIE, path="/console")
        return response

    # --- the live queue ----------------------------------------------------------------------

    def queue(page: Page) -> dict[str, Any]:
        app = page.app
        rows: list[Task] = []
        for state in QUEUE_STATES:
            left = QUEUE_ROWS - len(rows)
            if left <= 0:
                break
            rows += app.tasks(TaskFilter(state=state, limit=left))
        shown = [t.id for t in rows if t.state.value in DECIDED]
        decisions, reasons, scorer = app.decisions(explain=shown)
        by_id = {d.task_id: d for d in decisions}
        after = {"running": 0, "leased": 1, "awaiting_approval": 3, "held": 4}

        def rank(task: Task) -> tuple[int, float, str]:
            decision = by_id.get(task.id)
            group = after.get(task.state.value, 2 if decision else 5)
            return (group, -decision.score if decision else 0.0, task.id)

        items = []
        for task in sorted(rows, key=rank):
            decision = by_id.get(task.id)
            wait, why = reasons.get(task.id, ""), decision.why() if decision else ""
            if task.state is TaskState.RUNNING:
                wait = f"running on {task.worker_id or 'a worker'}, attempt {task.attempt}"
            elif decision is None:
                wait = task.last_error or task.state.value.replace("_", " ")
            items.append({"task": task, "decision": decision, "wait": wait, "why": why})
        counts = app.store.counts()
        return {"items": items, "counts": counts, "scorer": scorer, "cap": QUEUE_ROWS}

    @router.get("/", response_class=HTMLResponse)
    def home(page: Viewer) -> HTMLResponse:
        return render(page, "queue.html", **queue(page))

    @router.get("/queue/live", response_class=HTMLResponse)
    def queue_live(page: Viewer) -> HTMLResponse:
        return render(page, "_queue.html", **queue(page))

    # --- a task ------------------------------------------------------------------------------

    @router.get("/tasks/{task_id}", response_class=HTMLResponse)
    def task_page(page: Viewer, task_id: str) -> HTMLResponse:
        app = page.app
        try:
            task = app.get(task_id)
        except NotFound as exc:
            return render(page, "missing.html", status=404, message=exc.message)
        decision, pending_reason = None, ""
        if task.state.value in DECIDED:
            decisions, reasons, _ = app.decisions(explain=[task_id])
            decision = next((d for d in decisions if d.task_id == task_id), None)
            pending_reason = reasons.get(task_id, "")
        timeline = [
            r for r in app.store.audit_records(since=task.created_at) if _names_task(r, task_id)
        ][-TIMELINE_ROWS:]
        approval = None
        if task.state is TaskState.AWAITING_APPROVAL or any(
            r.action.startswith("approval.") for r in timeline
        ):
            try:
                approval = app.store.approval(task_id)
            except NotFound:
                approval = None
        return render(
            page,
            "task.html",
            task=task,
            payload=json.dumps(task.payload, indent=2, sort_keys=True),
            decision=decision,
            pending_reason=pending_reason,
            attempts=app.store.attempts(task_id),
            timeline=timeline,
            approval=approval,
        )

    # --- approvals ---------------------------------------------------------------------------

    @router.get("/approvals", response_class=HTMLResponse)
    def approvals(page: Viewer) -> HTMLResponse:
        store = page.app.store
        pending = store.approvals("pending")
        kinds = {}
        for row in pending:
            try:
                kinds[row.task_id] = store.get(row.task_id).kind
            except NotFound:
                kinds[row.task_id] = "?"
        decided = sorted(
            (r for r in store.approvals(None) if r.state != "pending"),
            key=lambda r: -(r.resolved_at or 0.0),
        )[:20]
        return render(page, "approvals.html", pending=pending, kinds=kinds, decided=decided)

    @router.post("/approvals/{task_id}")
    def vote(page: Poster, task_id: str, verdict: Text = "", reason: Text = "") -> Response:
        if verdict not in ("approve", "reject"):
            page.say("error", "choose approve or reject")
        elif not reason.strip():
            page.say("error", f"a reason is needed to {verdict} task {task_id}")
        else:
            try:
                row = page.app.gate.vote(page.actor, task_id, verdict, reason.strip())
            except TacticianError as exc:
                page.say("error", exc.message)
            else:
                outcome = row.state if row.state != "pending" else f"{verdict} recorded"
                page.say("ok", f"task {task_id}: {outcome} ({row.tally().text()})")
        return back("/console/approvals")

    # --- overrides ---------------------------------------------------------------------------

    @router.get("/overrides", response_class=HTMLResponse)
    def overrides(page: Viewer) -> HTMLResponse:
        app = page.app
        held = app.tasks(TaskFilter(state="held", limit=QUEUE_ROWS))
        task_id = page.request.query_params.get("task", "")
        return render(
            page, "overrides.html", overrides=app.store.overrides(), held=held, task_id=task_id
        )

    @router.post("/overrides")
    def set_override(
        page: Poster,
        task_id: Text = "",
        what: Text = "",
        score: Text = "",
        minutes: Text = "",
        reason: Text = "",
        next: Text = "",
    ) -> Response:
        app, actor, task_id = page.app, page.actor, task_id.strip()

        def change() -> None:
            if not task_id:
                raise InvalidInput("which task? give its id")
            if what not in ("pin", "run_now", "hold"):
                raise InvalidInput("choose pin, run now or hold")
            if not reason.strip():
                raise InvalidInput(f"a reason is needed to {what.replace('_', ' ')} a task")
            app.gate.authorize(actor, Operation.OVERRIDE, task_id)
            for_minutes = _float(minutes, "minutes")
            until = None if for_minutes is None else app.store.db_now() + for_minutes * 60
            if what == "hold":
                app.store.hold(task_id, actor, reason.strip(), until)
                return
            value = _float(score, "score") if what == "pin" else None
            if what == "pin" and (value is None or not 0 <= value <= 1):
                raise InvalidInput("a pin needs a score between 0 and 1")
            app.store.set_override(task_id, what, value, actor, reason.strip(), until)

        page.attempt(f"task {task_id}: {what.replace('_', ' ')} set", change)
        return back(_same_site_path(next, "/console/overrides"))

    @router.post("/overrides/clear")
    def clear_override(
        page: Poster, task_id: Text = "", what: Text = "", reason: Text = "", next: Text = ""
    ) -> Response:
        app, actor = page.app, page.actor

        def change() -> None:
            app.gate.authorize(actor, Operation.CLEAR_OVERRIDE, task_id)
            app.store.clear_override(task_id, what, actor, reason.strip() or "cleared in console")

        page.attempt(f"task {task_id}: {what.replace('_', ' ')} cleared", change)
        return back(_same_site_path(next, "/console/overrides"))

    @router.post("/overrides/release")
    def release(page: Poster, task_id: Text = "", reason: Text = "", next: Text = "") -> Response:
        app, actor = page.app, page.actor

        def change() -> None:
            app.gate.authorize(actor, Operation.OVERRIDE, task_id)
            app.store.release(task_id, actor, reason.strip() or "released in console")

        page.attempt(f"task {task_id}: released", change)
        return back(_same_site_path(next, "/console/overrides"))

    @router.post("/drift/clear")
    def clear_drift(page: Poster, reason: Text = "", next: Text = "") -> Response:
        page.attempt(
            "drift fallback cleared: the models decide again",
            lambda: page.app.gate.clear_drift(page.actor, reason),
        )
        return back(_same_site_path(next, "/console/"))

    # --- KPIs over time ---------------------------------------------------------------------

    @router.get("/kpis", response_class=HTMLResponse)
    def kpis(page: Viewer, window: str = "1h") -> HTMLResponse:
        store = page.app.store
        return render(page, "kpis.html", **kpi_page(store, window, store.db_now()))

    @router.get("/kpis/live", response_class=HTMLResponse)
    def kpis_live(page: Viewer, window: str = "1h") -> HTMLResponse:
        store = page.app.store
        return render(page, "_kpis.html", **kpi_page(store, window, store.db_now()))

    # --- pools, sites, policies, audit -----------------------------------------------------------

    @router.get("/pools", response_class=HTMLResponse)
    def pools(page: Viewer) -> HTMLResponse:
        return render(page, "pools.html", pools=page.app.store.pools())

    def sites_now(page: Page) -> dict[str, Any]:
        app = page.app
        now, live = app.store.db_now(), app.gate.policy().version
        rows = [_site_line(row.to_json(now), live) for row in app.store.sites()]
        return {"sites": rows, "live_version": live}

    @router.get("/sites", response_class=HTMLResponse)
    def sites(page: Viewer) -> HTMLResponse:
        return render(page, "sites.html", **sites_now(page))

    @router.get("/sites/live", response_class=HTMLResponse)
    def sites_live(page: Viewer) -> HTMLResponse:
        return render(page, "_sites.html", **sites_now(page))

    @router.get("/policies", response_class=HTMLResponse)
    def policies(page: Viewer) -> HTMLResponse:
        app = page.app
        try:
            models = ModelRegistry(app.settings.models_dir).list()
        except TacticianError as exc:
            page.say("error", f"models unavailable: {exc.message}")
            models = []
        return render(
            page,
            "policies.html",
            slots=app.gate.slots(),
            comparison=app.gate.compare(),
            deployments=app.store.deployments(limit=50),
            models=models,
        )

    @router.get("/audit", response_class=HTMLResponse)
    def audit(page: Viewer, before: int = 0) -> HTMLResponse:
        store = page.app.store
        head, _ = store.audit_head()
        last = min(head, before - 1) if before > 0 else head
        first = max(0, last - AUDIT_ROWS)
        records = []
        for record in store.audit_records(after_seq=first):
            if record.seq > last:
                break
            records.append(record)
        records.reverse()
        return render(page, "audit.html", records=records, head=head, older=first)

    @router.post("/audit/verify")
    def audit_verify(page: Poster) -> Response:
        verdict = verify(page.app.store.audit_records())
        page.say("ok" if verdict.ok else "error", verdict.text())
        return back("/console/audit")

    return router


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


__all__ = ["Sessions", "build", "install"]
