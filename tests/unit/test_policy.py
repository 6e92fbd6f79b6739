"""Policy bundles: a full bundle parses, versions ignore formatting, diffs show meaning, and
every kind of bad bundle is refused with one line naming file, line and field."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from tactician.domain import RateLimit
from tactician.errors import InvalidInput
from tactician.govern.approvals import RuleSpec
from tactician.govern.policy import (
    DEFAULT_BUNDLE,
    ApprovalRule,
    BundleError,
    bundle_version,
    canonical_json,
    diff_bundles,
    parse_bundle,
)
from tactician.run.gate import rule_spec

FULL = """\
name: incidents-prod
description: on-call rules
objective:
  scorer: learned
  weight_exponent: 1.0
  optimism: 0.5
  lst: 0.25
  max_wait: 2h
  reserve: true
  fair_share:
    shares: {ops: 2, analytics: 1}
    weight: 1.5
    half_life: 30m
thresholds: {confidence: 0.4, ood: 2.5}
pools:
  drivers: 5
  api: null
limits:
  deliver: {rate: "10/s", burst: 5, max_concurrency: 4, concurrency_key: "{customer}"}
channels:
  leads: {type: slack, url: "http://127.0.0.1:9/hook"}
  director: {type: email, to: [boss@example.com]}
approvals:
  - name: sensitive-fixes
    match:
      kinds: [remediate]
      tags: [prod]
      sensitive: true
      actions: [run, defer]
      confidence_below: 0.5
      impact_above: 100
      tenants: [acme]
    approvers: {roles: [approver], groups: [sre]}
    required: 2
    expires_after: 2h
    escalation:
      - {after: 30m, notify: leads}
      - {after: 3600, notify: director}
    on_expiry: approve
    editable: [due_at, weight, payload.region]
    offline: approve
templates:
  - name: alert-to-fix
    source: alertmanager
    match: {alertname: DiskFull, severity: 2}
    task:
      kind: remediate
      payload: {host: "{labels.instance}", retries: [1, 2]}
      due_in: 15m
      weight: 2.0
      tags: [prod]
      idempotency_key: "{fingerprint}"
models:
  default: 3f2a9c1b
