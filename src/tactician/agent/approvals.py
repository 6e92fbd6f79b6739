"""A site's approvals while it is linked to the centre, and while it is not.

Linked, an approver signed in at the centre can answer a site's approval: the centre queues the
vote and sends it with each sync reply (`votes`) until the agent reports what became of it
(`votes_applied` in its next sync). The agent applies each vote through its own gate, as the
voter the centre authenticated (name, role, groups), so the local rule's approvers and the
refusal of self-approval apply as for a vote cast at the site; a refusal is audited here and
reported back with its reason. A vote is dealt with once per id, however often it arrives.

Cut off for `AgentOptions.offline_after_s`, no approver can answer, and each pending approval's
rule says what happens (`offline`): `hold` leaves it waiting (it still expires as `on_expiry`
says); `approve` or `reject` resolves it in the site's name, audited in the local chain (which
reaches the centre with the next sync). A rule never lets a task run unapproved otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from tactician.app import Tactician
from tactician.errors import Conflict, Forbidden, InvalidInput, NotFound, TacticianError
from tactician.govern.records import ApprovalRow
from tactician.govern.roles import Actor, Role, parse_role
from tactician.store.site_votes import VoteReport

log = logging.getLogger("tactician.agent")

REFUSALS = (Forbidden, InvalidInput, Conflict, NotFound)
"""What the gate answers a vote it will not take: reported to the centre as refused. Anything
else (the store unavailable, say) leaves the vote unrecorded, to be applied when it comes again."""


def site_actor(site: str) -> Actor:
    """Who resolves an approval by the offline fallback: the site itself, not a person."""
    return Actor(f"site:{site}", Role.ADMIN)


def vote_reports(app: Tactician) -> list[VoteReport]:
    """What the site made of the centre's votes and has not yet told it (for the next sync)."""
    return app.store.agent_vote_reports()


def reports_json(reports: Sequence[VoteReport]) -> list[dict[str, Any]]:
    return [{"id": r.id, "ok": r.ok, "message": r.message} for r in reports]


def after_sync(app: Tactician, sent: Sequence[VoteReport], answer: Mapping[str, Any]) -> int:
    """The centre has the reports `sent`; apply the votes its answer carries. Returns how many
    votes were applied or refused now."""
    app.store.agent_votes_reported([r.id for r in sent])
    votes = answer.get("votes") or []
    return len(apply_votes(app, votes)) if isinstance(votes, list) else 0


def apply_votes(app: Tactician, votes: Sequence[Any]) -> list[VoteReport]:
    """Apply the centre's votes through the local gate, each once; returns what became of the
    ones not dealt with before (also kept, to report with the next sync)."""
    ids = [str(v.get("id")) for v in votes if isinstance(v, Mapping) and v.get("id")]
    known = app.store.agent_votes_known(ids)
    done = []
    for vote in votes:
        if not isinstance(vote, Mapping) or not vote.get("id"):
            log.error("a vote from the centre without an id was ignored: %r", vote)
            continue
        vote_id = str(vote["id"])
        if vote_id in known:
            continue  # sent again before the centre had the report
        known.add(vote_id)
        task_id = str(vote.get("task_id", ""))
        report = _apply(app, vote_id, task_id, vote)
        app.store.agent_vote_done(report, task_id, app.gate.clock.now())
        log.info(
            "vote %s of %s on %s: %s", vote_id, _voter(vote), task_id, report.message or "applied"
        )
        done.append(report)
    return done


def _apply(app: Tactician, vote_id: str, task_id: str, vote: Mapping[str, Any]) -> VoteReport:
    try:
        voter = _actor(vote.get("voter"))
        verdict, reason = str(vote.get("verdict", "")), str(vote.get("reason", ""))
        edits = vote.get("edits") or {}
        if not isinstance(edits, Mapping):
            raise InvalidInput("the vote's edits are not an object")
        if _cast_already(app, task_id, voter, verdict, reason):
            # Applied before its outcome could be kept (the link died in between).
            return VoteReport(vote_id, True, f"{voter.name} had already voted {verdict}")
        row = app.gate.vote(voter, task_id, verdict, reason, edits, via=f"centre:{vote_id}")
    except REFUSALS as exc:
        return VoteReport(vote_id, False, exc.message)
    return VoteReport(vote_id, True, row.tally().text())


def _actor(voter: Any) -> Actor:
    if not isinstance(voter, Mapping) or not str(voter.get("name", "")).strip():
        raise InvalidInput("the vote names no voter")
    groups = voter.get("groups") or []
    if not isinstance(groups, list):
        raise InvalidInput("the voter's groups are not a list")
    return Actor(
        str(voter["name"]), parse_role(str(voter.get("role"))), frozenset(map(str, groups))
    )


def _voter(vote: Mapping[str, Any]) -> str:
    voter = vote.get("voter")
    return str(voter.get("name")) if isinstance(voter, Mapping) else "?"


def _cast_already(app: Tactician, task_id: str, voter: Actor, verdict: str, reason: str) -> bool:
    approval = app.store.approval(task_id)
    return any(
        v.actor == voter.name and v.verdict == verdict and v.reason == reason
        for v in approval.votes
    )


def offline_fallback(app: Tactician, site: str, offline_s: float) -> list[ApprovalRow]:
    """The site has not reached the centre for `offline_s` seconds: resolve each pending
    approval whose rule says `offline: approve` or `reject` (in the site's name, audited).
    Returns the approvals resolved; one that fails is logged and the others go on."""
    resolved = []
    now = app.gate.clock.now()
    try:
        pending = app.store.approvals("pending")
    except TacticianError as exc:
        log.error("offline fallback: %s", exc.message)
        return []
    for approval in pending:
        if approval.rule.offline == "hold":
            continue
        try:
            row = app.store.resolve_offline(approval.task_id, site_actor(site), offline_s, now)
        except TacticianError as exc:
            log.error("offline fallback on %s: %s", approval.task_id, exc.message)
            continue
        if row is not None:
            log.warning("approval of %s %s: %s", row.task_id, row.state, row.reason)
            resolved.append(row)
    return resolved


__all__ = [
    "after_sync",
    "apply_votes",
    "offline_fallback",
    "reports_json",
    "site_actor",
    "vote_reports",
]
