"""RabbitMQ: a durable queue, manual acks after the commit, a prefetch bound.

pika's blocking connection, because the runner and the store are synchronous: no event loop to
keep beside them (aio-pika would need one, as nats-py does). The queue is declared durable (an
existing queue must be durable too); the broker sends at most `prefetch` unacknowledged messages
ahead (default twice the batch, so the next batch arrives while one commits). Messages a
process received and did not acknowledge go back to the queue when its connection closes or
dies, and are delivered again.

The message id is the AMQP `message_id` property: publishers should set it (and publish with
delivery_mode 2, persistent, with publisher confirms), since RabbitMQ gives messages no id of
its own; without one a redelivered message can become a second task, unless a template derives
an idempotency key from the event.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions

from tactician.clock import SYSTEM_CLOCK, Clock
from tactician.govern.sources import SourceSpec
from tactician.ingest.sources.base import Message, SourceUnavailable, redact_url

log = logging.getLogger("tactician.ingest")
MAX_PREFETCH = 65_535


class RabbitSource:
    def __init__(self, spec: SourceSpec, clock: Clock = SYSTEM_CLOCK) -> None:
        assert spec.url is not None and spec.queue is not None  # the spec checked them
        self.name = spec.name
        self.url = spec.url
        self.queue = spec.queue
        self.prefetch = spec.prefetch or min(2 * spec.batch_size, MAX_PREFETCH)
        self.clock = clock
        self._received: deque[Message] = deque()
        self._unsettled: set[int] = set()
        """Delivery tags received and neither acked nor given back."""
        self._consumer: str | None = None
        self._connection: Any = None
        try:
            parameters = pika.URLParameters(spec.url)
            parameters.socket_timeout = 10
            parameters.blocked_connection_timeout = 60
            self._connection = pika.BlockingConnection(parameters)
            self._channel = self._connection.channel()
            self._channel.queue_declare(self.queue, durable=True)
            self._channel.basic_qos(prefetch_count=self.prefetch)
        except pika.exceptions.AMQPError as exc:
            self.close()
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: BaseException) -> SourceUnavailable:
        why = str(exc) or type(exc).__name__
        return SourceUnavailable(f"rabbitmq at {redact_url(self.url)}: {why}")

    def _on_message(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        headers = {str(k).lower(): _text(v) for k, v in (properties.headers or {}).items()}
        if properties.content_type:
            headers["content-type"] = str(properties.content_type)
        message_id = properties.message_id or None
        self._received.append(Message(message_id, body, headers, method.delivery_tag))
        self._unsettled.add(method.delivery_tag)

    def fetch(self, limit: int, timeout: float) -> list[Message]:
        try:
            if self._consumer is None:
                self._consumer = self._channel.basic_consume(
                    self.queue, on_message_callback=self._on_message, auto_ack=False
                )
            if not self._received:
                # Returns as soon as deliveries arrive (or at the time limit).
                self._connection.process_data_events(time_limit=timeout)
            if len(self._received) < limit:
                self._connection.process_data_events(time_limit=0)  # what else came along
        except pika.exceptions.AMQPError as exc:
            raise self._unavailable(exc) from None
        return [self._received.popleft() for _ in range(min(limit, len(self._received)))]

    def ack(self, messages: Sequence[Message]) -> None:
        self._settle(messages, self._channel.basic_ack)

    def release(self, messages: Sequence[Message]) -> None:
        self._settle(messages, self._requeue)

    def _requeue(self, tag: int, multiple: bool) -> None:
        self._channel.basic_nack(tag, multiple, requeue=True)

    def _settle(self, messages: Sequence[Message], settle: Callable[[int, bool], None]) -> None:
        """One frame for the batch (`multiple`) when no other delivery below its last tag is
        still unsettled, as is the rule for the runner's in-order batches; else one a message."""
        tags = {m.handle for m in messages}
        if not tags:
            return
        top = max(tags)
        try:
            if all(tag in tags for tag in self._unsettled if tag <= top):
                settle(top, True)
            else:
                for tag in sorted(tags):
                    settle(tag, False)
        except pika.exceptions.AMQPError as exc:
            raise self._unavailable(exc) from None
        self._unsettled -= tags

    def pause(self, seconds: float) -> None:
        try:
            self._stop_consuming()
            self._connection.sleep(seconds)  # answers heartbeats meanwhile
        except pika.exceptions.AMQPError as exc:
            raise self._unavailable(exc) from None

    def _stop_consuming(self) -> None:
        """Cancel the consumer; what it received and nobody took goes back to the queue (pika
        requeues the deliveries still in flight itself)."""
        if self._consumer is None:
            return
        consumer, self._consumer = self._consumer, None
        self._channel.basic_cancel(consumer)
        held, self._received = list(self._received), deque()
        self._settle(held, self._requeue)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None or not connection.is_open:
            return
        try:
            self._stop_consuming()
            connection.close()
        except pika.exceptions.AMQPError as exc:  # closing a broken connection: nothing lost
            log.debug("source %s: closing: %s", self.name, exc)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)
