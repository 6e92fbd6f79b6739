"""Executors run one attempt: a Python handler (sync or async), an HTTP POST, a shell command.

They run inside a runner process, so a hard timeout can always kill them. Each returns None on
success or raises; `HandlerError(retryable=False)` ends the task, `TargetOverloaded` also tells
the adaptive limit to back off.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from tactician.domain import KindSpec
from tactician.errors import HandlerError, TargetOverloaded

if TYPE_CHECKING:
    import httpx

Handler = Callable[..., Any]
OVERLOAD_STATUS = frozenset({429, 503})


def preload(kinds: Iterable[KindSpec]) -> None:
    """Import what these kinds' executors need, once, in the worker before runners fork from it:
    otherwise every runner, and every replacement of one, pays for the import (~0.5 s)."""
    if any(kind.executor == "http" for kind in kinds):
        import httpx  # noqa: F401


class Executors:
    """Runs attempts for a set of kinds; one per runner process."""

    def __init__(self, kinds: dict[str, KindSpec], handlers: dict[str, Handler]) -> None:
        self.kinds = kinds
        self.handlers = handlers
        self._signatures = {name: inspect.signature(h) for name, h in handlers.items()}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: httpx.Client | None = None

    def run(self, kind_name: str, payload: dict[str, Any], timeout: float) -> None:
        kind = self.kinds[kind_name]
        if kind.executor == "http":
            self._post(kind, payload, timeout)
        elif kind.executor == "shell":
            self._shell(kind, payload, timeout)
        else:
            self._call(kind_name, payload)

    def _call(self, kind_name: str, payload: dict[str, Any]) -> None:
        handler = self.handlers.get(kind_name)
        if handler is None:
            raise HandlerError(f"no handler for kind {kind_name} in this worker", retryable=False)
        try:
            self._signatures[kind_name].bind(**payload)
        except TypeError as exc:
            raise HandlerError(
                f"payload does not fit {kind_name}: {exc}", retryable=False
            ) from None
        result = handler(**payload)
        # Any awaitable, not only from an `async def`: an object with an async __call__ or a
        # partial of a coroutine function returns one too, and it must run, not be dropped.
        if inspect.isawaitable(result):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(result)

    def _post(self, kind: KindSpec, payload: dict[str, Any], timeout: float) -> None:
        assert kind.url is not None
        import httpx  # only workers with HTTP kinds pay for the import

        if self._http is None:
            self._http = httpx.Client()
        try:
            response = self._http.post(kind.url, json=payload, timeout=timeout)
        except httpx.HTTPError as exc:
            raise HandlerError(f"POST {kind.url} failed: {type(exc).__name__}: {exc}") from None
        if 200 <= response.status_code < 300:
            return
        detail = f"POST {kind.url} answered {response.status_code}: {response.text[:200]}"
        if response.status_code in OVERLOAD_STATUS:
            raise TargetOverloaded(detail)
        # Other 4xx will fail the same way again; 5xx may not.
        raise HandlerError(detail, retryable=response.status_code >= 500)

    def _shell(self, kind: KindSpec, payload: dict[str, Any], timeout: float) -> None:
        assert kind.command is not None
        try:
            done = subprocess.run(
                list(kind.command),
                input=json.dumps(payload),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            raise HandlerError(f"command not found: {kind.command[0]}", retryable=False) from None
        except subprocess.TimeoutExpired:
            raise HandlerError(f"command timed out after {timeout}s") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-300:]
            raise HandlerError(f"{kind.command[0]} exited with {done.returncode}: {tail}")

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        if self._loop is not None:
            self._loop.close()
