"""Tier 2 over the wire: an LLM advisor asked in the background, which never blocks dispatch.

Any server that speaks the OpenAI-compatible chat-completions protocol will do: Ollama, vLLM,
the llama.cpp server, hosted APIs. `LLMAdvisor.advise` never raises: on a timeout, an HTTP
error, an answer that is not valid advice, an open circuit or a spent hourly budget it returns
the tier-1 decision with a note saying why. `BackgroundAdvisor` asks from a daemon thread and
hands the updated decision to a callback when the answer arrives.

    LLMAdvisor.advise(decision, request)
      ├── response cache (LRU)         a hit spends no budget and reaches no server
      ├── hourly budget                a sliding hour on the injected clock
      ├── circuit breaker              open after N failures in a row, one probe after cooldown
      └── POST {base_url}/chat/completions  ─▶  parse_advice ─▶ apply_advice
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import httpx

from tactician.clock import Clock
from tactician.decide.advice import (
    Advice,
    AdviceRequest,
    advice_from,
    apply_advice,
    build_request,
    cache_key,
    load_json,
    with_note,
)
from tactician.decide.decision import Decision
from tactician.domain import TargetState
from tactician.errors import InvalidInput
from tactician.observe import counters
from tactician.plan.flow import after_result, breaker_may_probe

log = logging.getLogger(__name__)

HOUR = 3600.0
MAX_RESPONSE_BYTES = 1_000_000
"""A chat completion holding one small JSON object is a few kilobytes; more is refused."""
ENV_PREFIX = "TACTICIAN_LLM_"


@dataclass(frozen=True, slots=True)
class AdvisorConfig:
    """Where the advisor is and how much of it may be used."""

    base_url: str
    """Up to and including the API version, e.g. http://localhost:11434/v1 for Ollama."""
    model: str
    api_key: str | None = None
    """Sent as `Authorization: Bearer …` when set; local servers usually need none."""
    timeout_s: float = 5.0
    """For each of connecting, sending and each wait for the answer's bytes."""
    hourly_budget: int = 100
    """Calls to the server in any hour (cache hits are free)."""
    cache_size: int = 256
    """Answers kept, least recently used first out (0: no cache)."""
    breaker_threshold: int = 3
    """Failures in a row that open the circuit."""
    breaker_cooldown_s: float = 60.0
    """How long an open circuit waits before one probe may pass."""
    max_tokens: int = 300

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise InvalidInput(f"LLM base URL {self.base_url!r} must start with http(s)://")
        if not self.model.strip():
            raise InvalidInput("the LLM model name is empty")
        if not self.timeout_s > 0:
            raise InvalidInput(f"LLM timeout {self.timeout_s} must be > 0 seconds")
        if self.hourly_budget < 0:
            raise InvalidInput(f"LLM hourly budget {self.hourly_budget} must be >= 0")
        if self.cache_size < 0:
            raise InvalidInput(f"LLM cache size {self.cache_size} must be >= 0")
        if self.breaker_threshold < 1:
            raise InvalidInput(f"LLM breaker threshold {self.breaker_threshold} must be >= 1")
        if not self.breaker_cooldown_s >= 0:
            raise InvalidInput(f"LLM breaker cooldown {self.breaker_cooldown_s} must be >= 0")
        if self.max_tokens < 1:
            raise InvalidInput(f"LLM max tokens {self.max_tokens} must be >= 1")

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/chat/completions"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AdvisorConfig:
        """From TACTICIAN_LLM_BASE_URL, _MODEL (both required), _API_KEY, _TIMEOUT,
        _HOURLY_BUDGET, _CACHE_SIZE, _BREAKER_THRESHOLD and _BREAKER_COOLDOWN."""

        def text(name: str) -> str | None:
            value = environ.get(ENV_PREFIX + name, "").strip()
            return value or None

        def required(name: str) -> str:
            value = text(name)
            if value is None:
                raise InvalidInput(f"{ENV_PREFIX}{name} is not set")
            return value

        def number(name: str, kind: Callable[[str], float | int]) -> dict[str, Any]:
            raw = text(name)
            if raw is None:
                return {}
            try:
                return {_FIELD_OF_ENV[name]: kind(raw)}
            except ValueError:
                expected = "an integer" if kind is int else "a number"
                raise InvalidInput(f"{ENV_PREFIX}{name}={raw!r} is not {expected}") from None

        return cls(
            base_url=required("BASE_URL"),
            model=required("MODEL"),
            api_key=text("API_KEY"),
            **number("TIMEOUT", float),
            **number("HOURLY_BUDGET", int),
            **number("CACHE_SIZE", int),
            **number("BREAKER_THRESHOLD", int),
            **number("BREAKER_COOLDOWN", float),
        )


