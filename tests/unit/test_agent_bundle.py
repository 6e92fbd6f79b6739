"""Signed bundles: a good one is accepted; one byte changed anywhere is refused, by name."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tactician.agent.bundle import (
    BundleRefused,
    GlobalLimit,
    generate_keys,
    load_private_key,
    load_public_key,
    pack,
    verify,
)
from tactician.errors import InvalidInput

POLICY = "name: edge\nlimits:\n  call_api:\n    rate: 5/s\n    burst: 2\n"
MODEL = b'{"fake": "model bytes", "n": [1, 2, 3]}'


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Any, Any]:
    private, public = generate_keys(tmp_path / "keys")
    return load_private_key(private), load_public_key(str(public))


def good(private: Any) -> dict[str, Any]:
    return pack(
        private,
        site="north",
        issued_at=1000.0,
        policy_version="ab" * 32,
        policy_text=POLICY,
        models={"cd" * 32: MODEL},
        active_model="cd" * 32,
        global_limits={"call_api": GlobalLimit(5.0, 2.0)},
    )


def flipped(text: str, index: int) -> str:
    """`text` (base64) with one byte of what it encodes changed."""
    data = bytearray(base64.b64decode(text))
    data[index % len(data)] ^= 0x01
    return base64.b64encode(bytes(data)).decode()


def test_a_good_bundle_is_accepted(keys: tuple[Any, Any]) -> None:
    private, public = keys
    bundle = verify(json.dumps(good(private)), public, site="north")
    assert bundle.policy_text == POLICY
    assert bundle.models == {"cd" * 32: MODEL}
    assert bundle.active_model == "cd" * 32
    assert bundle.global_limits == {"call_api": GlobalLimit(5.0, 2.0)}


@pytest.mark.parametrize("index", [0, 7, -1])
@pytest.mark.parametrize("part", ["policy.yaml", f"models/{'cd' * 32}.json"])
def test_one_byte_changed_in_a_part_is_refused(
    keys: tuple[Any, Any], part: str, index: int
) -> None:
    private, public = keys
    document = good(private)
    document["parts"][part] = flipped(document["parts"][part], index)
    with pytest.raises(BundleRefused) as refused:
        verify(document, public)
    assert refused.value.message == (
        f"bundle refused: part {part}: its SHA-256 does not match the signed manifest"
    )


@pytest.mark.parametrize("index", [0, 31, 63])
def test_one_byte_changed_in_the_signature_is_refused(keys: tuple[Any, Any], index: int) -> None:
    private, public = keys
    document = good(private)
    document["signature"] = flipped(document["signature"], index)
    with pytest.raises(BundleRefused, match="the signature does not match the manifest"):
        verify(document, public)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["parts"][0].update(sha256="0" * 64),
        lambda m: m.update(policy_version="ab" * 31 + "ac"),
        lambda m: m["global_limits"]["call_api"].update(per_second=50.0),
        lambda m: m.update(site="south"),
    ],
    ids=["part-hash", "version", "limit", "site"],
)
def test_a_changed_manifest_is_refused(keys: tuple[Any, Any], change: Any) -> None:
    private, public = keys
    document = copy.deepcopy(good(private))
    change(document["manifest"])
    with pytest.raises(BundleRefused, match="the signature does not match the manifest"):
        verify(document, public)


def test_every_byte_of_the_serialised_bundle_is_covered(keys: tuple[Any, Any]) -> None:
    """One byte changed anywhere in the document as sent: refused (or, for a byte that only
    changes JSON layout or a base64 padding bit, the same bundle)."""
    private, public = keys
    text = json.dumps(good(private)).encode()
    reference = verify(text, public)
    changed_but_accepted = 0
    for index in range(0, len(text), 3):
        data = bytearray(text)
        data[index] ^= 0x01
        try:
            bundle = verify(bytes(data), public)
        except BundleRefused as exc:
            assert exc.message.startswith("bundle refused: ")
            assert "\n" not in exc.message
            continue
        assert bundle == reference  # nothing the agent would use differs
        changed_but_accepted += 1
    assert changed_but_accepted < len(text) // 30


def test_another_centres_key_is_refused(keys: tuple[Any, Any], tmp_path: Path) -> None:
    private, _ = keys
    _, other = generate_keys(tmp_path / "other")
    with pytest.raises(BundleRefused, match="not signed by the centre's key"):
        verify(good(private), load_public_key(str(other)))


def test_a_part_added_or_removed_is_refused(keys: tuple[Any, Any]) -> None:
    private, public = keys
    document = good(private)
    document["parts"]["extra.bin"] = base64.b64encode(b"x").decode()
    with pytest.raises(BundleRefused, match=r"part extra\.bin is not in the signed manifest"):
        verify(document, public)
    document = good(private)
    del document["parts"]["policy.yaml"]
    with pytest.raises(BundleRefused, match=r"part policy\.yaml is missing"):
        verify(document, public)


def test_a_bundle_for_another_site_is_refused(keys: tuple[Any, Any]) -> None:
    private, public = keys
    with pytest.raises(BundleRefused, match="issued for site 'north', not 'south'"):
        verify(good(private), public, site="south")


def test_keygen_refuses_to_overwrite_and_keeps_the_private_key_private(tmp_path: Path) -> None:
    private, public = generate_keys(tmp_path)
    assert private.stat().st_mode & 0o077 == 0
    assert len(public.read_text().strip()) == 64
    with pytest.raises(InvalidInput, match="exists already"):
        generate_keys(tmp_path)


# --- the centre's side of a sync (a real SQLite store) -------------------------------------


def test_sync_is_idempotent_resumable_and_refuses_a_broken_chain(tmp_path: Path) -> None:
    from dataclasses import replace

    from tactician.app import Tactician
    from tactician.domain import KindSpec, NewTask
    from tactician.errors import Conflict
    from tactician.govern.audit import verify as verify_chain
    from tactician.settings import Settings
    from tactician.store.sites import SyncState

    site = Tactician(settings=Settings(db=f"sqlite:///{tmp_path}/site.db"))
    site.store.register_kinds([KindSpec("job")])
    site.submit_many([NewTask("job") for _ in range(3)])
    site.submit_many([NewTask("job")])
    records = list(site.store.audit_records())
    centre = Tactician(settings=Settings(db=f"sqlite:///{tmp_path}/centre.db"))
    store = centre.store
    assert store.accept_site_records("s1", records[:1], SyncState()) == (1, 1)
    assert store.accept_site_records("s1", records, SyncState()) == (len(records), 1)
    assert store.accept_site_records("s1", records, SyncState()) == (len(records), 0)  # again
    from tactician.govern.audit import record_hash

    r = records[0]
    digest = record_hash(r.seq, r.at, r.actor, r.action, r.subject, '{"tasks":[]}', r.prev_hash)
    forged = replace(r, detail='{"tasks":[]}', hash=digest)
    with pytest.raises(Conflict, match="record 1 differs"):
        store.accept_site_records("s1", [forged], SyncState())
    edited = replace(records[0], detail='{"tasks":[]}')
    with pytest.raises(InvalidInput, match="record 1: its contents do not match its hash"):
        store.accept_site_records("s2", [edited], SyncState())
    with pytest.raises(InvalidInput, match="record 1 is missing"):
        store.accept_site_records("s3", records[1:], SyncState())
    chain = list(store.audit_records())
    assert verify_chain(chain).ok
    assert [
        (r.details["seq"], r.details["hash"]) for r in chain if r.action.startswith("site.")
    ] == [(r.seq, r.hash) for r in records]
    assert [s.name for s in store.sites()] == ["s1"]  # a refused sync leaves nothing
    site.close()
    centre.close()
