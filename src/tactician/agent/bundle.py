"""Signed bundles: what the centre hands an edge agent, and the agent's check of it.

A bundle is one JSON document:

    {"format": 1,
     "manifest": {"site", "issued_at", "policy_version", "active_model", "global_limits",
                  "parts": [{"name", "sha256", "size"}, ...]},
     "signature": base64 Ed25519 signature of the manifest's canonical JSON,
     "parts": {name: base64 bytes}}

The parts are the live policy bundle's YAML (`policy.yaml`) and the model sets it pins or the
registry has active (`models/<version>.json`). The manifest names each part's SHA-256, and the
centre's Ed25519 key signs the manifest, so one signature covers every byte: an agent checks the
signature first, then every part's hash and size, and uses nothing from a bundle that fails any
check. Ed25519 (the `cryptography` package) rather than a shared HMAC secret: agents hold only
the public key, so a compromised site cannot forge a bundle for the others.

`global_limits` are the rate limits of the live policy's `limits` section: the policy is the
whole system's, so its rates are shared by all sites and spent through leased tokens
(tactician.agent.tokens); rates declared in an app's code stay per process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from tactician.errors import InvalidInput
from tactician.govern.audit import canonical_json

FORMAT = 1
POLICY_PART = "policy.yaml"
PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"


class BundleRefused(InvalidInput):
    """bundle refused"""


@dataclass(frozen=True)
class GlobalLimit:
    per_second: float
    burst: float

    def to_json(self) -> dict[str, float]:
        return {"per_second": self.per_second, "burst": self.burst}


@dataclass(frozen=True)
class Bundle:
    """A bundle whose signature and hashes were checked."""

    site: str
    issued_at: float
    policy_version: str
    policy_text: str
    models: dict[str, bytes]
    """Model set version → its bytes."""
    active_model: str | None
    global_limits: dict[str, GlobalLimit]


# --- keys ----------------------------------------------------------------------------------


def generate_keys(directory: Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair in `directory` (the private key readable by its owner only)."""
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    if private.exists():
        raise InvalidInput(f"{private} exists already: remove it first to replace the key")
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    private.touch(mode=0o600)
    private.write_text(raw.hex() + "\n")
    public.write_text(public_key_text(key) + "\n")
    return private, public


def public_key_text(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        raw = bytes.fromhex(path.read_text().strip())
        return Ed25519PrivateKey.from_private_bytes(raw)
    except FileNotFoundError:
        raise InvalidInput(
            f"no signing key at {path}: run `tactician agent keygen` first"
        ) from None
    except (ValueError, OSError) as exc:
        raise InvalidInput(f"{path} is not an Ed25519 private key: {exc}") from None


def load_public_key(text_or_path: str) -> Ed25519PublicKey:
    """A public key given as 64 hex digits or as the path of a file holding them."""
    text = text_or_path.strip()
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        try:
            text = Path(text_or_path).read_text().strip()
        except OSError as exc:
            raise InvalidInput(
                f"public key {text_or_path!r}: not hex and not a file ({exc})"
            ) from None
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    except ValueError:
        raise InvalidInput(f"public key {text_or_path!r} is not 32 bytes of hex") from None


# --- packing (the centre) ------------------------------------------------------------------


def pack(
    key: Ed25519PrivateKey,
    *,
    site: str,
    issued_at: float,
    policy_version: str,
    policy_text: str,
    models: Mapping[str, bytes],
    active_model: str | None,
    global_limits: Mapping[str, GlobalLimit],
) -> dict[str, Any]:
    """The signed bundle for `site` as a JSON-ready dict."""
    parts = {POLICY_PART: policy_text.encode()}
    parts |= {f"models/{version}.json": data for version, data in sorted(models.items())}
    manifest = {
        "site": site,
        "issued_at": issued_at,
        "policy_version": policy_version,
        "active_model": active_model,
        "global_limits": {k: v.to_json() for k, v in sorted(global_limits.items())},
        "parts": [
            {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in parts.items()
        ],
    }
    signature = key.sign(canonical_json(manifest).encode())
    return {
        "format": FORMAT,
        "manifest": manifest,
        "signature": base64.b64encode(signature).decode(),
        "parts": {name: base64.b64encode(data).decode() for name, data in parts.items()},
    }


# --- checking (the agent) ------------------------------------------------------------------


def verify(document: Any, public_key: Ed25519PublicKey, site: str | None = None) -> Bundle:
    """The bundle, or BundleRefused naming the first check that failed. Nothing of a refused
    bundle is returned, so nothing of it can be used."""
    if isinstance(document, bytes | str):
        try:
            document = json.loads(document)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _refused(f"not JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise _refused(f"not a format-{FORMAT} bundle")
    manifest, signature, encoded = (
        document.get("manifest"),
        document.get("signature"),
        document.get("parts"),
    )
    if not isinstance(manifest, dict) or not isinstance(encoded, dict):
        raise _refused("its manifest or its parts are missing")
    if not isinstance(signature, str):
        raise _refused("it carries no signature")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise _refused("the signature is not base64") from None
    try:
        public_key.verify(raw_signature, canonical_json(manifest).encode())
    except InvalidSignature:
        raise _refused(
            "the signature does not match the manifest (altered, or not signed by the centre's key)"
        ) from None
    # From here on the manifest is the centre's own: its shape can be trusted.
    listed = {str(p["name"]): p for p in manifest["parts"]}
    for name in sorted(set(encoded) - set(listed)):
        raise _refused(f"part {name} is not in the signed manifest")
    parts: dict[str, bytes] = {}
    for name, entry in listed.items():
        text = encoded.get(name)
        if not isinstance(text, str):
            raise _refused(f"part {name} is missing")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _refused(f"part {name} is not base64") from None
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise _refused(f"part {name}: its SHA-256 does not match the signed manifest")
        parts[name] = data
    if site is not None and manifest["site"] != site:
        raise _refused(f"it was issued for site {manifest['site']!r}, not {site!r}")
    if POLICY_PART not in parts:
        raise _refused(f"it has no {POLICY_PART}")
    try:
        policy_text = parts[POLICY_PART].decode()
    except UnicodeDecodeError:
        raise _refused(f"{POLICY_PART} is not UTF-8") from None
    models = {
        name.removeprefix("models/").removesuffix(".json"): data
        for name, data in parts.items()
        if name.startswith("models/")
    }
    return Bundle(
        site=str(manifest["site"]),
        issued_at=float(manifest["issued_at"]),
        policy_version=str(manifest["policy_version"]),
        policy_text=policy_text,
        models=models,
        active_model=manifest.get("active_model"),
        global_limits={
            kind: GlobalLimit(float(v["per_second"]), float(v["burst"]))
            for kind, v in manifest["global_limits"].items()
        },
    )


def _refused(why: str) -> BundleRefused:
    return BundleRefused(f"bundle refused: {why}")
