"""Policy bundles: one YAML file of objective, thresholds, pools, limits, approval rules,
ingestion templates and pinned models, deployed and rolled back as a unit.

`parse_bundle` validates a file and reports the first problem on one line, as
`policy.yaml:14: approvals[0].required: must be >= 1`: pydantic checks the data, and the
error's field path is walked back through the YAML nodes to find its line. A bundle's version
is the hash of its canonical JSON, so comments, layout, key order and the spelling of a
duration ("2h" or 7200) do not change it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
import string
from collections.abc import Collection, Mapping, Sequence
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from tactician.domain import KindSpec, RateLimit
from tactician.errors import InvalidInput
from tactician.govern.audit import canonical_json as _canonical
from tactician.govern.sources import Sources

Path = tuple[str | int, ...]


class BundleError(InvalidInput):
    """The policy bundle is not valid."""

    def __init__(self, filename: str, line: int, field: str, problem: str) -> None:
        super().__init__(f"{filename}:{line}: {field}: {problem}")
        self.filename = filename
        self.line = line
        self.field = field
        self.problem = problem


def _fail(message: str, *at: str | int) -> PydanticCustomError:
    """A validation error whose field path goes `at` further than where it was raised, so a
    cross-field check can point at the exact entry (and so the exact line) at fault."""
    return PydanticCustomError("policy", "{message}", {"message": message, "at": at})


_NAME = re.compile(r"[a-z0-9._-]{1,64}")
_HEX = re.compile(r"[0-9a-f]{8,64}")
_EDITABLE = re.compile(r"due_at|weight|payload\.[A-Za-z_][A-Za-z0-9_]*")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise _fail("must be 1 to 64 characters of a-z, 0-9, '.', '_' or '-'")
    return value


def _hex(value: str) -> str:
    if not _HEX.fullmatch(value):
        raise _fail("must be 8 to 64 lowercase hex digits (a sha256 prefix)")
    return value


def _editable(value: str) -> str:
    if not _EDITABLE.fullmatch(value):
        raise _fail(f"{value!r} is not editable: use due_at, weight or payload.<name>")
    return value


def _seconds(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and (found := _DURATION.fullmatch(value)):
        return float(found[1]) * _UNIT[found[2]]
    raise _fail("must be a duration like 30s, 15m, 2h, 1d or a number of seconds")


def _span(seconds: float) -> str:
    """A duration as the bundle would spell it: 1800 -> '30m'."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _rate(value: str) -> str:
    try:
        RateLimit.parse(value)
    except InvalidInput as exc:
        raise _fail(exc.message) from None
    return value


