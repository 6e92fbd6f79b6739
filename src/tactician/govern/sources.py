"""What a bus source is, as a policy bundle's `sources:` or an ingest config file declares it.

One flat model for the four types (redis, nats, rabbitmq, outbox): a field that one type needs
is required for it and refused for the others, so an error names the field and its line
(`sources.yaml:7: sources[1].queue: is required for type rabbitmq`) rather than a branch of a
union. The adapters that read these live in `tactician.ingest.sources`; the model lives here,
below them, because the policy bundle holds it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    model_validator,
)
from pydantic_core import PydanticCustomError

SourceType = Literal["redis", "nats", "rabbitmq", "outbox"]
EventFormat = Literal["json", "cloudevents", "alertmanager"]

_NAME = re.compile(r"[a-z0-9._-]{1,64}")
# The field each type reads its messages from, and the fields only some types take.
_WHERE = {"redis": "stream", "nats": "subject", "rabbitmq": "queue", "outbox": None}
_ONLY = {
    "stream": ("redis", "nats"),
    "subject": ("nats",),
    "queue": ("rabbitmq",),
    "group": ("redis",),
    "consumer": ("redis",),
    "claim_idle": ("redis",),
    "field": ("redis",),
    "durable": ("nats",),
    "ack_wait": ("nats",),
    "prefetch": ("rabbitmq",),
    "poll_interval": ("outbox",),
}


def _fail(message: str, *at: str | int) -> PydanticCustomError:
    """The policy module's error shape: its loader turns `at` into the field's line."""
    return PydanticCustomError("policy", "{message}", {"message": message, "at": at})


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise _fail("must be 1 to 64 characters of a-z, 0-9, '.', '_' or '-'")
    return value


def _seconds(value: object) -> object:
    # Imported here: the policy module imports this one for its `sources` field.
    from tactician.govern.policy import _seconds as seconds

    return seconds(value)


Seconds = Annotated[float, BeforeValidator(_seconds), Field(gt=0, le=86_400, allow_inf_nan=False)]
Count = Annotated[int, Strict(), Field(ge=1, le=1_000_000)]


class SourceSpec(BaseModel):
    """One bus the ingest process pulls events from; each message becomes at most one task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, AfterValidator(_name)]
    """The ingestion source: what templates' `source` names and what tasks' `source` is."""
    type: SourceType
    url: Annotated[str, Field(min_length=1)] | None = None
    """redis://…, nats://…, amqp://…; an outbox is a table of Tactician's own database."""
    format: EventFormat = "json"
    """How message bodies are read: plain JSON objects, CloudEvents, Alertmanager webhooks."""
    batch_size: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 100
    """Messages taken at once; their tasks are committed in one transaction."""
    max_pending: Count = 10_000
    """Past this many of the source's tasks not yet started, it stops pulling."""
    stream: Annotated[str, Field(min_length=1)] | None = None
    """redis: the stream's key; nats: the JetStream stream (found by subject when left out)."""
    subject: Annotated[str, Field(min_length=1)] | None = None
    queue: Annotated[str, Field(min_length=1)] | None = None
    group: Annotated[str, Field(min_length=1)] | None = None
    """redis: the consumer group (default `tactician`)."""
    consumer: Annotated[str, Field(min_length=1)] | None = None
    """redis: this process's consumer name (default host-pid)."""
    claim_idle: Seconds | None = None
    """redis: a pending entry idle this long belongs to a consumer that died; it is claimed
    (XAUTOCLAIM). Default 30s; longer than a batch ever takes."""
    field: Annotated[str, Field(min_length=1)] | None = None
    """redis: the entry's field that holds the event (default `body`)."""
    durable: Annotated[str, Field(min_length=1)] | None = None
    """nats: the durable pull consumer's name (default `tactician`)."""
    ack_wait: Seconds | None = None
    """nats: unacknowledged messages are redelivered after this (default 30s)."""
    prefetch: Annotated[int, Strict(), Field(ge=1, le=65_535)] | None = None
    """rabbitmq: unacknowledged messages the broker sends ahead (default: batch_size)."""
    poll_interval: Seconds | None = None
    """outbox: the longest wait without a NOTIFY before looking again (default 1s)."""

    @model_validator(mode="after")
    def _fields_of_type(self) -> Self:
        for field, types in _ONLY.items():
            if getattr(self, field) is not None and self.type not in types:
                raise _fail(f"applies to type {' or '.join(types)} only", field)
        where = _WHERE[self.type]
        if where is not None and getattr(self, where) is None:
            raise _fail(f"is required for type {self.type}", where)
        if self.type == "outbox" and self.url is not None:
            raise _fail("an outbox is a table of Tactician's own database (--db): no url", "url")
        if self.type != "outbox" and self.url is None:
            raise _fail(f"is required for type {self.type}", "url")
        return self


def _unique(specs: tuple[SourceSpec, ...]) -> tuple[SourceSpec, ...]:
    names = [spec.name for spec in specs]
    for index, name in enumerate(names):
        if (first := names.index(name)) < index:
            raise _fail(f"{name!r} is already the name of sources[{first}]", index, "name")
    return specs


Sources = Annotated[tuple[SourceSpec, ...], AfterValidator(_unique)]
"""A list of sources with distinct names."""
