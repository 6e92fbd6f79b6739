"""Policy bundles: one YAML file that says how Tactician decides, deployed as a unit.

A bundle names the scorer and its objective, the confidence and out-of-distribution
thresholds, pools and per-kind limits, notification channels, approval rules, event→task
templates and the model versions it pins. `parse_bundle` validates it and reports the first
problem as one line, `file:line: field.path: what is wrong`, using the YAML nodes' positions.
A bundle's version is the SHA-256 of its canonical JSON, so comments, spacing and key order
do not change it.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from tactician.domain import RateLimit
from tactician.errors import InvalidInput
from tactician.govern.audit import canonical_json

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_EDITABLE = re.compile(r"^(due_at|weight|payload\.[A-Za-z_][A-Za-z0-9_]*)$")


class BundleError(InvalidInput):
    """The policy bundle is not valid."""


def _seconds(value: Any) -> Any:
    """ "30s", "15m", "2h", "1d" or a number of seconds, as float seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like 30s, 15m, 2h, 1d or seconds")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must be >= 0")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError("must be a duration like 30s, 15m, 2h, 1d or seconds")


Seconds = Annotated[float, BeforeValidator(_seconds)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ObjectiveSpec(_Model):
    scorer: Literal["fifo", "edf", "wspt", "atc", "learned"] = "learned"
    weight_exponent: float = Field(default=0.0, ge=0)
    optimism: float = Field(default=0.0, ge=0, le=1)
    lst: float = Field(default=0.5, ge=0, le=1)


class Thresholds(_Model):
    confidence: float = Field(default=0.3, ge=0, le=1)
    ood: float = Field(default=3.0, gt=0)


class KindLimits(_Model):
    rate: str | None = None
    burst: float | None = Field(default=None, gt=0)
    max_concurrency: int | None = Field(default=None, ge=1)
    concurrency_key: str | None = None

    @model_validator(mode="after")
    def _rate(self) -> KindLimits:
        if self.rate is not None:
            try:
                RateLimit.parse(self.rate, self.burst)
            except InvalidInput as exc:
                raise ValueError(exc.message) from None
        return self


class RuleMatch(_Model):
    kinds: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    sensitive: bool | None = None
    actions: tuple[Literal["run", "defer", "merge", "escalate", "hold"], ...] = ()
    confidence_below: float | None = Field(default=None, ge=0, le=1)
    impact_above: float | None = None

    @model_validator(mode="after")
    def _some(self) -> RuleMatch:
        if not any(getattr(self, name) not in ((), None) for name in type(self).model_fields):
            raise ValueError("a match needs at least one condition")
        return self


class Approvers(_Model):
    roles: tuple[Literal["viewer", "operator", "approver", "admin"], ...] = ()
    groups: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _someone(self) -> Approvers:
        if not self.roles and not self.groups:
            raise ValueError("name at least one role or group")
        return self


class EscalationStep(_Model):
    after: Seconds
    notify: str


class ApprovalRule(_Model):
    name: str = Field(min_length=1, max_length=100)
    match: RuleMatch
    approvers: Approvers
    required: int = Field(default=1, ge=1)
    expires_after: Seconds = 86_400.0
    escalation: tuple[EscalationStep, ...] = ()
    on_expiry: Literal["reject", "approve"] = "reject"
    editable: tuple[str, ...] = ()
    offline: Literal["hold", "approve"] = "hold"

    @model_validator(mode="after")
    def _steps(self) -> ApprovalRule:
        previous = 0.0
        for step in self.escalation:
            if step.after <= previous:
                raise ValueError("escalation steps must come strictly later one after another")
            previous = step.after
        if previous >= self.expires_after:
            raise ValueError("every escalation step must come before expires_after")
        for name in self.editable:
            if not _EDITABLE.match(name):
                raise ValueError(f"editable {name!r}: due_at, weight or payload.<name>")
        return self


class TaskTemplate(_Model):
    kind: str = Field(min_length=1)
    payload: dict[str, Any] = Field(default_factory=dict)
    due_in: Seconds | None = None
    weight: float | None = Field(default=None, ge=0)
    tags: tuple[str, ...] = ()
    idempotency_key: str | None = None


class Template(_Model):
    name: str = Field(min_length=1)
    source: str = Field(min_length=1)
    match: dict[str, str | int | float | bool] = Field(default_factory=dict)
    task: TaskTemplate


class PolicyBundle(_Model):
    name: str = Field(pattern=r"^[a-z0-9._-]{1,64}$")
    description: str | None = None
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    pools: dict[str, Annotated[int, Field(ge=0)] | None] = Field(default_factory=dict)
    limits: dict[str, KindLimits] = Field(default_factory=dict)
    channels: dict[str, dict[str, Any]] = Field(default_factory=dict)
    approvals: tuple[ApprovalRule, ...] = ()
    templates: tuple[Template, ...] = ()
    models: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{8,64}$")]] = Field(
        default_factory=dict
    )