def _key_template(value: str) -> str:
    """A concurrency key: text with payload fields in braces, like '{customer}'."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
    except ValueError as exc:
        raise _fail(f"is not a key template like '{{customer}}': {exc}") from None
    for name in fields:
        if not name or name.isdigit():
            raise _fail("names payload fields in braces, like '{customer}'")
    return value


def _json_problem(value: object, path: Path, within: frozenset[int]) -> tuple[Path, str] | None:
    """Where `value` stops being JSON data, and why: canonical JSON has no NaN, no dates, only
    text keys, and no YAML alias that contains itself (`within`: the containers above)."""
    if id(value) in within:
        return path, "must not contain itself"
    if isinstance(value, float) and not math.isfinite(value):
        return path, "must be a finite number"
    if value is None or isinstance(value, str | bool | int | float):
        return None
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        entries: list[tuple[str | int, object]] = list(value.items())
    elif isinstance(value, list):
        entries = list(enumerate(value))
    else:
        return path, "must be JSON data (text, numbers, true/false, null, lists, mappings)"
    for key, item in entries:
        if found := _json_problem(item, (*path, key), within | {id(value)}):
            return found
    return None


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    if found := _json_problem(value, (), frozenset()):
        raise _fail(found[1], *found[0])
    return value


def _scalar(value: object) -> object:
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise _fail("must be a single value (text, number, true/false or null)")


Name = Annotated[str, AfterValidator(_name)]
NonNegative = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]
Duration = Annotated[float, BeforeValidator(_seconds), Field(gt=0, allow_inf_nan=False)]
"""Seconds; the bundle may write "30s", "15m", "2h", "1d" or a number."""
Texts = Annotated[tuple[str, ...], Field(min_length=1)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_json_object)]
Scorer = Literal["fifo", "edf", "wspt", "atc", "learned"]
Action = Literal["run", "defer", "merge", "escalate", "hold"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FairShareSpec(_Model):
    """Slurm's fair-share factor per tenant (see decide.shares): a tenant that used more than
    its share of the recent unit-seconds slides back in the order, one that used less comes
    forward."""

    shares: dict[str, Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]]
    """Tenant → its share (relative weights); a tenant not listed has none."""
    weight: Annotated[float, Strict(), Field(ge=0, le=10)] = 0.5
    """How far the factor moves a task, in fractions of the whole order (0: not at all)."""
    half_life: Duration = 3600.0
    """Usage halves every this long."""


class ObjectiveSpec(_Model):
    """The scorer and what the learned scorer trades off (see decide.learned.Objective)."""

    scorer: Scorer = "learned"
    weight_exponent: NonNegative = 0.0
    optimism: Fraction = 0.0
    lst: Fraction = 0.5
    max_wait: Duration | None = None
    """Aging: a task released longer ago than this goes before every task that was not,
    oldest first, and if it does not fit it holds its pool until it starts (no task starves,
    a wide one included). None: no bound."""
    fair_share: FairShareSpec | None = None
    reserve: Annotated[bool, Strict()] = False
    """EASY backfilling in the live planner: the first task of a full pool gets a reservation
    at the time the running tasks' expected ends free its units, and a later task starts before
    it only if it is expected to end by then or fits in the units it leaves spare."""


class Thresholds(_Model):
    confidence: Fraction = 0.3
    """A decision less confident than this is escalated."""
    ood: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)] | None = None
    """A task whose numeric features are further than this from the models' training rows
    (mean squared z-score) is out of distribution, and its decision is escalated. None: the
    limit each model set was trained with (1.5 x its training rows' 99.9th percentile)."""


class KindLimits(_Model):
    """What the bundle sets for one kind, over what its code declared (`limited`)."""

    rate: Annotated[str, AfterValidator(_rate)] | None = None
    burst: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)] | None = None
    max_concurrency: Annotated[int, Strict(), Field(ge=1)] | None = None
    concurrency_key: Annotated[str, AfterValidator(_key_template)] | None = None

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> Self:
        if self.burst is not None and self.rate is None:
            raise _fail("a burst needs a rate", "burst")
        return self

    @property
    def rate_limit(self) -> RateLimit | None:
        return None if self.rate is None else RateLimit.parse(self.rate, self.burst)


def limited(
    kinds: Mapping[str, KindSpec],
    limits: Mapping[str, KindLimits],
    leased: Collection[str] = (),
) -> Mapping[str, KindSpec]:
    """`kinds` with the bundle's `limits` in place of what their code declared: a rate (with
    its burst), a concurrency ceiling, a concurrency key; what a limit leaves out stays as
    declared, and a limit for a kind not among `kinds` is ignored. The kinds in `leased` keep
    their rate: an edge agent spends tokens the centre lends for them (tactician.agent)."""
    if not limits:
        return kinds
    result = dict(kinds)
    for name, limit in limits.items():
        spec = result.get(name)
        if spec is None:
            continue
        changes: dict[str, Any] = {}
        if limit.rate is not None and name not in leased:
            changes["rate"] = limit.rate_limit
        if limit.max_concurrency is not None:
            changes["max_concurrency"] = limit.max_concurrency
        if limit.concurrency_key is not None:
            changes["concurrency_key"] = limit.concurrency_key
        result[name] = dataclasses.replace(spec, **changes)
    return result