_FIELD_OF_ENV = {
    "TIMEOUT": "timeout_s",
    "HOURLY_BUDGET": "hourly_budget",
    "CACHE_SIZE": "cache_size",
    "BREAKER_THRESHOLD": "breaker_threshold",
    "BREAKER_COOLDOWN": "breaker_cooldown_s",
}


class Failure(enum.StrEnum):
    """Why tier 1 stood: the keys of `AdvisorStats.failures`."""

    NOT_ASKED = "not_asked"
    """Nothing to ask: no action left to offer, or a payload that is not JSON."""
    BUDGET = "budget_spent"
    CIRCUIT_OPEN = "circuit_open"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    HTTP_STATUS = "http_status"
    MALFORMED = "malformed"
    """The answer, or the advice in it, is not JSON, or not the protocol's shape."""
    INVALID = "invalid"
    """JSON that does not match the advice schema."""
    CRASHED = "crashed"


@dataclass(frozen=True, slots=True)
class AdvisorStats:
    """Counters since start, for metrics."""

    calls: int = 0
    """Requests sent to the server."""
    advised: int = 0
    """Decisions the advice updated (cache hits included)."""
    cache_hits: int = 0
    failures: Mapping[str, int] = dataclasses.field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dropped: int = 0
    """Background requests refused because the queue was full or the advisor closed."""
    breaker: str = "closed"


class _Refused(Exception):
    """Tier 1 stands, for `failure`, with `note`."""

    def __init__(self, failure: Failure, note: str) -> None:
        super().__init__(note)
        self.failure = failure
        self.note = note


