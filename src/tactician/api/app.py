"""The REST API: everything the CLI does, over HTTP, with bearer tokens and the gate's roles.

`create_api(settings)` builds a FastAPI app (OpenAPI 3.1 at `/openapi.json`, docs at `/docs`).
Every request acts as the actor its `Authorization: Bearer <token>` names; reads need any valid
token, mutations the role the permission matrix (`tactician.govern.roles.ALLOWED`) gives, and a
refusal answers 403 and leaves an `access.refused` audit record. Errors are one body shape,
`{"code": ..., "message": ...}`, with a one-line message; nothing answers 500 on bad input.

Each request borrows a store connection of its own from a pool (SQLite and psycopg connections
do not take concurrent use).
"""

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tactician.api import agents, console, routes
from tactician.app import Tactician
from tactician.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    StoreUnavailable,
    TacticianError,
)
from tactician.govern.roles import Actor
from tactician.ingest.signatures import BadSignature
from tactician.observe import traces
from tactician.settings import Settings

STATUS = {InvalidInput: 400, Forbidden: 403, NotFound: 404, Conflict: 409, StoreUnavailable: 503}


class Unauthorized(Forbidden):
    """A bearer token is needed."""


def _status(exc: TacticianError) -> tuple[int, str]:
    if isinstance(exc, Unauthorized | BadSignature) or (
        isinstance(exc, Forbidden) and exc.message.startswith(("unknown token", "token "))
    ):
        return 401, "unauthorized"
    for kind, status in STATUS.items():
        if isinstance(exc, kind):
            return status, kind.__name__.lower().replace("invalidinput", "invalid_input")
    return 500, "error"


def error_body(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": " ".join(message.split())}


def create_api(settings: Settings) -> FastAPI:
    """The API over the database `settings.db` names."""
    traces.configure(settings)
    idle: list[Tactician] = []  # connections no request is using
    opened: list[Tactician] = []
    lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        with lock:
            for app in opened:
                app.close()
            opened.clear()

    api = FastAPI(
        lifespan=lifespan,
        title="Tactician",
        version="0.1.0",
        description="Decides what runs when, runs it durably, keeps humans in charge.",
        responses={
            400: {"model": routes.ErrorOut},
            401: {"model": routes.ErrorOut},
            403: {"model": routes.ErrorOut},
            404: {"model": routes.ErrorOut},
            409: {"model": routes.ErrorOut},
            422: {"model": routes.ErrorOut},
        },
    )

    def current_app() -> Iterator[Tactician]:
        """A store connection of the request's own: FastAPI may run a request's dependencies
        and its endpoint on different threads, so connections are lent per request, not per
        thread (neither sqlite3 nor psycopg connections take concurrent use)."""
        with lock:
            app = idle.pop() if idle else None
        if app is None:
            app = Tactician(settings=settings)
            with lock:
                opened.append(app)
        try:
            yield app
        finally:
            with lock:
                idle.append(app)

    def actor(
        app: Annotated[Tactician, Depends(current_app)],
        authorization: Annotated[str | None, Header()] = None,
    ) -> Actor:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("a bearer token is needed: Authorization: Bearer <token>")
        return app.gate.actor(token.strip())

    @api.exception_handler(TacticianError)
    async def tactician_error(_: Request, exc: TacticianError) -> JSONResponse:
        status, code = _status(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(error_body(code, exc.message), status_code=status, headers=headers)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (a body it cannot parse, a wrong method): our body shape."""
        code = {400: "invalid_input", 404: "notfound", 405: "method_not_allowed"}.get(
            exc.status_code, "error"
        )
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "")
        return JSONResponse(error_body("invalid_input", str(message)), status_code=422)

    api.include_router(routes.build(current_app, actor))
    api.include_router(agents.build(current_app, actor))  # edge agents and /sites
    console.install(api, current_app)
    return api


__all__ = ["create_api", "error_body"]