class RuleMatch(_Model):
    """Conditions that must all hold; a condition left out is not looked at."""

    kinds: Texts = ()
    tags: Texts = ()
    """The task has all of these tags."""
    tenants: Texts = ()
    sensitive: Annotated[bool, Strict()] | None = None
    actions: Annotated[tuple[Action, ...], Field(min_length=1)] = ()
    confidence_below: Fraction | None = None
    impact_above: Annotated[float, Strict(), Field(allow_inf_nan=False)] | None = None
    """Predicted impact: weight x predicted lateness cost."""

    @model_validator(mode="after")
    def _some_condition(self) -> Self:
        if all(getattr(self, name) in ((), None) for name in type(self).model_fields):
            raise _fail(
                "needs at least one condition (kinds, tags, tenants, sensitive, actions, "
                "confidence_below or impact_above)"
            )
        return self


class Approvers(_Model):
    roles: tuple[Literal["viewer", "operator", "approver", "admin"], ...] = ()
    groups: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _someone(self) -> Self:
        if not self.roles and not self.groups:
            raise _fail("needs at least one role or group")
        return self


class EscalationStep(_Model):
    after: Duration
    notify: str
    """A channel of the bundle."""


class ApprovalRule(_Model):
    name: Annotated[str, Field(min_length=1, max_length=100)]
    match: RuleMatch
    approvers: Approvers
    required: Annotated[int, Strict(), Field(ge=1)] = 1
    expires_after: Duration = 86_400.0
    escalation: tuple[EscalationStep, ...] = ()
    on_expiry: Literal["reject", "approve"] = "reject"
    editable: tuple[Annotated[str, AfterValidator(_editable)], ...] = ()
    offline: Literal["hold", "approve", "reject"] = "hold"
    """What an edge agent does with a pending approval while it cannot reach the centre (so no
    approver can answer): hold it (it waits, and expires as `on_expiry` says), or approve or
    reject it in the site's name (tactician.agent.approvals)."""

    @model_validator(mode="after")
    def _escalation_in_order(self) -> Self:
        previous = 0.0
        for index, step in enumerate(self.escalation):
            if step.after <= previous:
                raise _fail(
                    f"must be later than the previous step ({_span(previous)})",
                    *("escalation", index, "after"),
                )
            if step.after >= self.expires_after:
                raise _fail(
                    f"must be before expires_after ({_span(self.expires_after)})",
                    *("escalation", index, "after"),
                )
            previous = step.after
        return self


class TaskTemplate(_Model):
    """The task an event becomes; strings may carry {dotted.path} placeholders."""

    kind: Annotated[str, Field(min_length=1)]
    payload: JsonObject = Field(default_factory=dict)
    due_in: Duration | None = None
    weight: NonNegative | None = None
    tags: tuple[str, ...] = ()
    idempotency_key: str | None = None


class Template(_Model):
    name: Annotated[str, Field(min_length=1, max_length=100)]
    source: Annotated[str, Field(min_length=1)]
    match: dict[str, Annotated[Any, AfterValidator(_scalar)]] = Field(default_factory=dict)
    """Event fields that must be equal to these values."""
    task: TaskTemplate


HeuristicScorer = Literal["fifo", "edf", "wspt", "atc"]


class DriftSpec(_Model):
    """What a detected drift does (tactician.observe.drift finds it; run.drift acts on it).

    A detection is always audited and counted; with `notify` it is also sent to that channel.
    With `fallback`, the decision service switches to the `scorer` heuristic and the `confirm`
    rule (if any) sends the automated actions it matches to a person for confirmation, until an
    operator clears the drift (`tactician drift clear`).
    """

    watch: Annotated[bool, Strict()] = True
    """Run the detectors (ADWIN on the duration error and the miss rate, PSI on features)."""
    fallback: Annotated[bool, Strict()] = False
    scorer: HeuristicScorer = "edf"
    """The conservative tier while the fallback is engaged: a heuristic, no learned model."""
    confirm: ApprovalRule | None = None
    """While the fallback is engaged, ready tasks this rule matches wait for its approvers."""
    notify: str | None = None
    """A channel of the bundle told of each detection."""
    delta: Annotated[float, Strict(), Field(gt=0, lt=1)] = 0.0001
    """ADWIN's confidence: smaller means fewer false alarms and later detections."""
    psi_threshold: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)] = 0.25
    """Population stability index above which a feature has drifted."""


