"""Votes on a site's approvals: cast at the centre, applied by the site's agent.

A mixin of `SqlStore`; each method is one transaction. At the centre, an approver's vote on a
pending approval of a site (as the centre knows it from the site's synced chain) is queued in
`site_votes` and audited; every sync reply carries the site's queued votes until the agent
reports what its own gate made of each (applied, or refused and why). At the agent,
`agent_votes` keeps that outcome per vote id, so a vote the centre sends again (a lost reply, a
report not yet through) is applied once, and its report is sent until the centre has it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tactician.errors import Conflict, InvalidInput, NotFound
from tactician.govern.approvals import Verdict
from tactician.govern.audit import Entry, canonical_json
from tactician.govern.roles import Actor
from tactician.ids import new_ids
from tactician.store.mixin import Cursor, StoreMixin

VOTES_PER_SYNC = 100
"""Queued votes one sync reply carries (the rest go with the next ones)."""
MAX_PENDING = 1000
RESOLVED = ("approval.approved", "approval.rejected", "approval.withdrawn")
"""What ends an approval at a site (withdrawn: its task was cancelled there)."""
_RESOLVED_SQL = "(" + ", ".join(f"'{a}'" for a in RESOLVED) + ")"
_VOTE_COLUMNS = "id, site, task_id, actor, role, groups, verdict, reason, at, state, message, edits"


@dataclass(frozen=True)
class SiteVote:
    """A vote cast at the centre on a site's approval, and what became of it there."""

    id: str
    site: str
    task_id: str
    actor: str
    role: str
    groups: tuple[str, ...]
    verdict: str
    reason: str
    at: float
    state: str
    """queued (not yet reported by the site), applied or refused."""
    message: str | None
    edits: Mapping[str, Any] = field(default_factory=dict)
    """What the approver changes on approval (checked by the site's gate)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "site": self.site,
            "task_id": self.task_id,
            "voter": self.actor,
            "verdict": self.verdict,
            "reason": self.reason,
            "edits": dict(self.edits),
            "at": self.at,
            "state": self.state,
            "message": self.message,
        }

    def wire(self) -> dict[str, Any]:
        """The vote as a sync reply carries it to the agent."""
        return {
            "id": self.id,
            "task_id": self.task_id,
            "voter": {"name": self.actor, "role": self.role, "groups": list(self.groups)},
            "verdict": self.verdict,
            "reason": self.reason,
            "edits": dict(self.edits),
            "at": self.at,
        }


@dataclass(frozen=True)
class SiteVoteSeen:
    """A vote on the approval as the site's chain recorded it (cast there or relayed)."""

    actor: str
    verdict: str
    reason: str
    at: float


@dataclass(frozen=True)
class SiteApproval:
    """A site's approval that its synced chain shows requested and not yet resolved."""

    site: str
    task_id: str
    rule: str
    policy_version: str
    requested_by: str
    requested_at: float
    """The site's clock."""
    seq: int
    """The site's record that asked for it."""
    why: str | None
    site_votes: tuple[SiteVoteSeen, ...]
    centre_votes: tuple[SiteVote, ...]


@dataclass(frozen=True)
class VoteReport:
    """What an agent's gate made of one vote from the centre."""

    id: str
    ok: bool
    message: str


