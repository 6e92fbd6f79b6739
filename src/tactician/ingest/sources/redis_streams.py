"""Redis Streams: a consumer group, XREADGROUP, XACK after the commit, XAUTOCLAIM of the dead's.

Each stream entry is one message; its `field` (default `body`) holds the event and its other
fields come along as headers. The entry id is the message id. The group is created at the
stream's start (id 0) if it does not exist, so entries added before the first run are taken too.

A consumer that dies leaves its entries pending in the group. Every `claim_idle / 2` seconds the
source claims entries idle longer than `claim_idle` (XAUTOCLAIM), whoever holds them, and takes
them as its own; `claim_idle` must be longer than a batch ever takes, or a slow but living
consumer's entries are taken too (their tasks are still one task each: the key dedupes). A
consumer name that is reused (`consumer:` in the spec) also reads its own pending entries first
when it starts. Consumers left with nothing pending are deleted from the group on the way.

Durability is Redis's: the development and CI machines run Redis with no persistence at all, so a
restart of Redis loses what it held; with AOF `appendfsync always` an entry that XADD answered
survives it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import redis

from tactician.clock import SYSTEM_CLOCK, Clock
from tactician.govern.sources import SourceSpec
from tactician.ingest.sources.base import Message, SourceUnavailable, redact_url

log = logging.getLogger("tactician.ingest")
DEFAULT_GROUP = "tactician"
DEFAULT_FIELD = "body"
DEFAULT_CLAIM_IDLE_S = 30.0
SOCKET_TIMEOUT_S = 30.0
"""Longer than any BLOCK the source asks for."""


def _text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


class RedisStreamSource:
    def __init__(self, spec: SourceSpec, clock: Clock = SYSTEM_CLOCK) -> None:
        assert spec.url is not None and spec.stream is not None  # the spec checked them
        self.name = spec.name
        self.stream = spec.stream
        self.group = spec.group or DEFAULT_GROUP
        self.consumer = spec.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = int((spec.claim_idle or DEFAULT_CLAIM_IDLE_S) * 1000)
        self.field = (spec.field or DEFAULT_FIELD).encode()
        self.clock = clock
        self._read_own_pending = True
        self._claim_from = "0-0"
        self._next_claim = 0.0
        try:
            self.client = redis.Redis.from_url(
                spec.url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=5.0
            )
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):  # the group exists: that is fine
                raise SourceUnavailable(f"redis: {exc}") from None
        except redis.RedisError as exc:
            raise SourceUnavailable(f"redis at {redact_url(spec.url)}: {exc}") from None

    def fetch(self, limit: int, timeout: float) -> list[Message]:
        try:
            if self._read_own_pending:
                entries = self._read("0", limit, None)
                if entries:
                    return entries
                self._read_own_pending = False
            if self.clock.monotonic() >= self._next_claim:
                claimed = self._claim(limit)
                if claimed:
                    return claimed
            return self._read(">", limit, max(1, int(timeout * 1000)))
        except redis.RedisError as exc:
            raise SourceUnavailable(f"redis: {exc}") from None

    def _read(self, start: str, limit: int, block_ms: int | None) -> list[Message]:
        reply: Any = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=limit, block=block_ms
        )
        if not reply:
            return []
        _, entries = reply[0]
        # Reading our own pending entries (start "0") gives deleted entries as (id, None).
        return [self._message(entry_id, fields) for entry_id, fields in entries if fields]

    def _claim(self, limit: int) -> list[Message]:
        """Entries a dead consumer left pending, taken over (a pass over the pending list)."""
        reply: Any = self.client.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=self._claim_from,
            count=limit,
        )
        next_from, entries = reply[0], reply[1]
        self._claim_from = _text(next_from) if isinstance(next_from, bytes) else str(next_from)
        if self._claim_from == "0-0":  # a whole pass done: look again in a while
            self._next_claim = self.clock.monotonic() + self.claim_idle_ms / 2000
            self._forget_idle_consumers()
        messages = [self._message(entry_id, fields) for entry_id, fields in entries if fields]
        if messages:
            log.info("source %s: claimed %d pending entries", self.name, len(messages))
        return messages

    def _forget_idle_consumers(self) -> None:
        consumers: Any = self.client.xinfo_consumers(self.stream, self.group)
        for consumer in consumers:
            name = consumer["name"]
            name = _text(name) if isinstance(name, bytes) else str(name)
            if name != self.consumer and int(consumer["pending"]) == 0:
                self.client.xgroup_delconsumer(self.stream, self.group, name)

    def _message(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Message:
        entry = _text(entry_id)
        headers = {_text(k).lower(): _text(v) for k, v in fields.items() if k != self.field}
        body = fields.get(self.field)
        if body is None:
            problem = f"the stream entry has no field {_text(self.field)!r}"
            return Message(entry, _entry_text(fields), headers, entry, problem)
        return Message(entry, body, headers, entry)

    def ack(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        try:
            self.client.xack(self.stream, self.group, *(m.handle for m in messages))
        except redis.RedisError as exc:
            raise SourceUnavailable(f"redis: {exc}") from None

    def release(self, messages: Sequence[Message]) -> None:
        self._read_own_pending = True  # they stay pending under our name: read them again

    def pause(self, seconds: float) -> None:
        self.clock.sleep(seconds)  # nothing is held here: unread entries stay in the stream

    def close(self) -> None:
        self.client.close()


def _entry_text(fields: dict[bytes, bytes]) -> bytes:
    return b"\n".join(k + b"=" + v for k, v in fields.items())
