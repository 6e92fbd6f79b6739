"""Edge sites: the centre's record of each site, its synced chain and its token leases; and, in
an agent's own file, the leases it holds and how far the centre has acknowledged its chain.

A mixin of `SqlStore`; each method is one transaction. Accepting a site's records verifies
their chain link by link against the site's head the centre kept, then appends each to the
centre's own chain as a `site.<action>` record in that same transaction, so a batch is accepted
whole or not at all, and a batch sent twice (a lost reply) changes nothing the second time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tactician.errors import Conflict, InvalidInput
from tactician.govern.audit import GENESIS, AuditRecord, Entry, record_hash
from tactician.ids import new_ids
from tactician.plan.capacity import KindLimits
from tactician.plan.flow import Bucket, mint
from tactician.store.mixin import Cursor, StoreMixin

AGENT_RATE_PER_S = 1e-12
"""An agent's global kinds refill at ~0/s locally: only leased tokens fill their bucket."""
AGENT_BURST = 1e9
LINK_UP_WITHIN_S = 10.0
"""A site heard from this recently has its link up. An agent syncs every 0.5 s by default and,
while the centre does not answer, retries at least every 5 s: ten seconds of silence is two of
its slowest retries missed, so a brief hiccup does not show as down."""


MAX_RETURNS = 1000
"""Lease returns one lease request carries, at most."""


@dataclass(frozen=True)
class SiteRow:
    name: str
    bundle_version: str | None
    first_seen: float
    last_seen: float
    acked_seq: int
    head_hash: str
    backlog: int
    unsynced: int
    oldest_unsynced_at: float | None
    tokens_held: dict[str, int]

    def to_json(self, now: float) -> dict[str, Any]:
        lag = 0.0 if self.oldest_unsynced_at is None else max(0.0, now - self.oldest_unsynced_at)
        seen_ago = max(0.0, now - self.last_seen)
        return {
            "name": self.name,
            "bundle_version": self.bundle_version,
            "last_seen": self.last_seen,
            "seen_ago_s": round(seen_ago, 3),
            "link_up": seen_ago <= LINK_UP_WITHIN_S,
            "acked_seq": self.acked_seq,
            "backlog": self.backlog,
            "unsynced": self.unsynced,
            "lag_s": round(lag, 3),
            "tokens_held": self.tokens_held,
        }


@dataclass(frozen=True)
class Lease:
    id: str
    kind: str
    granted: int
    expires_at: float


@dataclass(frozen=True)
class SyncState:
    """What a site says of itself with a sync."""

    backlog: int = 0
    unsynced: int = 0
    oldest_unsynced_at: float | None = None


