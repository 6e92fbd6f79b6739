"""Policy bundles: a full bundle parses, versions ignore formatting, diffs show meaning, and
every kind of bad bundle is refused with one line naming file, line and field."""

from __future__ import annotations

import pytest

from tactician.govern.policy import (
    DEFAULT_BUNDLE,
    BundleError,
    bundle_version,
    diff_bundles,
    parse_bundle,
)

FULL = """\
name: incidents-prod
description: on-call rules
objective:
  scorer: learned
  weight_exponent: 1.0
  optimism: 0.5
  lst: 0.25
thresholds: {confidence: 0.4, ood: 2.5}
pools:
  drivers: 5
  api: null
limits:
  deliver: {rate: "10/s", burst: 5, max_concurrency: 4, concurrency_key: "{customer}"}
channels:
  leads: {type: slack, url: "http://127.0.0.1:9/hook"}
approvals:
  - name: sensitive-fixes
    match:
      kinds: [remediate]
      tags: [prod]
      sensitive: true
      actions: [run]
      confidence_below: 0.5
      impact_above: 100
      tenants: [acme]
    approvers: {roles: [approver], groups: [sre]}
    required: 2
    expires_after: 2h
    escalation:
      - {after: 30m, notify: leads}
      - {after: 3600, notify: leads}
    on_expiry: approve
    editable: [due_at, weight, payload.region]
templates:
  - name: alert-to-fix
    source: alertmanager
    match: {alertname: DiskFull}
    task:
      kind: remediate
      payload: {host: "{labels.instance}"}
      due_in: 15m
      weight: 2.0
      tags: [prod]
      idempotency_key: "{fingerprint}"
models:
  default: 3f2a9c1b
"""


def test_a_full_bundle_parses_with_durations_in_seconds() -> None:
    bundle = parse_bundle(FULL)
    assert bundle.objective.scorer == "learned" and bundle.objective.lst == 0.25
    assert bundle.thresholds.confidence == 0.4
    assert bundle.pools == {"drivers": 5, "api": None}
    assert bundle.limits["deliver"].max_concurrency == 4
    (rule,) = bundle.approvals
    assert rule.expires_after == 7200.0
    assert [s.after for s in rule.escalation] == [1800.0, 3600.0]
    assert rule.match.kinds == ("remediate",) and rule.match.impact_above == 100
    assert rule.approvers.groups == ("sre",) and rule.required == 2
    assert bundle.templates[0].task.due_in == 900.0
    assert bundle.models == {"default": "3f2a9c1b"}


def test_the_version_ignores_comments_spacing_and_key_order() -> None:
    reordered = FULL.replace(
        "thresholds: {confidence: 0.4, ood: 2.5}",
        "# tuned\nthresholds:   {ood: 2.5, confidence: 0.4}",
    )
    assert bundle_version(FULL) == bundle_version(reordered)
    changed = FULL.replace("confidence: 0.4", "confidence: 0.45")
    assert bundle_version(FULL) != bundle_version(changed)
    assert len(bundle_version(FULL)) == 64


def test_diff_shows_only_what_changes() -> None:
    assert diff_bundles(FULL, FULL + "\n# a comment\n") == ""
    text = diff_bundles(FULL, FULL.replace("required: 2", "required: 3"), "live", "new.yaml")
    assert "-  required: 2" in text and "+  required: 3" in text
    assert text.startswith("--- live\n+++ new.yaml\n")


def test_the_default_bundle_is_the_builtin_one() -> None:
    assert DEFAULT_BUNDLE.name == "builtin" and DEFAULT_BUNDLE.approvals == ()


RULE = """\
name: t
channels: {leads: {type: slack, url: "http://127.0.0.1:9/x"}}
approvals:
  - name: r
    match: {kinds: [fix]}
    approvers: {roles: [approver]}
"""

BAD = [
    ("name: t\napprovals: [\n", "policy.yaml:3: not valid YAML"),
    ("- name: t\n", "policy.yaml:1: a bundle is a mapping"),
    ("name: t\nscorers: {}\n", "policy.yaml:2: scorers: unknown field"),
    (
        "name: t\nobjective:\n  scorer: edf\n  speed: 3\n",
        "policy.yaml:4: objective.speed: unknown field",
    ),
    ("name: t\nobjective: {scorer: magic}\n", "policy.yaml:2: objective.scorer: Input should be"),
    (
        "name: t\nthresholds: {confidence: high}\n",
        "policy.yaml:2: thresholds.confidence: Input should be a valid number",
    ),
    (
        "name: t\npools: {drivers: -1}\n",
        "policy.yaml:2: pools.drivers: Input should be greater than or equal to 0",
    ),
    (
        "name: t\nlimits:\n  deliver: {rate: fast}\n",
        "policy.yaml:3: limits.deliver: rate 'fast' is not like",
    ),
    ("description: x\n", "policy.yaml:1: name: Field required"),
    ("name: Not Valid\n", "policy.yaml:1: name: String should match pattern"),
    (
        RULE + "    required: 0\n",
        "policy.yaml:7: approvals[0].required: Input should be greater than or equal to 1",
    ),
    (
        RULE + "    expires_after: soon\n",
        "policy.yaml:7: approvals[0].expires_after: must be a duration",
    ),
    (
        RULE + "  - name: r\n    match: {kinds: [x]}\n    approvers: {roles: [admin]}\n",
        "policy.yaml:7: approvals[1].name: another entry is already named 'r'",
    ),
    (
        RULE + "    escalation: [{after: 1h, notify: leads}, {after: 30m, notify: leads}]\n",
        "policy.yaml:4: approvals[0]: escalation steps must come strictly later",
    ),
    (
        RULE + "    expires_after: 1h\n    escalation: [{after: 2h, notify: leads}]\n",
        "policy.yaml:4: approvals[0]: every escalation step must come before expires_after",
    ),
    (
        RULE + "    escalation: [{after: 1h, notify: boss}]\n",
        "policy.yaml:7: approvals[0].escalation[0].notify: 'boss' is not a channel",
    ),
    (
        "name: t\napprovals:\n  - name: r\n    match: {}\n    approvers: {roles: [approver]}\n",
        "policy.yaml:4: approvals[0].match: a match needs at least one condition",
    ),
    (RULE + "    editable: [payload]\n", "policy.yaml:4: approvals[0]: editable 'payload'"),
    (
        "name: t\napprovals:\n  - name: r\n    match: {kinds: [x]}\n    approvers: {}\n",
        "policy.yaml:5: approvals[0].approvers: name at least one role or group",
    ),
    (
        "name: t\nmodels: {default: xyz}\n",
        "policy.yaml:2: models.default: String should match pattern",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[e.split(": ", 1)[1][:40] for _, e in BAD])
def test_a_bad_bundle_names_file_line_and_field(text: str, expected: str) -> None:
    with pytest.raises(BundleError) as error:
        parse_bundle(text, "policy.yaml")
    assert error.value.message.startswith(expected), error.value.message
    assert "\n" not in error.value.message