def _references(bundle: PolicyBundle) -> tuple[tuple[Any, ...], str] | None:
    """The first name that clashes or points nowhere: its location and the problem."""
    names = {
        "approvals": [r.name for r in bundle.approvals],
        "templates": [t.name for t in bundle.templates],
    }
    for what, listed in names.items():
        for i, name in enumerate(listed):
            if name in listed[:i]:
                return (what, i, "name"), f"another entry is already named {name!r}"
    for i, rule in enumerate(bundle.approvals):
        for j, step in enumerate(rule.escalation):
            if step.notify not in bundle.channels:
                place = ("approvals", i, "escalation", j, "notify")
                return place, f"{step.notify!r} is not a channel of this bundle"
    return None


DEFAULT_BUNDLE = PolicyBundle(name="builtin")
"""What decides when no bundle was ever deployed."""


def parse_bundle(text: str, filename: str = "policy.yaml") -> PolicyBundle:
    """The bundle in `text`, or BundleError naming file, line and field."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BundleError(f"{filename}:{line}: not valid YAML: {problem}") from None
    if not isinstance(data, dict) or root is None:
        raise BundleError(f"{filename}:1: a bundle is a mapping of fields (name, approvals, ...)")
    try:
        bundle = PolicyBundle.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = tuple(error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        line = _line(root, loc, error["type"])
        raise BundleError(f"{filename}:{line}: {_path(loc) or '(bundle)'}: {message}") from None
    problem = _references(bundle)
    if problem is not None:
        loc, message = problem
        raise BundleError(f"{filename}:{_line(root, loc, '')}: {_path(loc)}: {message}")
    return bundle


def _path(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not str(part).startswith(("function-", "constrained-", "int", "none")):
            text += f".{part}" if text else str(part)
    return text


def _line(node: Any, loc: Sequence[Any], kind: str) -> int:
    """The line of the YAML node at `loc` (for a missing field, its parent's)."""
    line: int = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    line = int((key if kind == "extra_forbidden" else value).start_mark.line) + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = int(node.start_mark.line) + 1
        else:
            return line
    return line


def canonical_bundle(bundle: PolicyBundle) -> str:
    return canonical_json(bundle.model_dump(mode="json"))


def bundle_version(text: str) -> str:
    """SHA-256 of the bundle's canonical JSON: blind to comments, spacing and key order."""
    return hashlib.sha256(canonical_bundle(parse_bundle(text)).encode()).hexdigest()


def _sorted_yaml(text: str) -> list[str]:
    data = parse_bundle(text).model_dump(mode="json", exclude_defaults=True)
    dumped: str = yaml.safe_dump(data, sort_keys=True, default_flow_style=False)
    return dumped.splitlines(keepends=True)


def diff_bundles(old_text: str, new_text: str, old_name: str = "old", new_name: str = "new") -> str:
    """A unified diff of the two bundles' normalised YAML; empty when they mean the same."""
    return "".join(
        difflib.unified_diff(_sorted_yaml(old_text), _sorted_yaml(new_text), old_name, new_name)
    )
