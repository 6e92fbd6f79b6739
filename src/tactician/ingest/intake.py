"""The intake: an HTTP event in, tasks committed (or the event dead-lettered), one call.

The API hands over a source name, the request's headers and raw body; the intake checks the
signature of a signed source, parses the event (plain JSON, a CloudEvent, an Alertmanager
webhook), turns it into tasks with the live bundle's templates, and commits them before the API
answers. A resolved alert cancels the tasks its firing made that have not started. Anything it
cannot take (bad signature aside) is kept in the dead-letter table with the reason and refused
with that reason, so nothing accepted is lost and nothing refused is silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from tactician.domain import NewTask
from tactician.errors import InvalidInput
from tactician.govern.policy import Template
from tactician.govern.roles import Actor, Role
from tactician.ingest.alertmanager import parse_alertmanager
from tactician.ingest.cloudevents_in import parse_cloudevent
from tactician.ingest.records import Event, Resolution, Unmatched
from tactician.ingest.signatures import BadSignature, verify
from tactician.ingest.templates import task_for
from tactician.observe import traces
from tactician.store.protocol import Store

Format = Literal["json", "cloudevents", "alertmanager"]
Submit = Callable[[Sequence[NewTask], Actor], list[str]]


@dataclass(frozen=True)
class Accepted:
    tasks: list[str] = field(default_factory=list)
    """Ids of the tasks the event made (existing ids for a repeat)."""
    cancelled: list[str] = field(default_factory=list)
    """Tasks a resolved alert cancelled."""


def parse_secrets(text: str) -> dict[str, str]:
    """`source=secret,other=secret2` (settings.webhook_secrets) as a mapping."""
    secrets: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        source, sep, secret = item.partition("=")
        if not sep or not source or not secret:
            raise InvalidInput(
                "TACTICIAN_WEBHOOK_SECRETS must look like source=secret,other=secret"
            )
        secrets[source] = secret
    return secrets


@dataclass
class Intake:
    store: Store
    submit: Submit
    secrets: Mapping[str, str] = field(default_factory=dict)
    window_s: float = 300.0

    def signed(self, source: str) -> bool:
        return source in self.secrets

    def source_actor(self, source: str) -> Actor:
        """Who a signed source's events are submitted as."""
        return Actor(f"source:{source}", Role.OPERATOR)

    def check_signature(self, source: str, headers: Mapping[str, str], body: bytes) -> str:
        """Raise BadSignature (a Forbidden) unless a signed source's request is genuine and new;
        returns its signature, now remembered (`forget_signature` undoes that)."""
        signature = verify(headers, body, self.secrets[source], self.store.db_now(), self.window_s)
        if not self.store.remember_signature(source, signature, self.window_s):
            raise BadSignature("signature already used: a replayed request")
        return signature

    def take(
        self,
        source: str,
        format: Format,
        headers: Mapping[str, str],
        body: bytes,
        templates: Sequence[Template],
        actor: Actor,
        trace_context: str | None = None,
    ) -> Accepted:
        """`trace_context`: the traceparent the tasks continue (the ingest span's). Without a
        span (tracing off) a CloudEvent's own traceparent comes first, since it names where
        the event began."""
        now = self.store.db_now()
        try:
            parsed = self._parse(source, format, headers, body)
            tasks: list[NewTask] = []
            resolved: list[Resolution] = []
            for item in parsed:
                if isinstance(item, Resolution):
                    resolved.append(item)
                    continue
                made = task_for(item, templates, now)
                if isinstance(made, Unmatched):
                    raise InvalidInput(made.reason)
                context = trace_context
                if format == "cloudevents" and not traces.enabled():
                    context = traces.valid_traceparent(item.body.get("traceparent")) or context
                tasks.append(replace(made, trace_context=context) if context else made)
        except InvalidInput as exc:
            self.store.dead_letter(source, exc.message, body, headers, actor=actor)
            raise
        ids = self.submit(tasks, actor) if tasks else []
        cancelled = [
            task_id
            for r in resolved
            for task_id in self.store.cancel_waiting(r.key_prefix, actor, "the alert resolved")
        ]
        return Accepted(ids, cancelled)

    def _parse(
        self, source: str, format: Format, headers: Mapping[str, str], body: bytes
    ) -> list[Event | Resolution]:
        if format == "alertmanager":
            return parse_alertmanager(body, source)
        if format == "cloudevents":
            return [parse_cloudevent(headers, body, source)]
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput("the body is not JSON") from None
        if not isinstance(data, dict):
            raise InvalidInput("an event is a JSON object")
        key = next((v for k, v in headers.items() if k.lower() == "idempotency-key"), None)
        return [Event(source, data, f"{source}:{key}" if key else None)]
