"""The governance tables: the audit chain, tokens, policy deployments, approvals, overrides.

A mixin of `SqlStore`: each method is one transaction, and every change writes its audit record
in that same transaction, so a change and its record commit or vanish together.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from tactician.domain import Task, TaskState
from tactician.errors import Conflict, InvalidInput, NotFound
from tactician.govern.approvals import (
    RuleSpec,
    Verdict,
    Vote,
    apply_edits,
    check_vote,
    next_due,
    tally,
)
from tactician.govern.audit import GENESIS, AuditRecord, Entry, canonical_json, chain
from tactician.govern.records import (
    ApprovalRow,
    DecisionRow,
    Deployment,
    NewApproval,
    OutcomeOfTask,
    Override,
    TokenRow,
)
from tactician.govern.roles import SYSTEM, Actor, Role
from tactician.store.mixin import Cursor, StoreMixin

AUDIT_PAGE = 5000
OVERRIDES = ("pin", "run_now")
WAITING = ("pending", "ready", "retry_wait", "awaiting_approval", "held")


class GovernanceMixin(StoreMixin):
    if TYPE_CHECKING:

        def _get(self, cur: Cursor, task_id: str, *, for_update: bool = False) -> Task: ...

        def _after_submit(self, cur: Cursor) -> None: ...

    # --- the audit chain -----------------------------------------------------------------

    def _serialise_audit(self, cur: Cursor) -> None:
        """Appenders take turns (SQLite's writers already do)."""

    def _audit(self, cur: Cursor, entries: Sequence[Entry], now: float | None = None) -> None:
        if not entries:
            return
        self._serialise_audit(cur)
        cur.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        head = cur.fetchone()
        seq, prev = (int(head[0]), str(head[1])) if head else (0, GENESIS)
        at = self._now(cur) if now is None else now
        cur.executemany(
            "INSERT INTO audit_log (seq, at, actor, action, subject, detail, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (r.seq, r.at, r.actor, r.action, r.subject, r.detail, r.prev_hash, r.hash)
                for r in chain(entries, seq, prev, at)
            ],
        )

    def audit(self, *entries: Entry) -> None:
        """Append records in a transaction of their own (a refusal, say)."""
        with self._tx() as cur:
            self._audit(cur, entries)

    def audit_records(
        self, since: float | None = None, after_seq: int = 0, actions: Sequence[str] = ()
    ) -> Iterator[AuditRecord]:
        """Records in chain order (only those of `actions`, if given), a page at a time."""
        while True:
            where, params = "seq > ?", list[Any]([float(after_seq)])
            if since is not None:
                where += " AND at >= ?"
                params.append(since)
            if actions:  # served by the index on (action, seq)
                where += f" AND action IN ({', '.join('?' * len(actions))})"
                params.extend(actions)
            with self._read() as cur:
                cur.execute(
                    "SELECT seq, at, actor, action, subject, detail, prev_hash, hash "
                    f"FROM audit_log WHERE {where} ORDER BY seq LIMIT {AUDIT_PAGE}",
                    params,
                )
                rows = cur.fetchall()
            yield from (AuditRecord(*row) for row in rows)
            if len(rows) < AUDIT_PAGE:
                return
            after_seq = int(rows[-1][0])

    def audit_head(self) -> tuple[int, str]:
        with self._read() as cur:
            cur.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            row = cur.fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    # --- tokens --------------------------------------------------------------------------

    def create_token(
        self,
        token_id: str,
        name: str,
        role: Role,
        groups: Sequence[str],
        digest: str,
        actor: Actor,
        site: str | None = None,
    ) -> None:
        with self._tx() as cur:
            cur.execute("SELECT 1 FROM tokens WHERE name = ?", (name,))
            if cur.fetchone() is not None:
                raise Conflict(f"a token named {name!r} exists already")
            now = self._now(cur)
            cur.execute(
                "INSERT INTO tokens (id, name, role, groups, hash, created_at, created_by, site) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    token_id,
                    name,
                    role.value,
                    json.dumps(sorted(groups)),
                    digest,
                    now,
                    actor.name,
                    site,
                ),
            )
            detail: dict[str, Any] = {"role": role.value, "groups": sorted(groups), "id": token_id}
            if site is not None:
                detail["site"] = site
            self._audit(cur, [_entry(actor, "token.created", name, detail)], now)

    def token_by_hash(self, digest: str) -> TokenRow | None:
        with self._read() as cur:
            cur.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE hash = ?", (digest,))
            row = cur.fetchone()
        return None if row is None else _token(row)

    def tokens(self) -> list[TokenRow]:
        with self._read() as cur:
            cur.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_at, name")
            return [_token(row) for row in cur.fetchall()]

    def revoke_token(self, name: str, actor: Actor) -> None:
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                "UPDATE tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (now, name),
            )
            if cur.rowcount != 1:
                raise NotFound(f"no active token is named {name!r}")
            self._audit(cur, [_entry(actor, "token.revoked", name, {})], now)

    # --- policy bundles ------------------------------------------------------------------

    def deploy_policy(
        self,
        version: str,
        name: str,
        text: str,
        actor: Actor,
        *,
        slot: str = "live",
        share: float | None = None,
        split_by: str | None = None,
        reason: str | None = None,
    ) -> Deployment:
        """Make `version` the bundle of `slot`, saving its text; one transaction."""
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                "INSERT INTO policies (version, name, text, created_at, created_by) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (version) DO NOTHING",
                (version, name, text, now, actor.name),
            )
            return self._deploy(cur, slot, version, share, split_by, actor, reason, now)

    def clear_policy_slot(self, slot: str, actor: Actor, reason: str | None = None) -> Deployment:
        """Stop the shadow or experiment bundle."""
        if slot == "live":
            raise InvalidInput("the live slot cannot be cleared: deploy or roll back instead")
        with self._tx() as cur:
            return self._deploy(cur, slot, None, None, None, actor, reason, self._now(cur))

    def rollback_policy(self, actor: Actor, reason: str | None = None) -> Deployment:
        """Live goes back to the version it had before the current one."""
        with self._tx() as cur:
            cur.execute(
                "SELECT version FROM deployments WHERE slot = 'live' ORDER BY seq DESC LIMIT 2"
            )
            rows = cur.fetchall()
            if len(rows) < 2:
                raise Conflict("nothing to roll back to: one live deployment or none so far")
            current, previous = rows[0][0], rows[1][0]
            if current == previous:
                raise Conflict("the previous live deployment is the current version")
            return self._deploy(
                cur, "live", previous, None, None, actor, reason, self._now(cur), "rolled_back"
            )

    def _deploy(
        self,
        cur: Cursor,
        slot: str,
        version: str | None,
        share: float | None,
        split_by: str | None,
        actor: Actor,
        reason: str | None,
        now: float,
        how: str = "deployed",
    ) -> Deployment:
        if slot not in ("live", "shadow", "experiment"):
            raise InvalidInput(f"unknown slot {slot!r}: live, shadow or experiment")
        cur.execute("SELECT coalesce(max(seq), 0) FROM deployments")
        seq = int(cur.fetchone()[0]) + 1
        cur.execute(
            "INSERT INTO deployments (seq, slot, version, share, split_by, at, actor, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, slot, version, share, split_by, now, actor.name, reason),
        )
        detail = {"slot": slot, "share": share, "split_by": split_by, "reason": reason}
        self._audit(cur, [_entry(actor, f"policy.{how}", version or "-", detail)], now)
        return Deployment(seq, slot, version, share, split_by, now, actor.name, reason)

    def deployments(self, slot: str | None = None, limit: int = 100) -> list[Deployment]:
        where, params = ("WHERE slot = ?", [slot]) if slot else ("", [])
        with self._read() as cur:
            cur.execute(
                "SELECT seq, slot, version, share, split_by, at, actor, reason FROM deployments "
                f"{where} ORDER BY seq DESC LIMIT {int(limit)}",
                params,
            )
            return [Deployment(*row) for row in cur.fetchall()]

    def deployed(self) -> dict[str, tuple[Deployment, str]]:
        """Slot → its current deployment and the bundle text (cleared slots left out)."""
        with self._read() as cur:
            cur.execute(
                "SELECT d.seq, d.slot, d.version, d.share, d.split_by, d.at, d.actor, d.reason, "
                "p.text FROM deployments d JOIN policies p ON p.version = d.version WHERE d.seq "
                "IN (SELECT max(seq) FROM deployments GROUP BY slot)"
            )
            return {row[1]: (Deployment(*row[:8]), str(row[8])) for row in cur.fetchall()}

    def policy_text(self, version: str) -> str:
        with self._read() as cur:
            cur.execute("SELECT text FROM policies WHERE version LIKE ?", (f"{version}%",))
            rows = cur.fetchall()
        if len(rows) != 1:
            what = "no policy version" if not rows else "more than one policy version"
            raise NotFound(f"{what} starts with {version!r}")
        return str(rows[0][0])

    # --- comparing bundles ---------------------------------------------------------------

    def record_decisions(self, rows: Sequence[DecisionRow]) -> None:
        """Keep each bundle's first decision on each task (later ones are ignored)."""
        if not rows:
            return
        with self._tx() as cur:
            cur.executemany(
                "INSERT INTO decisions (task_id, slot, version, position, action, confidence, "
                "decided_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [
                    (r.task_id, r.slot, r.version, r.position, r.action, r.confidence, r.decided_at)
                    for r in rows
                ],
            )

    def recorded_decisions(self, version: str, since: float | None = None) -> list[DecisionRow]:
        params: list[Any]
        where, params = "version = ?", [version]
        if since is not None:
            where, params = "version = ? AND decided_at >= ?", [version, since]
        with self._read() as cur:
            cur.execute(
                "SELECT task_id, slot, version, position, action, confidence, decided_at "
                f"FROM decisions WHERE {where} ORDER BY task_id",
                params,
            )
            return [DecisionRow(*row) for row in cur.fetchall()]

    def finished_since(self, since: float) -> list[OutcomeOfTask]:
        """Tasks created at or after `since` that have ended, with whether they were sent to
        approval (the outcomes an A/B comparison scores)."""
        with self._read() as cur:
            cur.execute(
                "SELECT t.id, t.tenant, t.created_at, t.due_at, t.finished_at, t.weight, "
                "t.state, a.task_id IS NOT NULL FROM tasks t LEFT JOIN approvals a ON "
                "a.task_id = t.id WHERE t.created_at >= ? AND t.state IN ('succeeded', 'dead', "
                "'cancelled', 'rejected', 'expired') ORDER BY t.id",
                (since,),
            )
            return [
                OutcomeOfTask(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]))
                for row in cur.fetchall()
            ]

    # --- approvals -----------------------------------------------------------------------

    def _open_approvals(
        self, cur: Cursor, opened: Mapping[str, NewApproval], now: float
    ) -> list[Entry]:
        cur.executemany(
            "INSERT INTO approvals (task_id, rule, policy_version, requested_by, requested_at, "
            "expires_at, next_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending') "
            "ON CONFLICT DO NOTHING",
            [
                (
                    task_id,
                    canonical_json(a.rule.to_json()),
                    a.policy_version,
                    a.requested_by,
                    now,
                    now + a.rule.expires_after,
                    now + next_due(a.rule, 0),
                )
                for task_id, a in opened.items()
            ],
        )
        return [
            Entry(
                "tactician",
                "approval.requested",
                task_id,
                {"rule": a.rule.name, "policy": a.policy_version, "by": a.requested_by},
            )
            for task_id, a in opened.items()
        ]

    def require_approval(self, gated: Mapping[str, NewApproval], why: Mapping[str, str]) -> int:
        """Send waiting tasks that a decision-dependent rule matched to approval; returns how
        many moved (tasks that started or left meanwhile are skipped)."""
        if not gated:
            return 0
        with self._tx() as cur:
            now = self._now(cur)
            moved: dict[str, NewApproval] = {}
            for task_id, approval in gated.items():
                cur.execute(
                    "UPDATE tasks SET state = 'awaiting_approval' WHERE id = ? AND state IN "
                    "('pending', 'ready', 'retry_wait') AND id NOT IN (SELECT task_id FROM "
                    "approvals)",
                    (task_id,),
                )
                if cur.rowcount == 1:
                    moved[task_id] = approval
            entries = self._open_approvals(cur, moved, now)
            entries = [
                Entry(e.actor, e.action, e.subject, {**e.detail, "why": why.get(e.subject, "")})
                for e in entries
            ]
            self._audit(cur, entries, now)
            return len(moved)

    def approvals(self, state: str | None = "pending", limit: int = 1000) -> list[ApprovalRow]:
        where, params = ("WHERE state = ?", [state]) if state else ("", [])
        with self._read() as cur:
            cur.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals {where} "
                f"ORDER BY requested_at, task_id LIMIT {int(limit)}",
                params,
            )
            rows = cur.fetchall()
            return [self._approval(cur, row) for row in rows]

    def approval(self, task_id: str) -> ApprovalRow:
        with self._read() as cur:
            return self._load_approval(cur, task_id)

    def _load_approval(self, cur: Cursor, task_id: str, lock: str = "") -> ApprovalRow:
        cur.execute(
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE task_id = ?{lock}", (task_id,)
        )
        row = cur.fetchone()
        if row is None:
            raise NotFound(f"task {task_id} has no approval")
        return self._approval(cur, row)

    def _approval(self, cur: Cursor, row: Sequence[Any]) -> ApprovalRow:
        cur.execute(
            "SELECT actor, verdict, reason, edits, at FROM approval_votes WHERE task_id = ? "
            "ORDER BY at, actor",
            (row[0],),
        )
        votes = tuple(Vote(a, v, r, json.loads(e), at) for a, v, r, e, at in cur.fetchall())
        rule = RuleSpec.from_json(json.loads(row[1]))
        policy, by, asked, expires, escalated, state, resolved_at, resolved_by, reason = row[2:]
        return ApprovalRow(
            row[0],
            rule,
            policy,
            by,
            asked,
            expires,
            escalated,
            state,
            resolved_at,
            resolved_by,
            reason,
            votes,
        )

    def vote(
        self,
        task_id: str,
        actor: Actor,
        verdict: str,
        reason: str,
        edits: Mapping[str, Any] | None = None,
        now: float | None = None,
        via: str | None = None,
    ) -> ApprovalRow:
        """Record an approver's answer; when the tally decides, the task moves on (approved:
        to pending, with the edits applied; rejected: final). `via` says where the vote was
        cast when not here (an edge agent's `centre:<vote id>`); its audit record keeps it."""
        edits = dict(edits or {})
        with self._tx() as cur:
            lock = " FOR UPDATE" if self.dialect == "postgres" else ""
            current = self._load_approval(cur, task_id, lock)
            if current.state != "pending":
                raise Conflict(f"the approval of {task_id} is already {current.state}")
            check_vote(
                current.rule, actor, current.requested_by, verdict, reason, edits, current.votes
            )
            at = self._now(cur) if now is None else now
            cur.execute(
                "INSERT INTO approval_votes (task_id, actor, verdict, reason, edits, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (task_id, actor.name, verdict, reason, canonical_json(edits), at),
            )
            detail: dict[str, Any] = {"verdict": verdict, "reason": reason, "edits": edits}
            if via is not None:
                detail["via"] = via
            entries = [_entry(actor, "approval.voted", task_id, detail)]
            votes = (*current.votes, Vote(actor.name, cast(Verdict, verdict), reason, edits, at))
            result = tally(current.rule, votes)
            if result.state != "pending":
                entries += self._resolve(cur, current, votes, result.state, actor, reason, at)
            self._audit(cur, entries, at)
            return self._load_approval(cur, task_id)

    def _resolve(
        self,
        cur: Cursor,
        approval: ApprovalRow,
        votes: Sequence[Vote],
        state: str,
        actor: Actor,
        reason: str,
        now: float,
        extra: Mapping[str, Any] | None = None,
    ) -> list[Entry]:
        by = actor.name
        task = self._get(cur, approval.task_id, for_update=True)
        cur.execute(
            "UPDATE approvals SET state = ?, resolved_at = ?, resolved_by = ?, reason = ? "
            "WHERE task_id = ?",
            (state, now, by, reason, approval.task_id),
        )
        detail = {"reason": reason, "rule": approval.rule.name, **(extra or {})}
        entries = [_entry(actor, f"approval.{state}", approval.task_id, detail)]
        if task.state is not TaskState.AWAITING_APPROVAL:
            return entries  # cancelled meanwhile: the verdict is kept, the task stays as it is
        if state == "rejected":
            cur.execute(
                "UPDATE tasks SET state = 'rejected', finished_at = ?, last_error = ? WHERE id = ?",
                (now, f"rejected by {by}: {reason}", approval.task_id),
            )
            return entries
        edits: dict[str, Any] = {}
        for vote in votes:
            edits.update(vote.edits)
        payload, weight, due = apply_edits(task.payload, task.weight, task.due_at, edits)
        cur.execute(
            "UPDATE tasks SET state = 'pending', payload = ?, weight = ?, due_at = ?, "
            "due_sort = ? WHERE id = ?",
            (
                canonical_json(payload),
                weight,
                due,
                1e15 if due is None else due,
                approval.task_id,
            ),
        )
        if edits:
            entries.append(_entry(actor, "task.edited", approval.task_id, {"edits": edits}))
        self._after_submit(cur)
        return entries

    def _withdraw_approvals(
        self, cur: Cursor, task_ids: Sequence[str], actor: Actor, now: float
    ) -> list[Entry]:
        """Withdraw the pending approvals of tasks just cancelled: nobody is asked about them
        any more (no vote, no escalation, no expiry). Their audit records."""
        if not task_ids:
            return []
        clause, params = self._in("task_id", list(task_ids))
        cur.execute(
            "UPDATE approvals SET state = 'withdrawn', resolved_at = ?, resolved_by = ?, "
            f"reason = 'task cancelled' WHERE state = 'pending' AND {clause} RETURNING task_id",
            [now, actor.name, *params],
        )
        withdrawn = sorted(row[0] for row in cur.fetchall())
        return [
            _entry(actor, "approval.withdrawn", t, {"reason": "task cancelled"}) for t in withdrawn
        ]

    def due_approvals(self, now: float, limit: int = 1000) -> list[ApprovalRow]:
        """Pending approvals whose next escalation step or expiry has come."""
        with self._read() as cur:
            cur.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE state = 'pending' "
                f"AND next_at <= ? ORDER BY next_at LIMIT {int(limit)}",
                (now,),
            )
            return [self._approval(cur, row) for row in cur.fetchall()]

    def escalate_approval(self, task_id: str, steps: Sequence[int], now: float) -> None:
        """Mark escalation steps as notified (the caller submits the notifications)."""
        with self._tx() as cur:
            current = self._load_approval(cur, task_id)
            done = max(steps) + 1
            cur.execute(
                "UPDATE approvals SET escalated = ?, next_at = ? WHERE task_id = ? "
                "AND state = 'pending' AND escalated < ?",
                (done, current.requested_at + next_due(current.rule, done), task_id, done),
            )
            if cur.rowcount == 1:
                detail = {"steps": list(steps)}
                self._audit(cur, [Entry("tactician", "approval.escalated", task_id, detail)], now)

    def expire_approval(self, task_id: str, now: float) -> ApprovalRow | None:
        """Resolve an expired approval as its rule says; None if it was answered meanwhile."""
        with self._tx() as cur:
            lock = " FOR UPDATE" if self.dialect == "postgres" else ""
            current = self._load_approval(cur, task_id, lock)
            if current.state != "pending" or current.expires_at > now:
                return None
            state = "approved" if current.rule.on_expiry == "approve" else "rejected"
            rule = current.rule
            reason = f"expired after {rule.expires_after:g} s; the rule says {rule.on_expiry}"
            entries = self._resolve(cur, current, current.votes, state, SYSTEM, reason, now)
            self._audit(cur, entries, now)
            return self._load_approval(cur, task_id)

    def resolve_offline(
        self, task_id: str, actor: Actor, offline_s: float, now: float
    ) -> ApprovalRow | None:
        """Resolve a pending approval as its rule's `offline` fallback says (approve or
        reject), in the name of `actor` (the site, not a person: no vote is counted), because
        the site has not reached the centre, and so any approver, for `offline_s` seconds.
        None if the rule says hold or the approval was answered meanwhile."""
        with self._tx() as cur:
            lock = " FOR UPDATE" if self.dialect == "postgres" else ""
            current = self._load_approval(cur, task_id, lock)
            rule = current.rule
            if current.state != "pending" or rule.offline == "hold":
                return None
            state = "approved" if rule.offline == "approve" else "rejected"
            reason = (
                f"offline fallback: no contact with the centre for {offline_s:.0f} s; "
                f"rule {rule.name} says {rule.offline}"
            )
            extra = {"fallback": "offline", "offline_s": round(offline_s, 3)}
            entries = self._resolve(cur, current, current.votes, state, actor, reason, now, extra)
            self._audit(cur, entries, now)
            return self._load_approval(cur, task_id)

    # --- overrides -----------------------------------------------------------------------

    def set_override(
        self,
        task_id: str,
        what: str,
        value: float | None,
        actor: Actor,
        reason: str,
        expires_at: float | None = None,
    ) -> Override:
        if what not in OVERRIDES:
            raise InvalidInput(f"unknown override {what!r}: one of {', '.join(OVERRIDES)}")
        if not reason.strip():
            raise InvalidInput("an override needs a reason")
        with self._tx() as cur:
            task = self._get(cur, task_id, for_update=True)
            if task.state.value not in WAITING:
                raise Conflict(f"task {task_id} is {task.state}: only a waiting task takes it")
            now = self._now(cur)
            cur.execute(
                "INSERT INTO overrides (task_id, what, value, actor, reason, at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (task_id, what) DO UPDATE SET "
                "value = excluded.value, actor = excluded.actor, reason = excluded.reason, "
                "at = excluded.at, expires_at = excluded.expires_at",
                (task_id, what, value, actor.name, reason, now, expires_at),
            )
            detail = {"what": what, "value": value, "reason": reason, "expires_at": expires_at}
            self._audit(cur, [_entry(actor, "override.set", task_id, detail)], now)
            self._after_submit(cur)
            return Override(task_id, what, value, actor.name, reason, now, expires_at)

    def clear_override(self, task_id: str, what: str, actor: Actor, reason: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM overrides WHERE task_id = ? AND what = ?", (task_id, what))
            if cur.rowcount != 1:
                raise NotFound(f"task {task_id} has no {what} override")
            detail = {"what": what, "reason": reason}
            self._audit(cur, [_entry(actor, "override.cleared", task_id, detail)])

    def overrides(self) -> list[Override]:
        with self._read() as cur:
            cur.execute(
                "SELECT task_id, what, value, actor, reason, at, expires_at FROM overrides "
                "ORDER BY at, task_id"
            )
            return [Override(*row) for row in cur.fetchall()]

    def hold(self, task_id: str, actor: Actor, reason: str, until: float | None = None) -> Task:
        """Keep a waiting task from starting until released (by hand, or at `until`)."""
        if not reason.strip():
            raise InvalidInput("a hold needs a reason")
        with self._tx() as cur:
            task = self._get(cur, task_id, for_update=True)
            if task.state.value not in ("pending", "ready", "retry_wait"):
                raise Conflict(f"task {task_id} is {task.state}: only a waiting task is held")
            now = self._now(cur)
            cur.execute(
                "UPDATE tasks SET state = 'held', run_at = ?, last_error = ? WHERE id = ?",
                (until, f"held by {actor.name}: {reason}", task_id),
            )
            detail = {"reason": reason, "until": until, "from": task.state.value}
            self._audit(cur, [_entry(actor, "task.held", task_id, detail)], now)
            return self._get(cur, task_id)

    def release(self, task_id: str, actor: Actor, reason: str) -> Task:
        with self._tx() as cur:
            task = self._get(cur, task_id, for_update=True)
            if task.state is not TaskState.HELD:
                raise Conflict(f"task {task_id} is {task.state}, not held")
            now = self._now(cur)
            cur.execute(
                "UPDATE tasks SET state = 'pending', run_at = NULL, last_error = NULL WHERE id = ?",
                (task_id,),
            )
            self._audit(cur, [_entry(actor, "task.released", task_id, {"reason": reason})], now)
            self._after_submit(cur)
            return self._get(cur, task_id)

    def expire_overrides(self, now: float) -> int:
        """Drop overrides and holds whose time is up; returns how many ended."""
        with self._read() as cur:  # most calls find nothing: no write lock for them
            cur.execute(
                "SELECT 1 FROM overrides WHERE expires_at <= ? UNION ALL SELECT 1 FROM tasks "
                "WHERE state = 'held' AND run_at <= ? LIMIT 1",
                (now, now),
            )
            if cur.fetchone() is None:
                return 0
        with self._tx() as cur:
            cur.execute(
                "SELECT task_id, what FROM overrides WHERE expires_at IS NOT NULL AND "
                "expires_at <= ?",
                (now,),
            )
            ended = [
                Entry("tactician", "override.expired", t, {"what": w}) for t, w in cur.fetchall()
            ]
            cur.execute(
                "DELETE FROM overrides WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            )
            cur.execute(
                "SELECT id FROM tasks WHERE state = 'held' AND run_at IS NOT NULL AND run_at <= ?",
                (now,),
            )
            released = [row[0] for row in cur.fetchall()]
            for task_id in released:
                cur.execute(
                    "UPDATE tasks SET state = 'pending', run_at = NULL, last_error = NULL "
                    "WHERE id = ?",
                    (task_id,),
                )
                ended.append(
                    Entry("tactician", "task.released", task_id, {"reason": "hold expired"})
                )
            self._audit(cur, ended, now)
            if released:
                self._after_submit(cur)
            return len(ended)


def _entry(actor: Actor, action: str, subject: str, detail: Mapping[str, Any]) -> Entry:
    if actor.bootstrap:
        detail = {**detail, "bootstrap": True}
    return Entry(actor.name, action, subject, detail)


_TOKEN_COLUMNS = "id, name, role, groups, created_at, created_by, revoked_at, site"
_APPROVAL_COLUMNS = (
    "task_id, rule, policy_version, requested_by, requested_at, expires_at, escalated, state, "
    "resolved_at, resolved_by, reason"
)


def _token(row: Sequence[Any]) -> TokenRow:
    return TokenRow(row[0], row[1], Role(row[2]), frozenset(json.loads(row[3])), *row[4:])
