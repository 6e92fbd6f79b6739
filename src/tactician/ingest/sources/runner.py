"""The loop that turns a bus's messages into committed tasks: fetch, read, commit, then ack.

Per batch: up to `batch_size` messages are fetched; each is read (convert.read_message) and made
into a task by the live bundle's templates; all tasks of the batch are committed in one
transaction; messages that cannot be read or that no template takes are kept as dead letters
with the reason; only then is the batch acknowledged. A process killed anywhere in between
leaves the batch unacknowledged on the bus, which delivers it again: its tasks are the same
tasks (the message id is their idempotency key), so a message is never lost and never becomes
two tasks. A refused message is acknowledged after its dead letter is kept, so it is not
delivered forever; a crash between the two can keep its dead letter twice (not on the outbox,
whose rows are deleted in the same transaction).

A template naming a kind no app registered is a configuration fault, not the message's: the
batch goes back to the bus and the source retries with backoff until the kind appears, rather
than dead-lettering every message.

Backpressure: past `max_pending` of the source's tasks not yet started, the source stops
pulling (the bus keeps the messages) until the count falls below it; each episode is logged
once and counted (`tactician_backpressure_total{source, action="slowed"}`). The count is read
at most twice a second and otherwise kept up to date by adding what the runner committed, so it
never underestimates what this process added; several processes on one source may overshoot
the bound by a batch each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tactician.clock import SYSTEM_CLOCK, Clock
from tactician.domain import NewTask
from tactician.errors import InvalidInput, StoreUnavailable, UnknownKind
from tactician.govern.policy import Template
from tactician.govern.roles import Actor, Role
from tactician.govern.sources import SourceSpec
from tactician.ingest.records import Resolution, Unmatched
from tactician.ingest.sources.base import Message, Source, SourceStalled, SourceUnavailable
from tactician.ingest.sources.convert import message_key, read_message
from tactician.ingest.templates import task_for
from tactician.observe import counters

log = logging.getLogger("tactician.ingest")

Submit = Callable[[Sequence[NewTask], Actor], list[str]]
Templates = Callable[[], Sequence[Template]]
RECOUNT_EVERY_S = 0.5


class SourceStore(Protocol):
    """What the runner needs of the store (every SqlStore has it)."""

    def db_now(self) -> float: ...

    def dead_letter(
        self,
        source: str,
        reason: str,
        body: bytes | str,
        headers: Mapping[str, str],
        *,
        actor: Actor = ...,
    ) -> str: ...

    def cancel_waiting(
        self, key_prefix: str, actor: Actor = ..., reason: str = ""
    ) -> list[str]: ...

    def unstarted_from(self, source: str, limit: int) -> int: ...


@dataclass(frozen=True)
class RunnerOptions:
    poll_timeout: float = 1.0
    """The longest wait for a message, so that a stop request is seen within it."""
    recheck_every: float = 0.5
    """While paused by backpressure, how often the pending count is read again."""
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    """Retries after the bus or the database failed, doubling from initial up to max."""


@dataclass
class RunnerStats:
    messages: int = 0
    tasks: int = 0
    dead_letters: int = 0
    pauses: int = 0
    failures: int = 0


@dataclass
class _Batch:
    tasks: list[NewTask] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    """For each task, the index of the message it came from."""
    refused: dict[int, str] = field(default_factory=dict)
    """Message index → why it was refused."""
    resolutions: list[Resolution] = field(default_factory=list)


@dataclass
class Link:
    """A source's connections, made (and after a failure remade) together: the bus, and the
    database the tasks are committed to (the outbox shares it)."""

    source: Source
    store: SourceStore
    submit: Submit
    templates: Templates
    close: Callable[[], None] = lambda: None
    """Closes the database side (the runner closes the source first)."""
    tick: Callable[[], None] = lambda: None
    """Called after every step (the command flushes its metric counters there)."""


class SourceRunner:
    """Runs one source until `stop()` holds; the batch in hand is finished first."""

    def __init__(
        self,
        spec: SourceSpec,
        connect: Callable[[], Link],
        *,
        options: RunnerOptions | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.spec = spec
        self.connect = connect
        self.options = options or RunnerOptions()
        self.clock = clock
        self.actor = Actor(f"source:{spec.name}", Role.OPERATOR)
        self.stats = RunnerStats()
        self.link: Link | None = None
        self._pending = 0
        self._counted_at: float | None = None
        self._paused_since: float | None = None
        self._backoff = self.options.backoff_initial
        self._warned_no_id = False

    # --- the loop ------------------------------------------------------------------------------

    def run(self, stop: Callable[[], bool]) -> RunnerStats:
        try:
            while not stop():
                try:
                    self.step()
                    self._backoff = self.options.backoff_initial
                except (SourceUnavailable, SourceStalled, StoreUnavailable) as exc:
                    self._failed(exc.message, stop)
        finally:
            self.close()
        return self.stats

    def step(self) -> int:
        """One batch (or one backpressure wait); returns the messages handled."""
        if self.link is None:
            self.link = self.connect()
        link = self.link
        room = self._room(link.store)
        if room <= 0:
            self._pause(link.source)
            link.tick()
            return 0
        self._resume()
        messages = link.source.fetch(min(self.spec.batch_size, room), self.options.poll_timeout)
        if messages:
            self.handle(link, messages)
        link.tick()
        return len(messages)

    def close(self) -> None:
        if self.link is None:
            return
        link, self.link = self.link, None
        try:
            link.source.close()
        except SourceUnavailable as exc:
            log.warning("source %s: closing: %s", self.spec.name, exc.message)
        finally:
            link.close()

    def _failed(self, why: str, stop: Callable[[], bool]) -> None:
        self.stats.failures += 1
        log.error("source %s: %s; retrying in %.1fs", self.spec.name, why, self._backoff)
        self.close()  # connect again: the bus gives unacknowledged messages out again
        deadline = self.clock.monotonic() + self._backoff
        while not stop() and (left := deadline - self.clock.monotonic()) > 0:
            self.clock.sleep(min(0.1, left))
        self._backoff = min(self._backoff * 2, self.options.backoff_max)

    # --- one batch -----------------------------------------------------------------------------

    def handle(self, link: Link, messages: Sequence[Message]) -> None:
        """Commit the batch's tasks and dead letters, then acknowledge it."""
        source, store = link.source, link.store
        try:
            batch = self._read(link, messages)
            self._commit(link, batch)
            for index, reason in sorted(batch.refused.items()):
                message = messages[index]
                store.dead_letter(
                    self.spec.name, reason, message.body, message.headers, actor=self.actor
                )
            for resolution in batch.resolutions:
                store.cancel_waiting(resolution.key_prefix, self.actor, "the alert resolved")
        except UnknownKind as exc:
            self._release(source, messages)
            raise SourceStalled(f"{exc.message}, which a template names: waiting for it") from None
        except BaseException:
            self._release(source, messages)
            raise
        source.ack(messages)
        self.stats.messages += len(messages)
        self.stats.dead_letters += len(batch.refused)

    def _release(self, source: Source, messages: Sequence[Message]) -> None:
        try:
            source.release(messages)
        except SourceUnavailable as exc:  # the bus gives them out again when it is back
            log.warning("source %s: giving a batch back: %s", self.spec.name, exc.message)

    def _read(self, link: Link, messages: Sequence[Message]) -> _Batch:
        batch = _Batch()
        templates = link.templates()
        now = link.store.db_now()
        for index, message in enumerate(messages):
            key = message_key(self.spec.type, self.spec.name, message)
            if key is None and not self._warned_no_id:
                self._warned_no_id = True
                log.warning(
                    "source %s: a message without an id: unless a template gives an "
                    "idempotency_key, a redelivery of it can make a second task",
                    self.spec.name,
                )
            try:
                if message.problem is not None:
                    raise InvalidInput(message.problem)
                tasks: list[NewTask] = []
                for item in read_message(message, self.spec.name, self.spec.format, key):
                    if isinstance(item, Resolution):
                        batch.resolutions.append(item)
                        continue
                    made = task_for(item, templates, now)
                    if isinstance(made, Unmatched):
                        raise InvalidInput(made.reason)
                    tasks.append(made)
            except InvalidInput as exc:
                batch.refused[index] = exc.message
                continue
            batch.tasks.extend(tasks)
            batch.owner.extend([index] * len(tasks))
        return batch

    def _commit(self, link: Link, batch: _Batch) -> None:
        """All tasks in one transaction; when the store refuses the batch as invalid, each
        message's tasks on their own, so only the messages at fault are dead-lettered."""
        if not batch.tasks:
            return
        try:
            link.submit(batch.tasks, self.actor)
            committed = len(batch.tasks)
        except UnknownKind:
            raise
        except InvalidInput:
            committed = 0
            for index in sorted(set(batch.owner)):
                tasks = [t for t, o in zip(batch.tasks, batch.owner, strict=True) if o == index]
                try:
                    link.submit(tasks, self.actor)
                    committed += len(tasks)
                except UnknownKind:
                    raise
                except InvalidInput as exc:
                    batch.refused[index] = exc.message
        self._pending += committed
        self.stats.tasks += committed

    # --- backpressure --------------------------------------------------------------------------

    def _room(self, store: SourceStore) -> int:
        """How many more tasks the source may make before it is over its bound."""
        now = self.clock.monotonic()
        stale = self._counted_at is None or now - self._counted_at >= RECOUNT_EVERY_S
        if stale or self._pending + self.spec.batch_size > self.spec.max_pending:
            self._pending = store.unstarted_from(self.spec.name, self.spec.max_pending)
            self._counted_at = now
        return self.spec.max_pending - self._pending

    def _pause(self, source: Source) -> None:
        if self._paused_since is None:
            self._paused_since = self.clock.monotonic()
            self.stats.pauses += 1
            log.warning(
                "source %s: %d tasks not started (max_pending %d): pausing, the bus keeps "
                "the messages",
                self.spec.name,
                self._pending,
                self.spec.max_pending,
            )
            counters.backpressure(self.spec.name, "slowed")
        self._counted_at = None  # read the count again after the wait
        source.pause(self.options.recheck_every)

    def _resume(self) -> None:
        if self._paused_since is not None:
            paused = self.clock.monotonic() - self._paused_since
            log.info("source %s: resuming after %.1fs of backpressure", self.spec.name, paused)
            self._paused_since = None
