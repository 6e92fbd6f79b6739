"""Configuration, read once at the edge (the composition root) and passed down frozen."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from tactician.errors import InvalidInput

DEFAULT_DB = "sqlite:///tactician.db"


@dataclass(frozen=True)
class Settings:
    db: str = DEFAULT_DB
    lease_seconds: float = 30.0
    """How long a worker's claim lasts without a heartbeat; the database's clock counts it."""
    dispatch_timeout: float = 60.0
    """How long capacity granted by the planner waits for a worker before it is taken back."""
    dispatch_ahead: int = 4000
    """At most this many granted-but-unclaimed tasks: the rest wait in `ready` so later urgent
    work can still overtake them."""
    plan_batch: int = 5000
    """Ready tasks the planner considers per tick."""
    poll_interval: float = 0.05
    """Idle wait between polls when nothing wakes the loop (LISTEN/NOTIFY on PostgreSQL)."""
    fencing: bool = True
    """Refuse results whose lease token is stale. Only the crash tests switch it off, to
    show that the check sees the fault."""
    sqlite_synchronous: str = "NORMAL"
    """NORMAL survives a kill -9 of any process (WAL); FULL also survives power loss."""
    scorer: str = "learned"
    """The decision service's scorer for the live planner: fifo, edf, wspt, atc, learned."""
    confidence_threshold: float = 0.3
    """Decisions less confident than this are escalated to tier 2 (when an advisor is set)."""
    refit_every: int = 0
    """Refit the predictors after this many new outcomes, and promote them if they beat the
    baselines (0: only `tactician train` fits)."""
    webhook_secrets: str = ""
    """Signed webhook sources, `source=secret,other=secret2` (TACTICIAN_WEBHOOK_SECRETS): an event
    for such a source must carry a valid HMAC signature instead of a bearer token."""
    log_format: str = "console"
    """json (for log shippers) or console (for a terminal): TACTICIAN_LOG_FORMAT."""
    log_level: str = "INFO"
    """TACTICIAN_LOG_LEVEL."""
    traces: str = "off"
    """OpenTelemetry traces: off, console (spans on stdout) or otlp (to a collector), through
    TACTICIAN_TRACES. Off costs nothing; an incoming traceparent is stored with its tasks
    either way."""
    otlp_endpoint: str = ""
    """The collector's OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces
    (TACTICIAN_OTLP_ENDPOINT); empty: the OpenTelemetry default (its OTEL_EXPORTER_OTLP_*
    variables, else http://localhost:4318/v1/traces)."""
    token: str = ""
    """The bearer token the CLI acts with (TACTICIAN_TOKEN); empty: none."""
    models_dir: str = ".tactician/models"
    """Where the model registry keeps versioned model sets (TACTICIAN_MODELS_DIR)."""
    metrics: bool = True
    """Count what only the planner's and workers' memory sees (decision latency, confidence,
    LLM use, rate-limit waits, dispatch latency...) for /metrics (TACTICIAN_METRICS). Off, each
    recording is one boolean test and nothing is flushed; /metrics still serves what the
    database holds."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then TACTICIAN_* variables, then explicit overrides (None is ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"TACTICIAN_{f.name.upper()}")
            if raw is None:
                continue
            values[f.name] = _convert(f.name, raw, type(getattr(cls(), f.name)))
        values |= {k: v for k, v in overrides.items() if v is not None}
        return replace(cls(), **values)


def _convert(name: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            if raw.lower() not in {"1", "0", "true", "false", "yes", "no"}:
                raise ValueError(raw)
            return raw.lower() in {"1", "true", "yes"}
        return kind(raw)
    except ValueError:
        raise InvalidInput(
            f"TACTICIAN_{name.upper()}={raw!r} is not a valid {kind.__name__}"
        ) from None


def redact_url(url: str) -> str:
    """A database or bus URL without its password, for logs and messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)
