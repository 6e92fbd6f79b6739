"""HMAC-signed webhooks: GitHub's `X-Hub-Signature-256` header, with a timestamp against replay.

The scheme. With the source's secret, the sender sends

    X-Tactician-Timestamp: 1700000000
    X-Hub-Signature-256: sha256=<hex of HMAC-SHA256(secret, b"1700000000." + raw body)>

The timestamp is whole seconds since the epoch in ASCII digits, and is signed as the exact text
of the header, then a dot, then the body's bytes as received. A request passes when the
signature matches (compared in constant time) and the timestamp is within `window_s` seconds of
`now`, either way. Since the timestamp is signed, an old request cannot be given a fresh one.

Inside the window a captured request still verifies: `verify` returns the signature, which the
caller keeps for `window_s` seconds and refuses to see twice. GitHub itself signs the body
alone and sends no timestamp, so its deliveries need a relay that adds both headers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

from tactician.errors import Forbidden, InvalidInput

SIGNATURE_HEADER = "X-Hub-Signature-256"
TIMESTAMP_HEADER = "X-Tactician-Timestamp"
DEFAULT_WINDOW_S = 300.0
_SIGNATURE = re.compile(r"sha256=([0-9a-fA-F]{64})")
_TIMESTAMP = re.compile(r"[0-9]{1,15}")


class BadSignature(Forbidden):
    """The webhook's signature is not valid."""


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _key(secret: bytes | str) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if not key:
        raise InvalidInput("a webhook secret must not be empty")
    return key


def signature(body: bytes, secret: bytes | str, timestamp: str) -> str:
    """The hex HMAC-SHA256 of `timestamp`, a dot and `body`."""
    message = f"{timestamp}.".encode() + body
    return hmac.new(_key(secret), message, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: bytes | str, timestamp: int) -> dict[str, str]:
    """The two headers a sender adds (for clients, tests and the docs)."""
    text = str(timestamp)
    return {
        TIMESTAMP_HEADER: text,
        SIGNATURE_HEADER: f"sha256={signature(body, secret, text)}",
    }


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secret: bytes | str,
    now: float,
    window_s: float = DEFAULT_WINDOW_S,
) -> str:
    """Check a request's signature and timestamp; returns the signature (the request's nonce).

    Raises BadSignature with one line when the request does not pass.
    """
    if not window_s > 0:
        raise InvalidInput(f"the replay window must be > 0 seconds, not {window_s}")
    key = _key(secret)
    sent = _header(headers, SIGNATURE_HEADER)
    if sent is None or not sent.strip():
        raise BadSignature(f"signature missing: no {SIGNATURE_HEADER} header")
    found = _SIGNATURE.fullmatch(sent.strip())
    if found is None:
        raise BadSignature(f"signature malformed: {SIGNATURE_HEADER} must be sha256=<64 hex>")
    timestamp = _header(headers, TIMESTAMP_HEADER)
    if timestamp is None or not timestamp.strip():
        raise BadSignature(f"timestamp missing: no {TIMESTAMP_HEADER} header")
    timestamp = timestamp.strip()
    if not _TIMESTAMP.fullmatch(timestamp):
        raise BadSignature(f"timestamp malformed: {TIMESTAMP_HEADER} must be whole seconds")
    expected = signature(body, key, timestamp)
    if not hmac.compare_digest(expected, found[1].lower()):
        raise BadSignature("signature does not match")
    # Checked after the signature: only then is the timestamp the sender's own.
    skew = now - int(timestamp)
    if abs(skew) > window_s:
        when = "old" if skew > 0 else "in the future"
        raise BadSignature(
            f"timestamp outside the replay window: {abs(skew):.0f} s {when}, {window_s:g} s allowed"
        )
    return expected
