"""The dead-letter table: events refused at ingestion, kept as received for inspection.

A mixin of `SqlStore`. Keeping a dead letter is one transaction with its audit record
(`event.dead_lettered`), so an operator finds both or neither. The body is kept as text: bytes
that are not UTF-8 become `\\xNN` escapes, and so does NUL, which PostgreSQL's TEXT refuses. A
body over `MAX_BODY_CHARS` is cut there (and says so): refused input must not fill the disk.
The values of credential headers are replaced by `[redacted]`, since every reader of dead letters
would otherwise see other callers' tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tactician.errors import InvalidInput
from tactician.govern.audit import Entry
from tactician.govern.roles import SYSTEM, Actor
from tactician.ids import new_ids
from tactician.store.mixin import StoreMixin
from tactician.store.protocol import DeadLetter

if TYPE_CHECKING:
    pass

MAX_BODY_CHARS = 1_000_000
MAX_REASON_CHARS = 1_000
MAX_SOURCE_CHARS = 200
MAX_PAGE = 1_000
REDACTED = "[redacted]"
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})


def _storable(text: str) -> str:
    """Text both databases take: lone surrogates and NUL written as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _body_text(body: bytes | str) -> str:
    if isinstance(body, bytes | bytearray):
        text = bytes(body).decode("utf-8", "backslashreplace")
    elif isinstance(body, str):
        text = body
    else:
        raise InvalidInput(f"a dead letter's body must be bytes or text, not {type(body).__name__}")
    text = _storable(text)
    if len(text) > MAX_BODY_CHARS:
        cut = len(text) - MAX_BODY_CHARS
        text = f"{text[:MAX_BODY_CHARS]}\n[truncated: {cut} more characters]"
    return text


def _headers_json(headers: Mapping[str, str]) -> str:
    if not isinstance(headers, Mapping):
        raise InvalidInput("a dead letter's headers must be a mapping of names to values")
    kept: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidInput("a dead letter's header names and values must be text")
        kept[name] = REDACTED if name.lower() in CREDENTIAL_HEADERS else value
    # ensure_ascii: NUL and lone surrogates leave as \\u escapes, which both databases store.
    return json.dumps(kept, sort_keys=True, ensure_ascii=True)


def _one_line(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"a dead letter needs a {what}: non-empty text")
    line = _storable(" ".join(value.split()))
    return line if len(line) <= limit else f"{line[: limit - 1]}…"


class DeadLetterMixin(StoreMixin):
    def dead_letter(
        self,
        source: str,
        reason: str,
        body: bytes | str,
        headers: Mapping[str, str],
        *,
        actor: Actor = SYSTEM,
    ) -> str:
        """Keep a refused event with the reason it was refused; returns its id."""
        source = _one_line(source, "source", MAX_SOURCE_CHARS)
        reason = _one_line(reason, "reason", MAX_REASON_CHARS)
        text = _body_text(body)
        header_text = _headers_json(headers)
        with self._tx() as cur:
            now = self._now(cur)
            letter_id = new_ids(1, now)[0]
            cur.execute(
                "INSERT INTO dead_letters (id, source, received_at, reason, body, headers) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (letter_id, source, now, reason, text, header_text),
            )
            detail: dict[str, Any] = {"source": source, "reason": reason, "chars": len(text)}
            if actor.bootstrap:
                detail["bootstrap"] = True
            self._audit(cur, [Entry(actor.name, "event.dead_lettered", letter_id, detail)], now)
        return letter_id

    def remember_signature(self, source: str, signature: str, window_s: float) -> bool:
        """Note a signed request's signature; False when it was taken before (a replay).
        Signatures older than the window are forgotten: their requests fail the window."""
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute("DELETE FROM seen_signatures WHERE seen_at < ?", (now - 2 * window_s,))
            cur.execute(
                "INSERT INTO seen_signatures (signature, source, seen_at) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (signature, source, now),
            )
            return cur.rowcount == 1

    def forget_signature(self, signature: str) -> None:
        """Let a request be sent again (its event could not be taken for a passing reason)."""
        with self._tx() as cur:
            cur.execute("DELETE FROM seen_signatures WHERE signature = ?", (signature,))

    def dead_letters(self, limit: int = 100, after_id: str | None = None) -> list[DeadLetter]:
        """Newest first, `limit` at most; `after_id` is the last id of the previous page."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be a whole number from 1 to {MAX_PAGE}")
        if after_id is not None and not isinstance(after_id, str):
            raise InvalidInput("after_id must be a dead letter's id")
        where, params = ("WHERE id < ?", [after_id]) if after_id is not None else ("", [])
        with self._read() as cur:
            cur.execute(
                "SELECT id, source, received_at, reason, body, headers FROM dead_letters "
                f"{where} ORDER BY id DESC LIMIT {limit}",
                params,
            )
            rows = cur.fetchall()
        return [
            DeadLetter(row[0], row[1], float(row[2]), row[3], row[4], json.loads(row[5]))
            for row in rows
        ]
