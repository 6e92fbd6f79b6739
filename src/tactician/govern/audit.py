"""The audit chain: append-only records, each carrying the hash of the record before it.

A record's hash is the SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8) of its
sequence number, time, actor, action, subject, detail and the previous record's hash. Editing,
deleting, reordering or inserting a record breaks the chain at that record, and `verify` names
the first one that is wrong. Appending a forged record at the end with a correct hash is only
caught against a head hash kept outside the system (`tactician audit head`): `verify` checks
such an anchor when given one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
"""The previous hash of the first record."""


def canonical_json(value: Any) -> str:
    """One text per value: sorted keys, no spaces, no NaN, UTF-8 kept as is."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: float
    actor: str
    action: str
    """What happened, dotted: task.submitted, approval.voted, policy.deployed, access.refused."""
    subject: str
    """What it happened to: a task id, a policy version, a token name."""
    detail: str
    """Canonical JSON of the particulars, stored and hashed as this exact text."""
    prev_hash: str
    hash: str

    @property
    def details(self) -> dict[str, Any]:
        value = json.loads(self.detail)
        return value if isinstance(value, dict) else {"value": value}

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "detail": self.details,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class Entry:
    """A record to append: the store gives it its place, time and hashes."""

    actor: str
    action: str
    subject: str
    detail: Mapping[str, Any]


def record_hash(
    seq: int, at: float, actor: str, action: str, subject: str, detail: str, prev_hash: str
) -> str:
    body = canonical_json(
        {
            "seq": seq,
            "at": at,
            "actor": actor,
            "action": action,
            "subject": subject,
            "detail": detail,
            "prev": prev_hash,
        }
    )
    return hashlib.sha256(body.encode()).hexdigest()


def chain(
    entries: Iterable[Entry], after_seq: int, after_hash: str, at: float
) -> list[AuditRecord]:
    """The records that append `entries` after the record (`after_seq`, `after_hash`)."""
    records = []
    seq, prev = after_seq, after_hash
    for entry in entries:
        seq += 1
        detail = canonical_json(dict(entry.detail))
        digest = record_hash(seq, at, entry.actor, entry.action, entry.subject, detail, prev)
        records.append(
            AuditRecord(seq, at, entry.actor, entry.action, entry.subject, detail, prev, digest)
        )
        prev = digest
    return records


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int
    head: str
    """The hash of the last record checked (GENESIS for an empty chain)."""
    bad_seq: int | None = None
    problem: str | None = None

    def text(self) -> str:
        if self.ok:
            return f"audit chain intact: {self.checked} records, head {self.head}"
        return f"audit chain broken at record {self.bad_seq}: {self.problem}"


def verify(records: Iterable[AuditRecord], anchor: tuple[int, str] | None = None) -> Verdict:
    """Walk the chain in storage order (by seq) and name the first record that is wrong.

    `anchor` = (seq, hash) recorded outside the system earlier: the record with that seq must
    still carry that hash, which catches a chain rebuilt from some point on.
    """
    expected_seq, prev, checked = 1, GENESIS, 0
    anchor_seen = anchor is None
    if anchor is not None and anchor[0] == 0:  # the head of an empty chain
        if anchor[1] != GENESIS:
            return Verdict(False, 0, prev, 0, "the anchor of an empty chain must be all zeros")
        anchor_seen = True
    for record in records:
        if record.seq != expected_seq:
            what = "missing (deleted?)" if record.seq > expected_seq else "out of order"
            bad = expected_seq if record.seq > expected_seq else record.seq
            return Verdict(False, checked, prev, bad, f"record {expected_seq} is {what}")
        if record.prev_hash != prev:
            return Verdict(
                False,
                checked,
                prev,
                record.seq,
                "its previous-hash does not match the record before it (reordered or inserted?)",
            )
        digest = record_hash(
            record.seq,
            record.at,
            record.actor,
            record.action,
            record.subject,
            record.detail,
            record.prev_hash,
        )
        if digest != record.hash:
            return Verdict(
                False, checked, prev, record.seq, "its contents do not match its hash (edited?)"
            )
        if anchor is not None and record.seq == anchor[0]:
            if record.hash != anchor[1]:
                return Verdict(
                    False,
                    checked,
                    prev,
                    record.seq,
                    "its hash differs from the anchor kept outside (chain rewritten?)",
                )
            anchor_seen = True
        prev, expected_seq, checked = record.hash, expected_seq + 1, checked + 1
    if not anchor_seen and anchor is not None:
        return Verdict(
            False, checked, prev, anchor[0], "the anchored record is gone (chain truncated?)"
        )
    return Verdict(True, checked, prev)