"""


def test_a_full_bundle_parses_every_field() -> None:
    bundle = parse_bundle(FULL)
    assert (bundle.name, bundle.description) == ("incidents-prod", "on-call rules")
    objective = bundle.objective
    assert (objective.scorer, objective.weight_exponent, objective.optimism, objective.lst) == (
        "learned",
        1.0,
        0.5,
        0.25,
    )
    assert objective.max_wait == 7200.0
    assert objective.reserve and not DEFAULT_BUNDLE.objective.reserve
    assert objective.fair_share is not None
    fair = objective.fair_share
    assert (fair.shares, fair.weight, fair.half_life) == (
        {"ops": 2.0, "analytics": 1.0},
        1.5,
        1800.0,
    )
    assert DEFAULT_BUNDLE.objective.fair_share is None
    assert DEFAULT_BUNDLE.objective.max_wait is None
    assert (bundle.thresholds.confidence, bundle.thresholds.ood) == (0.4, 2.5)
    assert bundle.pools == {"drivers": 5, "api": None}
    limits = bundle.limits["deliver"]
    assert (limits.rate, limits.burst, limits.max_concurrency) == ("10/s", 5.0, 4)
    assert limits.concurrency_key == "{customer}"
    assert limits.rate_limit == RateLimit(per_second=10.0, burst=5.0)
    assert bundle.channels["director"] == {"type": "email", "to": ["boss@example.com"]}
    (rule,) = bundle.approvals
    match = rule.match
    assert (match.kinds, match.tags, match.tenants) == (("remediate",), ("prod",), ("acme",))
    assert (match.sensitive, match.actions) == (True, ("run", "defer"))
    assert (match.confidence_below, match.impact_above) == (0.5, 100.0)
    assert (rule.approvers.roles, rule.approvers.groups) == (("approver",), ("sre",))
    assert (rule.required, rule.expires_after, rule.on_expiry, rule.offline) == (
        2,
        7200.0,
        "approve",
        "approve",
    )
    assert [(s.after, s.notify) for s in rule.escalation] == [
        (1800.0, "leads"),
        (3600.0, "director"),
    ]
    assert rule.editable == ("due_at", "weight", "payload.region")
    (template,) = bundle.templates
    assert (template.name, template.source) == ("alert-to-fix", "alertmanager")
    assert template.match == {"alertname": "DiskFull", "severity": 2}
    task = template.task
    assert task.kind == "remediate"
    assert task.payload == {"host": "{labels.instance}", "retries": [1, 2]}
    assert (task.due_in, task.weight, task.tags) == (900.0, 2.0, ("prod",))
    assert task.idempotency_key == "{fingerprint}"
    assert bundle.models == {"default": "3f2a9c1b"}


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("30s", 30.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        ("45", 45.0),
        ("0.5", 0.5),
    ],
)
def test_durations_become_seconds(written: str, seconds: float) -> None:
    text = (
        f"name: t\ntemplates:\n  - {{name: a, source: s, task: {{kind: k, due_in: {written}}}}}\n"
    )
    assert parse_bundle(text).templates[0].task.due_in == seconds


def test_the_default_bundle_is_builtin_with_defaults_everywhere() -> None:
    assert parse_bundle("name: builtin\n") == DEFAULT_BUNDLE
    assert DEFAULT_BUNDLE.objective.scorer == "learned"
    assert (DEFAULT_BUNDLE.thresholds.confidence, DEFAULT_BUNDLE.thresholds.ood) == (0.3, None)
    assert DEFAULT_BUNDLE.approvals == () and DEFAULT_BUNDLE.pools == {}


def test_the_version_ignores_comments_spacing_key_order_and_spelling() -> None:
    respelled = (
        FULL.replace(
            "thresholds: {confidence: 0.4, ood: 2.5}",
            "thresholds:\n  ood: 2.5   # tuned\n  confidence: 0.4",
        )
        .replace("expires_after: 2h", "expires_after: 7200")
        .replace("name: incidents-prod\n", "# incidents\n\nname:   'incidents-prod'\n")
    )
    assert bundle_version(FULL) == bundle_version(respelled)
    assert (
        bundle_version(FULL)
        == hashlib.sha256(canonical_json(parse_bundle(FULL)).encode()).hexdigest()
    )
    assert len(bundle_version(FULL)) == 64
    assert bundle_version(FULL) != bundle_version(
        FULL.replace("confidence: 0.4", "confidence: 0.45")
    )
    assert bundle_version(FULL) != bundle_version(FULL.replace("required: 2", "required: 3"))


def test_a_field_written_at_its_default_does_not_change_the_version() -> None:
    """So a field the schema gains later, defaulting to today's behaviour, leaves the versions
    of the bundles already deployed as they were."""
    plain = "name: calm\nobjective: {scorer: edf}\n"
    spelled_out = "name: calm\nobjective: {scorer: edf, reserve: false, max_wait: null}\n"
    assert bundle_version(plain) == bundle_version(spelled_out)
    assert bundle_version(plain) != bundle_version(plain.replace("edf}", "edf, reserve: true}"))
    assert canonical_json(parse_bundle(plain)) == '{"name":"calm","objective":{"scorer":"edf"}}'


def test_canonical_json_is_sorted_and_compact() -> None:
    text = canonical_json(parse_bundle("name: t\npools: {b: 2, a: 1}\n"))
    assert '"pools":{"a":1,"b":2}' in text and ": " not in text


def test_diff_is_empty_for_the_same_meaning_and_shows_changed_lines() -> None:
    assert (
        diff_bundles(FULL, FULL.replace("expires_after: 2h", "expires_after: 120m") + "# end\n")
        == ""
    )
    text = diff_bundles(FULL, FULL.replace("required: 2", "required: 3"), "live", "new.yaml")
    assert text.startswith("--- live\n+++ new.yaml\n")
    changed = [
        line for line in text.splitlines() if line[:1] in "+-" and line[:3] not in ("---", "+++")
    ]
    assert changed == ["-  required: 2", "+  required: 3"]


def test_diff_names_the_bad_side() -> None:
    with pytest.raises(BundleError, match=r"^new\.yaml:1: name: is required$"):
        diff_bundles(FULL, "pools: {}\n", "live", "new.yaml")


def test_cross_field_checks_hold_for_models_built_in_code_too() -> None:
    with pytest.raises(ValidationError, match="must be before expires_after"):
        ApprovalRule.model_validate(
            {
                "name": "r",
                "match": {"kinds": ["x"]},
                "approvers": {"roles": ["admin"]},
                "expires_after": "1h",
                "escalation": [{"after": "2h", "notify": "leads"}],
            }
        )


RULE = """\
name: t
channels: {leads: {type: slack, url: "http://127.0.0.1:9/x"}}
approvals:
  - name: r
    match: {kinds: [fix]}
    approvers: {roles: [approver]}