class SitesMixin(StoreMixin):
    # --- the centre ----------------------------------------------------------------------

    def _site(self, cur: Cursor, site: str, now: float) -> tuple[int, str]:
        """The site's row, created on first contact and locked for this transaction."""
        cur.execute(
            "INSERT INTO sites (name, first_seen, last_seen, head_hash) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen",
            (site, now, now, GENESIS),
        )
        lock = " FOR UPDATE" if self.dialect == "postgres" else ""
        cur.execute(f"SELECT acked_seq, head_hash FROM sites WHERE name = ?{lock}", (site,))
        row = cur.fetchone()
        return int(row[0]), str(row[1])

    def site_pulled(self, site: str, bundle_version: str) -> None:
        with self._tx() as cur:
            now = self._now(cur)
            self._site(cur, site, now)
            cur.execute(
                "UPDATE sites SET bundle_version = ? WHERE name = ?", (bundle_version, site)
            )

    def accept_site_records(
        self, site: str, records: Sequence[AuditRecord], state: SyncState
    ) -> tuple[int, int]:
        """Accept the site's records after the last acknowledged one; returns (acked seq,
        records newly accepted). Records already accepted must match what was accepted."""
        with self._tx() as cur:
            now = self._now(cur)
            acked, head = self._site(cur, site, now)
            for r in records:
                digest = record_hash(
                    r.seq, r.at, r.actor, r.action, r.subject, r.detail, r.prev_hash
                )
                if digest != r.hash:
                    raise InvalidInput(
                        f"site {site}: record {r.seq}: its contents do not match its hash"
                    )
            fresh = [r for r in records if r.seq > acked]
            seen = [r for r in records if r.seq <= acked]
            if seen:
                cur.execute(
                    "SELECT seq, hash FROM site_records WHERE site = ? AND seq >= ? AND seq <= ?",
                    (site, min(r.seq for r in seen), max(r.seq for r in seen)),
                )
                stored = {int(row[0]): str(row[1]) for row in cur.fetchall()}
                for r in seen:
                    if stored.get(r.seq) != r.hash:
                        raise Conflict(
                            f"site {site}: record {r.seq} differs from the one accepted "
                            "before (its chain was rewritten)"
                        )
            expected, prev = acked + 1, head
            for r in sorted(fresh, key=lambda r: r.seq):
                if r.seq != expected:
                    raise InvalidInput(
                        f"site {site}: record {expected} is missing (got {r.seq}): send from "
                        f"seq {acked + 1}"
                    )
                if r.prev_hash != prev:
                    raise InvalidInput(
                        f"site {site}: record {r.seq} does not link to record {r.seq - 1}"
                    )
                expected, prev = expected + 1, r.hash
            fresh.sort(key=lambda r: r.seq)
            if fresh:
                cur.executemany(
                    "INSERT INTO site_records (site, seq, at, action, subject, hash) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(site, r.seq, r.at, r.action, r.subject, r.hash) for r in fresh],
                )
                self._audit(
                    cur,
                    [
                        Entry(
                            f"site:{site}",
                            f"site.{r.action}",
                            r.subject,
                            {
                                "site": site,
                                "seq": r.seq,
                                "at": r.at,
                                "actor": r.actor,
                                "detail": r.detail,
                                "prev_hash": r.prev_hash,
                                "hash": r.hash,
                            },
                        )
                        for r in fresh
                    ],
                    now,
                )
                acked, head = fresh[-1].seq, fresh[-1].hash
            cur.execute(
                "UPDATE sites SET acked_seq = ?, head_hash = ?, backlog = ?, unsynced = ?, "
                "oldest_unsynced_at = ? WHERE name = ?",
                (acked, head, state.backlog, state.unsynced, state.oldest_unsynced_at, site),
            )
            return acked, len(fresh)

    def lease_tokens(
        self,
        site: str,
        kind: str,
        want: int,
        per_second: float,
        burst: float,
        lease_s: float,
        returns: Sequence[tuple[str, int]] = (),
    ) -> Lease:
        """Lend up to `want` tokens of `kind`'s global bucket to `site` for `lease_s` seconds,
        after taking back the site's earlier leases in `returns` (lease id, unspent): their
        unspent tokens go back in the bucket, the rest count as spent.

        The bucket mints by `tactician.plan.flow.mint`: only while its tokens and those out on
        unexpired leases are fewer than `burst`, so every token any site spends was minted here
        and all sites together start at most `burst + per_second * W` in any W seconds. A lease
        that is never given back (a lost reply, a site cut off) counts as spent until it
        expires."""
        if want < 0 or not math.isfinite(lease_s) or lease_s <= 0:
            raise InvalidInput("a lease needs want >= 0 and a positive duration")
        key = f"global:{kind}"
        with self._tx() as cur:
            now = self._now(cur)
            self._site(cur, site, now)
            cur.execute(
                "INSERT INTO rate_buckets (key, tokens, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO NOTHING",
                (key, burst, now),
            )
            tokens = self._global_bucket(cur, kind, per_second, burst, now).tokens
            for lease_id, unspent in returns:
                cur.execute(
                    "SELECT granted, expires_at FROM site_leases WHERE id = ? AND site = ? AND "
                    "kind = ? AND returned IS NULL",
                    (lease_id, site, kind),
                )
                row = cur.fetchone()
                if row is None:
                    continue  # returned already (a retried request), or not this site's
                back = max(0, min(int(unspent), int(row[0])))
                cur.execute("UPDATE site_leases SET returned = ? WHERE id = ?", (back, lease_id))
                if float(row[1]) > now:  # expired, its tokens were counted as spent already
                    tokens += back  # never past `burst`: the lease's whole amount leaves `out`
            granted = max(0, min(want, math.floor(tokens + 1e-9)))
            tokens -= granted
            cur.execute(
                "UPDATE rate_buckets SET tokens = ?, updated_at = ? WHERE key = ?",
                (tokens, now, key),
            )
            (lease_id,) = new_ids(1, now)
            if granted:  # an empty answer leaves no row behind
                cur.execute(
                    "INSERT INTO site_leases (id, site, kind, granted, created_at, expires_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (lease_id, site, kind, granted, now, now + lease_s),
                )
            return Lease(lease_id, kind, granted, now + lease_s)

    def _shared_rates(
        self, cur: Cursor, limits: Mapping[str, KindLimits], buckets: dict[str, Bucket], now: float
    ) -> dict[str, str]:
        """The centre's own planner draws a kind's rate from the global bucket once sites
        lease it: `buckets["kind:K"]` becomes that bucket, minted to `now` like a lease (the
        row locked until the pass ends). Returns "kind:K" → "global:K" for the write-back."""
        shared = {
            f"kind:{kind}": f"global:{kind}"
            for kind, limit in limits.items()
            if limit.rate_per_second is not None and f"global:{kind}" in buckets
        }
        for key, global_key in shared.items():
            limit = limits[key.removeprefix("kind:")]
            assert limit.rate_per_second is not None
            buckets[key] = self._global_bucket(
                cur,
                global_key.removeprefix("global:"),
                limit.rate_per_second,
                limit.rate_burst,
                now,
            )
        return shared

    def _global_bucket(
        self, cur: Cursor, kind: str, per_second: float, burst: float, now: float
    ) -> Bucket:
        """The global bucket of `kind`, minted to `now` and locked for this transaction."""
        lock = " FOR UPDATE" if self.dialect == "postgres" else ""
        cur.execute(
            f"SELECT tokens, updated_at FROM rate_buckets WHERE key = ?{lock}", (f"global:{kind}",)
        )
        tokens, updated = (float(x) for x in cur.fetchone())
        cur.execute(
            "SELECT expires_at, granted FROM site_leases WHERE kind = ? AND returned IS NULL "
            "AND expires_at > ?",
            (kind, updated),
        )
        out = [(float(r[0]), int(r[1])) for r in cur.fetchall()]
        return mint(Bucket(tokens, updated), out, per_second, burst, now)

    def sites(self) -> list[SiteRow]:
        with self._read() as cur:
            now = self._now(cur)
            cur.execute(
                "SELECT site, kind, sum(granted) FROM site_leases WHERE returned IS NULL AND "
                "expires_at > ? GROUP BY site, kind",
                (now,),
            )
            held: dict[str, dict[str, int]] = {}
            for site, kind, total in cur.fetchall():
                held.setdefault(site, {})[kind] = int(total)
            cur.execute(
                "SELECT name, bundle_version, first_seen, last_seen, acked_seq, head_hash, "
                "backlog, unsynced, oldest_unsynced_at FROM sites ORDER BY name"
            )
            return [
                SiteRow(
                    str(r[0]),
                    r[1],
                    float(r[2]),
                    float(r[3]),
                    int(r[4]),
                    str(r[5]),
                    int(r[6]),
                    int(r[7]),
                    None if r[8] is None else float(r[8]),
                    held.get(r[0], {}),
                )
                for r in cur.fetchall()
            ]

    # --- the agent -----------------------------------------------------------------------

    def agent_acked(self) -> int:
        with self._read() as cur:
            cur.execute("SELECT acked_seq FROM agent_sync WHERE id = 1")
            row = cur.fetchone()
        return 0 if row is None else int(row[0])

    def agent_ack(self, seq: int) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO agent_sync (id, acked_seq) VALUES (1, ?) ON CONFLICT (id) DO "
                "UPDATE SET acked_seq = excluded.acked_seq WHERE agent_sync.acked_seq < "
                "excluded.acked_seq",
                (seq,),
            )

    def agent_tokens(self, kinds: Sequence[str], now: float) -> dict[str, tuple[int, list[Any]]]:
        """Settle what the planner spent (FIFO over the leases, earliest expiry first) and drop
        leases whose time is up (their unspent tokens leave the bucket). Returns per kind the
        tokens held now and the dropped leases as (id, unspent) to report to the centre."""
        result: dict[str, tuple[int, list[Any]]] = {}
        with self._tx() as cur:
            for kind in kinds:
                result[kind] = self._settle(cur, kind, now)
        return result

    def agent_release(self, kind: str, now: float) -> list[Any]:
        """Give up every lease of `kind`: settle what was spent, empty the bucket; returns the
        leases as (id, unspent) to hand back to the centre."""
        with self._tx() as cur:
            return self._settle(cur, kind, now, release=True)[1]

    def agent_returns(self, kind: str, limit: int = MAX_RETURNS) -> list[tuple[str, int]]:
        """Leases of `kind` given up here whose return the centre has not heard yet, as
        (id, unspent), at most `limit` (what one lease request carries): kept in the store, so
        a restart does not lose them."""
        with self._read() as cur:
            cur.execute(
                "SELECT id, given_back FROM agent_leases "
                "WHERE kind = ? AND given_back IS NOT NULL ORDER BY id LIMIT ?",
                (kind, limit),
            )
            return [(str(r[0]), int(r[1])) for r in cur.fetchall()]

    def agent_returned(self, lease_ids: Sequence[str]) -> None:
        """The centre has heard these returns."""
        if not lease_ids:
            return
        with self._tx() as cur:
            clause, params = self._in("id", list(lease_ids))
            cur.execute(
                f"DELETE FROM agent_leases WHERE given_back IS NOT NULL AND {clause}", params
            )

    def agent_need(self, kinds: Sequence[str]) -> dict[str, int]:
        """Ready tasks of each kind: what the site could start now with tokens in hand."""
        if not kinds:
            return {}
        with self._read() as cur:
            clause, params = self._in("kind", sorted(kinds))
            cur.execute(
                f"SELECT kind, count(*) FROM tasks WHERE state = 'ready' AND {clause} "
                "GROUP BY kind",
                params,
            )
            return {str(r[0]): int(r[1]) for r in cur.fetchall()}

    def agent_add_lease(self, lease: Lease, local_expires_at: float, now: float) -> None:
        with self._tx() as cur:
            self._settle(cur, lease.kind, now)
            if lease.granted <= 0:
                return
            cur.execute(
                "INSERT INTO agent_leases (id, kind, granted, remaining, expires_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (lease.id, lease.kind, lease.granted, lease.granted, local_expires_at),
            )
            if cur.rowcount == 1:
                cur.execute(
                    "UPDATE rate_buckets SET tokens = tokens + ? WHERE key = ?",
                    (lease.granted, f"kind:{lease.kind}"),
                )

    def _settle(
        self, cur: Cursor, kind: str, now: float, *, release: bool = False
    ) -> tuple[int, list[Any]]:
        key = f"kind:{kind}"
        cur.execute(
            "INSERT INTO rate_buckets (key, tokens, updated_at) VALUES (?, 0, ?) "
            "ON CONFLICT (key) DO NOTHING",
            (key, now),
        )
        cur.execute("SELECT tokens FROM rate_buckets WHERE key = ?", (key,))
        bucket = float(cur.fetchone()[0])
        cur.execute(
            "SELECT id, remaining, expires_at FROM agent_leases "
            "WHERE kind = ? AND given_back IS NULL ORDER BY expires_at, id",
            (kind,),
        )
        leases = [(str(r[0]), int(r[1]), float(r[2])) for r in cur.fetchall()]
        held = sum(r for _, r, _ in leases)
        spent = max(0, held - math.floor(bucket + 1e-6))
        dropped: list[Any] = []
        for lease_id, remaining, expires_at in leases:
            use = min(spent, remaining)
            spent -= use
            remaining -= use
            if release or expires_at <= now or remaining == 0:
                cur.execute(  # kept until the centre hears the return (`agent_returned`)
                    "UPDATE agent_leases SET given_back = ?, remaining = 0 WHERE id = ?",
                    (remaining, lease_id),
                )
                dropped.append((lease_id, remaining))
                held -= remaining + use
                bucket -= remaining
            else:
                cur.execute(
                    "UPDATE agent_leases SET remaining = ? WHERE id = ?", (remaining, lease_id)
                )
                held -= use
        bucket = max(0.0, min(bucket, float(held)))
        cur.execute("UPDATE rate_buckets SET tokens = ? WHERE key = ?", (bucket, key))
        return held, dropped