SERVED_MODELS = "default"
"""The model set of a bundle's `models` that the decision service serves, when pinned."""


class PolicyBundle(_Model):
    name: Name
    description: str | None = None
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    pools: dict[str, Annotated[int, Strict(), Field(ge=0)] | None] = Field(default_factory=dict)
    """Capacity per pool; null is unbounded."""
    limits: dict[str, KindLimits] = Field(default_factory=dict)
    """Per task kind."""
    channels: dict[str, JsonObject] = Field(default_factory=dict)
    """Notification channels, checked by the notifier."""
    approvals: tuple[ApprovalRule, ...] = ()
    """In order: the first rule that matches applies."""
    templates: tuple[Template, ...] = ()
    models: dict[str, Annotated[str, AfterValidator(_hex)]] = Field(default_factory=dict)
    """Pinned model version per model set: a sha256 hex prefix. The decision service serves
    the one under SERVED_MODELS; an edge agent is sent them all."""
    drift: DriftSpec = Field(default_factory=DriftSpec)
    sources: Sources = ()
    """Buses `tactician ingest` pulls events from (tactician.govern.sources)."""

    @model_validator(mode="after")
    def _references(self) -> Self:
        names = {
            "approvals": [rule.name for rule in self.approvals],
            "templates": [template.name for template in self.templates],
        }
        for field, listed in names.items():
            for index, name in enumerate(listed):
                if (first := listed.index(name)) < index:
                    message = f"{name!r} is already the name of {field}[{first}]"
                    raise _fail(message, field, index, "name")
        known = ", ".join(sorted(self.channels)) or "none"
        rules: list[tuple[tuple[str | int, ...], ApprovalRule]] = [
            (("approvals", index), rule) for index, rule in enumerate(self.approvals)
        ]
        if self.drift.confirm is not None:
            rules.append((("drift", "confirm"), self.drift.confirm))
        for where, rule in rules:
            for step_index, step in enumerate(rule.escalation):
                if step.notify not in self.channels:
                    raise _fail(
                        f"channel {step.notify!r} is not defined in channels ({known})",
                        *where,
                        *("escalation", step_index, "notify"),
                    )
        if self.drift.notify is not None and self.drift.notify not in self.channels:
            raise _fail(
                f"channel {self.drift.notify!r} is not defined in channels ({known})",
                *("drift", "notify"),
            )
        return self


DEFAULT_BUNDLE = PolicyBundle(name="builtin")
"""The policy in force before any bundle was deployed."""


def parse_bundle(text: str, filename: str = "policy.yaml") -> PolicyBundle:
    """The bundle in `text`; raises BundleError naming the file, line and field at fault."""
    root, data = _load(text, filename)
    if root is None or not isinstance(data, dict):
        what = "empty" if root is None else f"a {type(data).__name__}"
        raise BundleError(filename, 1, "(top level)", f"must be a mapping of fields, not {what}")
    _refuse_duplicate_keys(root, filename)
    try:
        return PolicyBundle.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        path: Path = (*error["loc"], *error.get("ctx", {}).get("at", ()))
        problem = _problem(error)
        if path[-1:] == ("[key]",):  # a mapping's key is at fault, not its value
            path, problem = (*path[:-2], str(path[-2])), f"key {problem}"
        raise BundleError(filename, _line(root, path), _dotted(path), problem) from None


def canonical_json(bundle: PolicyBundle) -> str:
    """The bundle as sorted, compact JSON: what its version is the hash of. Fields at their
    default are left out, so a field added to the schema later (with a default that keeps
    today's behaviour) does not change the version of a bundle that does not use it."""
    return _canonical(bundle.model_dump(mode="json", exclude_defaults=True))