class SiteVotesMixin(StoreMixin):
    # --- the centre ----------------------------------------------------------------------

    def _site_known(self, cur: Cursor, site: str, *, lock: bool = False) -> None:
        suffix = " FOR UPDATE" if lock and self.dialect == "postgres" else ""
        cur.execute(f"SELECT 1 FROM sites WHERE name = ?{suffix}", (site,))
        if cur.fetchone() is None:
            raise NotFound(f"no site named {site!r} has synced with the centre")

    def site_approvals(self, site: str) -> list[SiteApproval]:
        """The site's pending approvals as its synced records show them (oldest first): asked
        for and not approved, rejected or withdrawn there yet, with the votes the site recorded and
        those cast here."""
        with self._read() as cur:
            self._site_known(cur, site)
            return self._pending(cur, site)

    def _pending(self, cur: Cursor, site: str, task_id: str | None = None) -> list[SiteApproval]:
        only = " AND r.subject = ?" if task_id is not None else ""
        cur.execute(
            "SELECT r.subject, r.seq, r.at FROM site_records r WHERE r.site = ? AND "
            f"r.action = 'approval.requested'{only} AND NOT EXISTS (SELECT 1 FROM site_records d "
            "WHERE d.site = r.site AND d.subject = r.subject AND d.seq > r.seq AND d.action IN "
            f"{_RESOLVED_SQL}) ORDER BY r.seq LIMIT {MAX_PENDING}",
            (site, task_id) if task_id is not None else (site,),
        )
        asked = {str(r[0]): (int(r[1]), float(r[2])) for r in cur.fetchall()}
        if not asked:
            return []
        clause, params = self._in("subject", sorted(asked))
        # The range is the partial index's own condition (audit_log_site_approval).
        cur.execute(
            "SELECT action, subject, detail FROM audit_log WHERE action >= 'site.approval.' "
            f"AND action < 'site.approval/' AND {clause} ORDER BY seq",
            params,
        )
        requested: dict[str, dict[str, Any]] = {}
        seen: dict[str, list[SiteVoteSeen]] = {}
        for action, subject, text in cur.fetchall():
            mirror = json.loads(text)
            if mirror.get("site") != site:
                continue
            original = json.loads(mirror["detail"])
            if action == "site.approval.requested" and mirror["seq"] == asked[subject][0]:
                requested[subject] = original
            elif action == "site.approval.voted":
                seen.setdefault(subject, []).append(
                    SiteVoteSeen(
                        str(mirror["actor"]),
                        str(original.get("verdict")),
                        str(original.get("reason", "")),
                        float(mirror["at"]),
                    )
                )
        clause, params = self._in("task_id", sorted(asked))
        cur.execute(
            f"SELECT {_VOTE_COLUMNS} FROM site_votes WHERE site = ? AND {clause} ORDER BY id",
            [site, *params],
        )
        cast: dict[str, list[SiteVote]] = {}
        for row in cur.fetchall():
            vote = _vote(row)
            cast.setdefault(vote.task_id, []).append(vote)
        return [
            SiteApproval(
                site,
                subject,
                str(requested.get(subject, {}).get("rule", "?")),
                str(requested.get(subject, {}).get("policy", "?")),
                str(requested.get(subject, {}).get("by", "?")),
                at,
                seq,
                requested.get(subject, {}).get("why"),
                tuple(seen.get(subject, ())),
                tuple(cast.get(subject, ())),
            )
            for subject, (seq, at) in sorted(asked.items(), key=lambda kv: kv[1][0])
        ]

    def cast_site_vote(
        self,
        site: str,
        task_id: str,
        actor: Actor,
        verdict: Verdict,
        reason: str,
        edits: Mapping[str, Any] | None = None,
    ) -> SiteVote:
        """Queue `actor`'s vote on the site's pending approval of `task_id` for the site's
        agent (audited `site_vote.cast`). The site's gate has the last word: its rule's
        approvers and the refusal of self-approval apply there."""
        if verdict not in ("approve", "reject"):
            raise InvalidInput(f"a verdict is approve or reject, not {verdict!r}")
        if not reason.strip():
            raise InvalidInput("approve and reject need a reason")
        with self._tx() as cur:
            self._site_known(cur, site, lock=True)  # votes on one site take turns
            if not self._pending(cur, site, task_id):
                cur.execute(
                    "SELECT action FROM site_records WHERE site = ? AND subject = ? AND "
                    f"action IN {_RESOLVED_SQL} ORDER BY seq LIMIT 1",
                    (site, task_id),
                )
                done = cur.fetchone()
                if done is not None:
                    state = str(done[0]).removeprefix("approval.")
                    raise Conflict(f"the approval of {task_id} at site {site} is already {state}")
                raise NotFound(
                    f"site {site} has no pending approval for task {task_id} (as of its last sync)"
                )
            cur.execute(
                "SELECT id FROM site_votes WHERE site = ? AND task_id = ? AND actor = ? AND "
                "state <> 'refused'",
                (site, task_id, actor.name),
            )
            if cur.fetchone() is not None:
                raise Conflict(f"{actor.name} has already voted on task {task_id} at site {site}")
            now = self._now(cur)
            (vote_id,) = new_ids(1, now)
            groups = tuple(sorted(actor.groups))
            cur.execute(
                f"INSERT INTO site_votes ({_VOTE_COLUMNS}) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', NULL, ?)",
                (
                    vote_id,
                    site,
                    task_id,
                    actor.name,
                    actor.role.value,
                    json.dumps(list(groups)),
                    verdict,
                    reason,
                    now,
                    canonical_json(dict(edits or {})),
                ),
            )
            detail: dict[str, Any] = {
                "site": site,
                "id": vote_id,
                "verdict": verdict,
                "reason": reason,
                "role": actor.role.value,
                "groups": list(groups),
            }
            if edits:
                detail["edits"] = dict(edits)
            if actor.bootstrap:
                detail["bootstrap"] = True
            self._audit(cur, [Entry(actor.name, "site_vote.cast", task_id, detail)], now)
            return SiteVote(
                vote_id,
                site,
                task_id,
                actor.name,
                actor.role.value,
                groups,
                verdict,
                reason,
                now,
                "queued",
                None,
                dict(edits or {}),
            )

    def site_votes(self, site: str, state: str | None = "queued") -> list[SiteVote]:
        """The site's votes cast here (those still to deliver, by default), oldest first."""
        where, params = ("AND state = ?", [site, state]) if state else ("", [site])
        limit = VOTES_PER_SYNC if state == "queued" else MAX_PENDING
        with self._read() as cur:
            cur.execute(
                f"SELECT {_VOTE_COLUMNS} FROM site_votes WHERE site = ? {where} "
                f"ORDER BY id LIMIT {limit}",
                params,
            )
            return [_vote(row) for row in cur.fetchall()]

    def site_votes_reported(self, site: str, reports: Sequence[VoteReport]) -> int:
        """Mark the site's votes its agent reports on as applied or refused (audited as
        `site_vote.applied` / `site_vote.refused`); a report sent again changes nothing.
        Returns how many changed."""
        if not reports:
            return 0
        with self._tx() as cur:
            now = self._now(cur)
            entries = []
            for report in reports:
                state = "applied" if report.ok else "refused"
                cur.execute(
                    "UPDATE site_votes SET state = ?, message = ?, reported_at = ? WHERE id = ? "
                    "AND site = ? AND state = 'queued'",
                    (state, report.message, now, report.id, site),
                )
                if cur.rowcount != 1:
                    continue  # reported before (a lost reply), or not this site's vote
                cur.execute("SELECT task_id FROM site_votes WHERE id = ?", (report.id,))
                task_id = str(cur.fetchone()[0])
                detail = {"site": site, "id": report.id, "message": report.message}
                entries.append(Entry(f"site:{site}", f"site_vote.{state}", task_id, detail))
            self._audit(cur, entries, now)
            return len(entries)

    # --- the agent -----------------------------------------------------------------------

    def agent_votes_known(self, ids: Sequence[str]) -> set[str]:
        """Which of these votes from the centre this site has dealt with already."""
        if not ids:
            return set()
        with self._read() as cur:
            clause, params = self._in("id", list(ids))
            cur.execute(f"SELECT id FROM agent_votes WHERE {clause}", params)
            return {str(row[0]) for row in cur.fetchall()}

    def agent_vote_done(self, report: VoteReport, task_id: str, now: float) -> None:
        """Keep what the gate made of a vote from the centre, to report (once dealt with, a
        vote is never applied again)."""
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO agent_votes (id, task_id, ok, message, at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING",
                (report.id, task_id, int(report.ok), report.message, now),
            )

    def agent_vote_reports(self, limit: int = VOTES_PER_SYNC) -> list[VoteReport]:
        """Outcomes the centre has not acknowledged yet, oldest vote first."""
        with self._read() as cur:
            cur.execute(
                "SELECT id, ok, message FROM agent_votes WHERE reported = 0 ORDER BY id "
                f"LIMIT {int(limit)}"
            )
            return [VoteReport(str(r[0]), bool(r[1]), str(r[2])) for r in cur.fetchall()]

    def agent_votes_reported(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        with self._tx() as cur:
            clause, params = self._in("id", list(ids))
            cur.execute(f"UPDATE agent_votes SET reported = 1 WHERE {clause}", params)


def _vote(row: Sequence[Any]) -> SiteVote:
    return SiteVote(
        str(row[0]),
        str(row[1]),
        str(row[2]),
        str(row[3]),
        str(row[4]),
        tuple(json.loads(row[5])),
        str(row[6]),
        str(row[7]),
        float(row[8]),
        str(row[9]),
        None if row[10] is None else str(row[10]),
        json.loads(row[11]),
    )
