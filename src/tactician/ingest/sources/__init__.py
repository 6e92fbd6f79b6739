"""Bus sources: Redis Streams, NATS JetStream, RabbitMQ and a PostgreSQL outbox, behind one
`Source` interface, each message made a task by the policy bundle's templates and acknowledged
only after that task is committed (`runner.SourceRunner`). `tactician ingest` runs them."""

from __future__ import annotations

from typing import Any

from tactician.errors import InvalidInput
from tactician.govern.sources import SourceSpec
from tactician.ingest.sources.base import Message, Source, SourceStalled, SourceUnavailable
from tactician.ingest.sources.config import parse_sources, read_sources, select_sources
from tactician.ingest.sources.runner import Link, RunnerOptions, RunnerStats, SourceRunner

__all__ = [
    "Link",
    "Message",
    "RunnerOptions",
    "RunnerStats",
    "Source",
    "SourceRunner",
    "SourceSpec",
    "SourceStalled",
    "SourceUnavailable",
    "open_source",
    "parse_sources",
    "read_sources",
    "select_sources",
]


def open_source(spec: SourceSpec, database: tuple[Any, str] | None = None) -> Source:
    """Connect to the source's bus. An outbox needs `database`: the store's own PostgreSQL
    connection and URL (its claims and the task commits share one transaction)."""
    if spec.type == "redis":
        from tactician.ingest.sources.redis_streams import RedisStreamSource

        return RedisStreamSource(spec)
    if spec.type == "nats":
        from tactician.ingest.sources.nats_jetstream import NatsSource

        return NatsSource(spec)
    if spec.type == "rabbitmq":
        from tactician.ingest.sources.rabbitmq import RabbitSource

        return RabbitSource(spec)
    if database is None:
        raise InvalidInput(
            f"source {spec.name}: an outbox needs Tactician on PostgreSQL (--db postgresql://…)"
        )
    from tactician.ingest.sources.outbox import OutboxSource

    return OutboxSource(spec, *database)