def bundle_version(text: str, filename: str = "policy.yaml") -> str:
    """SHA-256 hex of the canonical JSON: the same for any spelling of the same policy."""
    return hashlib.sha256(canonical_json(parse_bundle(text, filename)).encode()).hexdigest()


def diff_bundles(old_text: str, new_text: str, old_name: str = "old", new_name: str = "new") -> str:
    """A unified diff of what the two bundles mean (canonical YAML); empty when equal."""
    old = _canonical_yaml(parse_bundle(old_text, old_name)).splitlines(keepends=True)
    new = _canonical_yaml(parse_bundle(new_text, new_name)).splitlines(keepends=True)
    return "".join(difflib.unified_diff(old, new, fromfile=old_name, tofile=new_name))


def _canonical_yaml(bundle: PolicyBundle) -> str:
    data = bundle.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=True, allow_unicode=True, default_flow_style=False)


def _load(text: str, filename: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (for lines) and the plain data built from it, with safe_load's rules."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)
        root = loader.get_single_node()
        return root, None if root is None else loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "not valid YAML"
        if problem.startswith("but ") and exc.context:  # "expected a single document, but …"
            problem = f"{exc.context}, {problem}"
        raise BundleError(
            filename, 1 if mark is None else mark.line + 1, "syntax", problem
        ) from None
    except yaml.reader.ReaderError as exc:  # a control character: found before any mark
        line = text.count("\n", 0, exc.position) + 1
        raise BundleError(filename, line, "syntax", str(exc).splitlines()[0]) from None
    except RecursionError:  # PyYAML's composer recurses once per level of nesting
        raise BundleError(filename, 1, "syntax", "nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _refuse_duplicate_keys(root: yaml.Node, filename: str) -> None:
    # PyYAML keeps the last of two equal keys; a second `approvals:` would drop rules silently.
    todo: list[tuple[yaml.Node, Path]] = [(root, ())]
    visited: set[int] = set()  # an alias repeats a node, and may even contain itself
    while todo:
        node, path = todo.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in keys:
                        line = key.start_mark.line + 1
                        raise BundleError(
                            filename, line, _dotted((*path, key.value)), "is given twice"
                        )
                    keys.add(key.value)
                todo.append((value, (*path, str(key.value))))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend((item, (*path, index)) for index, item in enumerate(node.value))


def _line(root: yaml.Node, path: Sequence[str | int]) -> int:
    """The line of the field at `path`: its key's line, or for an entry of a list the entry's;
    where the path runs out (a missing field), the line of the deepest part found."""
    node, line = root, root.start_mark.line + 1
    for part in path:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    child, line = value, key.start_mark.line + 1
                    break
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _dotted(path: Sequence[str | int]) -> str:
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)
    return text.removeprefix(".") or "(top level)"


_PROBLEMS = {
    "missing": "is required",
    "extra_forbidden": "unknown field",
    "finite_number": "must be a finite number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "string_too_short": "must not be empty",
    "recursion_loop": "must not contain itself",
}
_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def _problem(error: ErrorDetails) -> str:
    """Pydantic's message, said the way the rest of Tactician says it."""
    kind, ctx, given = error["type"], error.get("ctx", {}), error["input"]
    if kind in _PROBLEMS:
        return _PROBLEMS[kind]
    if kind == "policy":
        return str(ctx["message"])
    if kind == "string_type":
        scalar = given is None or isinstance(given, bool | int | float) or hasattr(given, "year")
        return "must be text (put it in quotes)" if scalar else "must be text"
    if kind in ("literal_error", "enum"):
        got = f", not {given!r}" if isinstance(given, str) else ""
        return f"must be one of {ctx['expected']}{got}"
    if kind in _BOUNDS:
        sign, bound = _BOUNDS[kind]
        return f"must be {sign} {ctx[bound]:g}"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} entry"
    message = error["msg"].removeprefix("Input should ").removeprefix("Value error, ")
    return message[:1].lower() + message[1:]
