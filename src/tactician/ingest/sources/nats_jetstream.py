"""NATS JetStream: a durable pull consumer, acknowledged after the commit.

Messages are pulled in batches from the durable consumer `durable` (default `tactician`, explicit
acks, created on first use with `ack_wait`); one not acknowledged within `ack_wait` (the process
died) is delivered again, to this process or another on the same durable. The message id is the
publisher's `Nats-Msg-Id` header when it set one (JetStream's own duplicate window uses it too),
else the stream sequence. When no stream takes the subject, a file-storage stream named
`stream` (default: the source's name) is created for it.

nats-py is asyncio; the source runs its client on an event loop in a thread of its own, so the
connection keeps answering the server's pings while the runner commits or waits. A pull request
that the server answers just as a fetch gives up leaves at most a batch in the client's buffer:
the next fetch takes it, and while the source is paused by backpressure JetStream counts it as
delivered and not acknowledged (redelivered after `ack_wait`, the same tasks by their keys).

Durability is the broker's: nats-server 2.9 (Debian's, on the development and CI machines, run
as `nats-server -js -sd /var/lib/nats-server` without a config file) writes file-storage streams
to the operating system at once but fsyncs them on its own timer (every two minutes; 2.9 has no
`sync_interval` setting, which 2.10 added with `always`). So an acknowledged publish survives a
crash of the ingest process (what the tests kill) but not necessarily a power loss or an
operating-system crash within that window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType

from tactician.clock import SYSTEM_CLOCK, Clock
from tactician.govern.sources import SourceSpec
from tactician.ingest.sources.base import Message, SourceUnavailable, redact_url

log = logging.getLogger("tactician.ingest")
T = TypeVar("T")
DEFAULT_DURABLE = "tactician"
DEFAULT_ACK_WAIT_S = 30.0
CALL_MARGIN_S = 10.0
"""How much longer than its own timeout a call on the client's loop may take."""


class NatsSource:
    def __init__(self, spec: SourceSpec, clock: Clock = SYSTEM_CLOCK) -> None:
        assert spec.url is not None and spec.subject is not None  # the spec checked them
        self.name = spec.name
        self.url = spec.url
        self.subject = spec.subject
        self.stream = spec.stream
        self.durable = spec.durable or DEFAULT_DURABLE
        self.ack_wait = spec.ack_wait or DEFAULT_ACK_WAIT_S
        self.clock = clock
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"nats-{spec.name}", daemon=True
        )
        self._thread.start()
        self._client: Client | None = None
        try:
            self._subscription = self._call(self._connect(), 30.0)
        except BaseException:
            self.close()
            raise

    def _call(self, work: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `work` on the client's loop and wait for it; failures are SourceUnavailable."""
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result(timeout + CALL_MARGIN_S)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            future.cancel()
            why = str(exc) or type(exc).__name__
            raise SourceUnavailable(f"nats at {redact_url(self.url)}: {why}") from None

    async def _connect(self) -> Any:
        async def report(exc: Exception) -> None:
            log.warning("source %s: nats: %s", self.name, exc)

        self._client = await nats.connect(
            self.url,
            connect_timeout=5,
            # A lost connection ends the client; the runner connects again with backoff, and
            # JetStream redelivers what was not acknowledged.
            allow_reconnect=False,
            max_reconnect_attempts=1,  # and a server that is down fails the first connect soon
            reconnect_time_wait=1,
            error_cb=report,
        )
        js = self._client.jetstream()
        stream = self.stream
        if stream is None:
            try:
                stream = await js.find_stream_name_by_subject(self.subject)
            except nats.js.errors.NotFoundError:
                stream = self.name
        try:
            await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            log.info("source %s: creating stream %s for %s", self.name, stream, self.subject)
            await js.add_stream(name=stream, subjects=[self.subject], storage=StorageType.FILE)
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            deliver_policy=DeliverPolicy.ALL,
        )
        return await js.pull_subscribe(
            self.subject, durable=self.durable, stream=stream, config=config
        )

    def fetch(self, limit: int, timeout: float) -> list[Message]:
        return self._call(self._fetch(limit, max(timeout, 0.01)), timeout)

    async def _fetch(self, limit: int, timeout: float) -> list[Message]:
        try:
            got: list[Msg] = await self._subscription.fetch(batch=limit, timeout=timeout)
        except TimeoutError:  # nats.errors.TimeoutError or asyncio's: nothing came
            return []
        return [_message(msg) for msg in got]

    def ack(self, messages: Sequence[Message]) -> None:
        self._call(self._settle(messages, ack=True), 5.0)

    def release(self, messages: Sequence[Message]) -> None:
        self._call(self._settle(messages, ack=False), 5.0)

    async def _settle(self, messages: Sequence[Message], *, ack: bool) -> None:
        for message in messages:
            msg: Msg = message.handle
            await (msg.ack() if ack else msg.nak())
        assert self._client is not None
        await self._client.flush(timeout=5)

    def pause(self, seconds: float) -> None:
        self.clock.sleep(seconds)  # the loop thread keeps the connection alive meanwhile

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and not client.is_closed:
            try:
                self._call(client.close(), 5.0)
            except SourceUnavailable as exc:
                log.warning("source %s: closing: %s", self.name, exc.message)
        if self._thread.is_alive():
            with contextlib.suppress(TimeoutError):
                asyncio.run_coroutine_threadsafe(_cancel_tasks(), self._loop).result(5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()


async def _cancel_tasks() -> None:
    """End what the client left running (a connect that failed leaves its tasks behind)."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _message(msg: Msg) -> Message:
    headers = {name.lower(): value for name, value in (msg.headers or {}).items()}
    message_id = headers.get("nats-msg-id") or str(msg.metadata.sequence.stream)
    return Message(message_id, msg.data, headers, msg)
