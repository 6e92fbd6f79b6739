"""What every bus source gives the runner: batches of messages, acknowledged after the commit.

A source hands out messages and forgets nothing until `ack`: a message fetched and not acked
(the process died, the commit failed) comes back, to this process or another, by the bus's own
means (a Redis consumer group's pending list, JetStream's ack wait, RabbitMQ's requeue, an
outbox row's lock). The runner acks a message only once its task, or its dead letter, is
committed, so the bus is the only copy of an event until the database has one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from tactician.errors import TacticianError


class SourceUnavailable(TacticianError):
    """The bus cannot be reached; the runner reconnects with backoff."""


class SourceStalled(TacticianError):
    """The batch cannot be committed yet; it went back to the bus, and the runner retries."""


@dataclass(frozen=True)
class Message:
    """One message as the bus delivered it."""

    id: str | None
    """Stable across redeliveries (a stream entry's id, a stream sequence, a message_id, an
    outbox row's id): the task's idempotency key is made of it. None: the bus gave none."""
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    """Names in lower case (content-type, ce-* for CloudEvents in binary mode)."""
    handle: Any = None
    """What the source needs to acknowledge it."""
    problem: str | None = None
    """Why the bus's message holds no event at all (a stream entry without the event's field):
    it is dead-lettered with this reason."""


class Source(Protocol):
    """A bus, seen by the runner. Every call may raise SourceUnavailable."""

    name: str

    def fetch(self, limit: int, timeout: float) -> list[Message]:
        """Up to `limit` messages; waits at most `timeout` seconds for the first."""
        ...

    def ack(self, messages: Sequence[Message]) -> None:
        """The messages' tasks (or dead letters) are committed: the bus may forget them."""
        ...

    def release(self, messages: Sequence[Message]) -> None:
        """The commit failed: the messages go back to the bus, to be delivered again."""
        ...

    def pause(self, seconds: float) -> None:
        """Pull nothing for `seconds` (backpressure), keeping the connection alive; messages
        the source holds unprocessed go back to the bus."""
        ...

    def close(self) -> None: ...


def redact_url(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()