"""
TEMPLATE = "name: t\ntemplates:\n  - name: a\n    source: s\n    task:\n      kind: k\n"

BAD = {
    "yaml syntax": (
        "name: t\napprovals: [\n",
        "3: syntax: expected the node content, but found '<stream end>'",
    ),
    "yaml indent": ("name: t\n  bad: indent\n", "2: syntax: mapping values are not allowed here"),
    "two documents": (
        "name: t\n---\nname: u\n",
        "2: syntax: expected a single document in the stream, but found another document",
    ),
    "control character": (
        "name: t\n\x07\n",
        "2: syntax: unacceptable character #x0007: special characters are not allowed",
    ),
    "python tag": (
        "name: !!python/object:os.system t\n",
        "1: syntax: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object:os.system'",
    ),
    "top-level list": ("- name: t\n", "1: (top level): must be a mapping of fields, not a list"),
    "empty file": ("# nothing\n", "1: (top level): must be a mapping of fields, not empty"),
    "duplicate key": ("name: t\npools: {a: 1}\npools: {b: 2}\n", "3: pools: is given twice"),
    "unknown top-level key": ("name: t\nscorers: {}\n", "2: scorers: unknown field"),
    "unknown nested key": (
        "name: t\nobjective:\n  scorer: edf\n  speed: 3\n",
        "4: objective.speed: unknown field",
    ),
    "missing name": ("# a comment\n\ndescription: x\n", "3: name: is required"),
    "negative share": (
        "name: t\nobjective:\n  fair_share:\n    shares: {a: -1}\n",
        "4: objective.fair_share.shares.a: must be > 0",
    ),
    "bad name": (
        "name: Not Valid\n",
        "1: name: must be 1 to 64 characters of a-z, 0-9, '.', '_' or '-'",
    ),
    "number for text": ("name: 123\n", "1: name: must be text (put it in quotes)"),
    "bad scorer": (
        "name: t\nobjective: {scorer: magic}\n",
        "2: objective.scorer: must be one of 'fifo', 'edf', 'wspt', 'atc' or 'learned', "
        "not 'magic'",
    ),
    "broken concurrency key": (
        "name: t\nlimits:\n  deliver: {concurrency_key: '{customer'}\n",
        "3: limits.deliver.concurrency_key: is not a key template like '{customer}': "
        "expected '}' before end of string",
    ),
    "positional concurrency key": (
        "name: t\nlimits:\n  deliver: {concurrency_key: 'c-{}'}\n",
        "3: limits.deliver.concurrency_key: names payload fields in braces, like '{customer}'",
    ),
    "reserve not a boolean": (
        "name: t\nobjective: {reserve: maybe}\n",
        "2: objective.reserve: must be true or false",
    ),
    "wrong type": (
        "name: t\nthresholds: {confidence: high}\n",
        "2: thresholds.confidence: must be a number",
    ),
    "fraction above 1": (
        "name: t\nthresholds:\n  confidence: 1.5\n",
        "3: thresholds.confidence: must be <= 1",
    ),
    "ood zero": ("name: t\nthresholds: {ood: 0}\n", "2: thresholds.ood: must be > 0"),
    "negative pool": ("name: t\npools: {drivers: -1}\n", "2: pools.drivers: must be >= 0"),
    "fractional pool": (
        "name: t\npools:\n  drivers: 2.5\n",
        "3: pools.drivers: must be a whole number",
    ),
    "pool as text": (
        "name: t\npools:\n  drivers: '5'\n",
        "3: pools.drivers: must be a whole number",
    ),
    "bad rate": (
        "name: t\nlimits:\n  deliver: {rate: fast}\n",
        "3: limits.deliver.rate: rate 'fast' is not like '10/s', '100/m' or '5/h'",
    ),
    "burst without rate": (
        "name: t\nlimits:\n  deliver:\n    burst: 5\n",
        "4: limits.deliver.burst: a burst needs a rate",
    ),
    "required < 1": (RULE + "    required: 0\n", "7: approvals[0].required: must be >= 1"),
    "required as bool": (
        RULE + "    required: yes\n",
        "7: approvals[0].required: must be a whole number",
    ),
    "bad duration": (
        RULE + "    expires_after: soon\n",
        "7: approvals[0].expires_after: must be a duration like 30s, 15m, 2h, 1d or a number of "
        "seconds",
    ),
    "negative duration": (
        RULE + "    expires_after: -5\n",
        "7: approvals[0].expires_after: must be > 0",
    ),
    "duplicate rule name": (
        RULE + "  - name: r\n    match: {kinds: [x]}\n    approvers: {roles: [admin]}\n",
        "7: approvals[1].name: 'r' is already the name of approvals[0]",
    ),
    "escalation not increasing": (
        RULE + "    escalation:\n      - {after: 1h, notify: leads}\n"
        "      - {after: 30m, notify: leads}\n",
        "9: approvals[0].escalation[1].after: must be later than the previous step (1h)",
    ),
    "escalation after expiry": (
        RULE + "    expires_after: 1h\n    escalation: [{after: 2h, notify: leads}]\n",
        "8: approvals[0].escalation[0].after: must be before expires_after (1h)",
    ),
    "escalation at expiry": (
        RULE
        + "    expires_after: 1h\n    escalation:\n      - after: 3600\n        notify: leads\n",
        "9: approvals[0].escalation[0].after: must be before expires_after (1h)",
    ),
    "undefined channel": (
        RULE + "    escalation: [{after: 1h, notify: boss}]\n",
        "7: approvals[0].escalation[0].notify: channel 'boss' is not defined in channels (leads)",
    ),
    "empty match": (
        "name: t\napprovals:\n  - name: r\n    match: {}\n    approvers: {roles: [approver]}\n",
        "4: approvals[0].match: needs at least one condition (kinds, tags, tenants, sensitive, "
        "actions, confidence_below or impact_above)",
    ),
    "empty condition list": (
        RULE.replace("{kinds: [fix]}", "\n      kinds: []"),
        "6: approvals[0].match.kinds: must have at least 1 entry",
    ),
    "bad action": (
        RULE.replace("{kinds: [fix]}", "{actions: [launch]}"),
        "5: approvals[0].match.actions[0]: must be one of 'run', 'defer', 'merge', 'escalate' or "
        "'hold', not 'launch'",
    ),
    "sensitive as text": (
        RULE.replace("{kinds: [fix]}", "{sensitive: 'yes'}"),
        "5: approvals[0].match.sensitive: must be true or false",
    ),
    "yaml 1.1 boolean": (
        RULE.replace("{kinds: [fix]}", "{tenants: [no]}"),
        "5: approvals[0].match.tenants[0]: must be text (put it in quotes)",
    ),
    "bad editable field": (
        RULE + "    editable: [weight, payload]\n",
        "7: approvals[0].editable[1]: 'payload' is not editable: use due_at, weight or "
        "payload.<name>",
    ),
    "nobody approves": (
        "name: t\napprovals:\n  - name: r\n    match: {kinds: [x]}\n    approvers: {}\n",
        "5: approvals[0].approvers: needs at least one role or group",
    ),
    "unknown role": (
        RULE.replace("[approver]", "[boss]"),
        "6: approvals[0].approvers.roles[0]: must be one of 'viewer', 'operator', 'approver' or "
        "'admin', not 'boss'",
    ),
    "missing approvers": (
        "name: t\napprovals:\n  - name: r\n    match: {kinds: [x]}\n",
        "3: approvals[0].approvers: is required",
    ),
    "bad on_expiry": (
        RULE + "    on_expiry: maybe\n",
        "7: approvals[0].on_expiry: must be one of 'reject' or 'approve', not 'maybe'",
    ),
    "bad offline": (
        RULE + "    offline: later\n",
        "7: approvals[0].offline: must be one of 'hold', 'approve' or 'reject', not 'later'",
    ),
    "approvals not a list": ("name: t\napprovals: {a: 1}\n", "2: approvals: must be a list"),
    "duplicate template name": (
        TEMPLATE + "  - {name: a, source: s, task: {kind: k}}\n",
        "7: templates[1].name: 'a' is already the name of templates[0]",
    ),
    "template match not scalar": (
        TEMPLATE + "    match: {x: [1]}\n",
        "7: templates[0].match.x: must be a single value (text, number, true/false or null)",
    ),
    "payload not json": (
        TEMPLATE + "      payload:\n        x: {y: .nan}\n",
        "8: templates[0].task.payload.x.y: must be a finite number",
    ),
    "payload date": (
        TEMPLATE + "      payload: {when: 2024-01-01}\n",
        "7: templates[0].task.payload.when: must be JSON data (text, numbers, true/false, null, "
        "lists, mappings)",
    ),
    "channel refers to itself": (
        "name: t\nchannels: &a\n  x: *a\n",
        "3: channels.x.x.x: must not contain itself",
    ),
    "channel not a mapping": (
        "name: t\nchannels:\n  x: slack\n",
        "3: channels.x: must be a mapping",
    ),
    "bad model hash": (
        "name: t\nmodels: {default: xyz}\n",
        "2: models.default: must be 8 to 64 lowercase hex digits (a sha256 prefix)",
    ),
    "int key": ("name: t\npools:\n  5: 3\n", "3: pools.5: key must be text (put it in quotes)"),
}


@pytest.mark.parametrize("offline", ["hold", "approve", "reject"])
def test_an_edge_site_holds_approves_or_rejects_while_offline(offline: str) -> None:
    bundle = parse_bundle(RULE + f"    offline: {offline}\n")
    spec = rule_spec(bundle.approvals[0])
    assert spec.offline == offline
    assert RuleSpec.from_json(spec.to_json()) == spec  # as kept in each approval it opens
    assert parse_bundle(RULE).approvals[0].offline == "hold"


@pytest.mark.parametrize(("text", "expected"), list(BAD.values()), ids=list(BAD))
def test_a_bad_bundle_names_file_line_and_field(text: str, expected: str) -> None:
    with pytest.raises(BundleError) as error:
        parse_bundle(text, "policy.yaml")
    assert error.value.message == f"policy.yaml:{expected}"
    assert isinstance(error.value, InvalidInput)
    line, field, _ = expected.split(": ", 2)
    assert (error.value.filename, error.value.line, error.value.field) == (
        "policy.yaml",
        int(line),
        field,
    )