class LLMAdvisor:
    """Asks an LLM about escalated decisions; always answers, with tier 1 when it must.

    Safe to call from several threads: the lock guards the counters, cache, budget and breaker,
    never the HTTP call.
    """

    def __init__(
        self,
        config: AdvisorConfig,
        clock: Clock,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._http = httpx.Client(
            timeout=httpx.Timeout(config.timeout_s),
            headers=headers,
            transport=transport,
            follow_redirects=False,
        )
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, Advice] = collections.OrderedDict()
        self._spent: collections.deque[float] = collections.deque()
        self._breaker = TargetState(target="llm-advisor")
        self._calls = 0
        self._advised = 0
        self._cache_hits = 0
        self._failures: collections.Counter[str] = collections.Counter()
        self._prompt_tokens = 0
        self._completion_tokens = 0

    def advise(self, decision: Decision, request: AdviceRequest) -> Decision:
        """The decision updated by the advisor, or tier 1 with a note saying why it stands."""
        began = self._clock.monotonic()
        try:
            return self._advise(decision, request)
        except _Refused as refused:
            counters.inc(counters.LLM_FAILURES, reason=refused.failure.value)
            with self._lock:
                self._failures[refused.failure] += 1
            log.info("tier 1 stands for %s: %s", request.task_id, refused.note)
            return with_note(decision, refused.note)
        except Exception as exc:  # a crashing advisor abstains with a reason, never raises
            log.exception("advisor crashed on %s", request.task_id)
            counters.inc(counters.LLM_FAILURES, reason=Failure.CRASHED.value)
            with self._lock:
                self._failures[Failure.CRASHED] += 1
            return with_note(decision, f"advisor failed ({type(exc).__name__}); tier 1 stands")
        finally:
            counters.decision_latency(2, self._clock.monotonic() - began)

    def stats(self) -> AdvisorStats:
        with self._lock:
            return AdvisorStats(
                calls=self._calls,
                advised=self._advised,
                cache_hits=self._cache_hits,
                failures=MappingProxyType(dict(self._failures)),
                prompt_tokens=self._prompt_tokens,
                completion_tokens=self._completion_tokens,
                breaker=self._breaker.breaker,
            )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LLMAdvisor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the steps ---------------------------------------------------------------------------

    def _advise(self, decision: Decision, request: AdviceRequest) -> Decision:
        try:
            body = build_request(
                self.config.model, decision, request, max_tokens=self.config.max_tokens
            )
        except InvalidInput as exc:
            raise _Refused(
                Failure.NOT_ASKED, f"advisor not asked: {exc.message}; tier 1 stands"
            ) from None
        key = cache_key(body)
        advice = self._cached(key)
        if advice is None:
            self._admit()
            try:
                advice = self._ask(body)
            except BaseException:
                self._record(ok=False)
                raise
            self._record(ok=True)
            self._remember(key, advice)
        updated = apply_advice(
            decision, advice, request, self._clock.now(), model_version=self.config.model
        )
        with self._lock:
            self._advised += 1
        return updated

    def _cached(self, key: str) -> Advice | None:
        with self._lock:
            advice = self._cache.get(key)
            if advice is not None:
                self._cache.move_to_end(key)
                self._cache_hits += 1
            return advice

    def _remember(self, key: str, advice: Advice) -> None:
        if self.config.cache_size == 0:
            return
        with self._lock:
            self._cache[key] = advice
            self._cache.move_to_end(key)
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)

    def _admit(self) -> None:
        """Spend one call of the budget, or refuse: budget spent, or circuit open."""
        now = self._clock.now()
        with self._lock:
            while self._spent and self._spent[0] <= now - HOUR:
                self._spent.popleft()
            if len(self._spent) >= self.config.hourly_budget:
                raise _Refused(
                    Failure.BUDGET,
                    f"advisor hourly budget of {self.config.hourly_budget} calls spent; "
                    "tier 1 stands",
                )
            state = self._breaker
            if state.breaker == "half_open" or (
                state.breaker == "open"
                and not breaker_may_probe(state, now, self.config.breaker_cooldown_s)
            ):
                raise _Refused(
                    Failure.CIRCUIT_OPEN,
                    f"advisor circuit open after {state.consecutive_failures} failures in a "
                    "row; tier 1 stands",
                )
            if state.breaker == "open":  # the cooldown is over: this call is the one probe
                self._breaker = dataclasses.replace(state, breaker="half_open")
            self._spent.append(now)
            self._calls += 1
        counters.inc(counters.LLM_CALLS)

    def _record(self, *, ok: bool) -> None:
        now = self._clock.now()
        with self._lock:
            self._breaker = after_result(
                self._breaker,
                ok=ok,
                overloaded=False,
                latency=0.0,
                now=now,
                threshold=self.config.breaker_threshold,
                max_concurrency=None,
            )

    def _ask(self, body: dict[str, Any]) -> Advice:
        content = self._content(self._post(body))
        try:
            parsed = load_json(content)
        except InvalidInput as exc:
            raise _Refused(
                Failure.MALFORMED, f"advisor's advice is {exc.message}; tier 1 stands"
            ) from None
        try:
            return advice_from(parsed)
        except InvalidInput as exc:
            raise _Refused(
                Failure.INVALID, f"advisor's answer rejected: {exc.message}; tier 1 stands"
            ) from None

    def _post(self, body: dict[str, Any]) -> str:
        """The body of a 200 answer, read within `timeout_s` in all and `MAX_RESPONSE_BYTES`.

        httpx's timeout bounds each wait for bytes; the deadline also bounds a server that
        trickles them.
        """
        timed_out = _Refused(
            Failure.TIMEOUT, f"advisor timed out after {self.config.timeout_s:g} s; tier 1 stands"
        )
        deadline = self._clock.monotonic() + self.config.timeout_s
        try:
            with self._http.stream("POST", self.config.url, json=body) as response:
                if response.status_code != 200:
                    raise _Refused(
                        Failure.HTTP_STATUS,
                        f"advisor answered HTTP {response.status_code}; tier 1 stands",
                    )
                received = bytearray()
                for chunk in response.iter_bytes():
                    received += chunk
                    if len(received) > MAX_RESPONSE_BYTES:
                        raise _Refused(
                            Failure.MALFORMED,
                            f"advisor's response exceeds {MAX_RESPONSE_BYTES} bytes; tier 1 stands",
                        )
                    if self._clock.monotonic() > deadline:
                        raise timed_out
        except httpx.TimeoutException:
            raise timed_out from None
        except httpx.HTTPError as exc:
            raise _Refused(
                Failure.UNREACHABLE, f"advisor unreachable ({type(exc).__name__}); tier 1 stands"
            ) from None
        try:
            return received.decode("utf-8")  # JSON travels as UTF-8 (RFC 8259)
        except UnicodeDecodeError:
            raise _Refused(
                Failure.MALFORMED, "advisor's response is not UTF-8; tier 1 stands"
            ) from None

    def _content(self, text: str) -> str:
        """The assistant's message in a chat completion; counts the tokens it reports."""
        try:
            envelope = load_json(text)
        except InvalidInput as exc:
            raise _Refused(
                Failure.MALFORMED, f"advisor's response is {exc.message}; tier 1 stands"
            ) from None
        usage = envelope.get("usage") if isinstance(envelope, dict) else None
        if isinstance(usage, dict):
            prompt = _count(usage.get("prompt_tokens"))
            completion = _count(usage.get("completion_tokens"))
            counters.inc(counters.LLM_TOKENS, prompt, type="prompt")
            counters.inc(counters.LLM_TOKENS, completion, type="completion")
            with self._lock:
                self._prompt_tokens += prompt
                self._completion_tokens += completion
        try:
            message = envelope["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            message = None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            refused = isinstance(message, dict) and message.get("refusal")
            what = "a refusal" if refused else "no choices[0].message.content"
            raise _Refused(Failure.MALFORMED, f"advisor's response has {what}; tier 1 stands")
        return content


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


OnAdvice = Callable[[Decision], None]


class BackgroundAdvisor:
    """Asks an `LLMAdvisor` from a daemon thread, so that dispatch never waits for an LLM.

    `submit` never blocks: with the queue full it refuses and counts a drop, and the tier-1
    decision simply stands. `on_advice` runs on the advisor's thread; if it raises, the error
    is logged and the next request is served.
    """

    def __init__(self, advisor: LLMAdvisor, *, queue_size: int = 64) -> None:
        if queue_size < 1:
            raise InvalidInput(f"advisor queue size {queue_size} must be >= 1")
        self.advisor = advisor
        self._queue: queue.Queue[tuple[Decision, AdviceRequest, OnAdvice] | None] = queue.Queue(
            queue_size
        )
        self._lock = threading.Lock()
        self._closed = False
        self._dropped = 0
        self._thread = threading.Thread(target=self._serve, name="tactician-advisor", daemon=True)
        self._thread.start()

    def submit(self, decision: Decision, request: AdviceRequest, on_advice: OnAdvice) -> bool:
        """Queue a question; False (and a drop counted) when the queue is full or closed."""
        with self._lock:
            if not self._closed:
                try:
                    self._queue.put_nowait((decision, request, on_advice))
                    return True
                except queue.Full:
                    counters.backpressure("llm_advisor", "refused")
            self._dropped += 1
            return False

    def stats(self) -> AdvisorStats:
        with self._lock:
            dropped = self._dropped
        return dataclasses.replace(self.advisor.stats(), dropped=dropped)

    def close(self, timeout: float | None = None) -> None:
        """Stop: questions still queued are dropped; a call under way finishes first (up to
        `timeout` seconds of waiting for it). Does not close the `LLMAdvisor`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
                self._dropped += 1
            self._queue.put_nowait(None)  # submit is shut out, so there is room
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundAdvisor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            decision, request, on_advice = item
            updated = self.advisor.advise(decision, request)
            try:
                on_advice(updated)
            except Exception:  # one broken callback is logged, not fatal to the advisor
                log.exception("advice callback failed for %s", request.task_id)
