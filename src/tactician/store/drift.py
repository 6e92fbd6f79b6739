"""The drift fallback's one row: engaged by a detection, cleared by an operator.

A mixin of `SqlStore`. Engaging and clearing are each one transaction with their audit record
(`drift.fallback`, `drift.cleared`), so the chain says exactly when the decision service left
its models and who brought it back. Engaging twice is a no-op (the first detection stands).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tactician.errors import Conflict, InvalidInput
from tactician.govern.audit import Entry
from tactician.govern.records import Fallback
from tactician.govern.roles import SYSTEM, Actor
from tactician.store.mixin import Cursor, StoreMixin


class DriftMixin(StoreMixin):
    def fallback(self) -> Fallback | None:
        """The engaged fallback, or None."""
        with self._read() as cur:
            return _fallback(cur)

    def engage_fallback(
        self, signal: str, reason: str, policy: str, detail: Mapping[str, Any]
    ) -> Fallback | None:
        """Engage the fallback for this detection; None if it was engaged already."""
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                "INSERT INTO drift_fallback (id, since_at, signal, reason, policy) "
                "VALUES (1, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (now, signal, reason, policy),
            )
            if cur.rowcount != 1:
                return None
            entry = Entry(
                SYSTEM.name,
                "drift.fallback",
                signal,
                {**detail, "reason": reason, "policy": policy},
            )
            self._audit(cur, [entry], now)
            return Fallback(now, signal, reason, policy)

    def clear_fallback(self, actor: Actor, reason: str) -> Fallback:
        """End the fallback (an operator's word that the models may decide again)."""
        if not reason.strip():
            raise InvalidInput("clearing a drift fallback needs a reason")
        with self._tx() as cur:
            engaged = _fallback(cur)
            if engaged is None:
                raise Conflict("no drift fallback is engaged: nothing to clear")
            cur.execute("DELETE FROM drift_fallback WHERE id = 1")
            detail: dict[str, Any] = {
                "reason": reason,
                "signal": engaged.signal,
                "engaged_at": engaged.since,
            }
            if actor.bootstrap:
                detail["bootstrap"] = True
            self._audit(cur, [Entry(actor.name, "drift.cleared", engaged.signal, detail)])
            return engaged


def _fallback(cur: Cursor) -> Fallback | None:
    cur.execute("SELECT since_at, signal, reason, policy FROM drift_fallback WHERE id = 1")
    row = cur.fetchone()
    return None if row is None else Fallback(float(row[0]), str(row[1]), str(row[2]), str(row[3]))
