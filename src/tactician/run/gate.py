"""The gate as a service: who may do what, the live policy bundle, approvals over time.

`Gate` is what the CLI (and the API) go through for every mutation: it checks the actor's role
(a refusal is audited, then raised), applies the live bundle's approval rules to submitted tasks,
casts votes, deploys and rolls back bundles, and mints tokens. `Gate.tick` is a planner hook:
it sends due escalation notices, resolves expired approvals as their rule says, and ends
overrides and holds whose time is up. Time comes from the injected clock, so a test can run a
day of approvals in a second.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from tactician.clock import SYSTEM_CLOCK, Clock
from tactician.decide.learned import Objective
from tactician.decide.predictors import ModelSet
from tactician.decide.scorers import Scorer
from tactician.decide.service import DecidePolicy, decide
from tactician.domain import NewTask
from tactician.errors import Forbidden, InvalidInput, TacticianError
from tactician.govern.approvals import RuleSpec, due_steps, first_static, is_sensitive
from tactician.govern.audit import Entry
from tactician.govern.compare import arm_kpis, in_experiment, shadow_report
from tactician.govern.policy import DEFAULT_BUNDLE, PolicyBundle, bundle_version, parse_bundle
from tactician.govern.records import (
    ApprovalRow,
    DecisionRow,
    Deployment,
    Fallback,
    NewApproval,
)
from tactician.govern.roles import (
    SITE_NAME,
    SYSTEM,
    Actor,
    Operation,
    Role,
    allowed,
    new_secret,
    token_hash,
)
from tactician.ids import new_ids
from tactician.plan.capacity import CapacityView
from tactician.run.notify import NOTIFY_KIND, Channel, notification, notify_kind
from tactician.run.ranking import Experiment, LiveRanker, make_scorer
from tactician.store.protocol import Store

log = logging.getLogger("tactician.gate")

SHADOW_BATCH = 5000
"""Ready tasks the shadow comparison decides at a time."""
POLICY_TTL_S = 1.0
"""How long a read of the live bundle is reused (submissions read it on every batch)."""


@dataclass(frozen=True)
class LivePolicy:
    bundle: PolicyBundle
    version: str
    rules: tuple[RuleSpec, ...]

    @classmethod
    def of(cls, bundle: PolicyBundle, version: str) -> LivePolicy:
        return cls(bundle, version, tuple(rule_spec(r) for r in bundle.approvals))


DEFAULT_POLICY = LivePolicy.of(DEFAULT_BUNDLE, "builtin")


@dataclass(frozen=True)
class Deployed:
    policy: LivePolicy
    deployment: Deployment


def rule_spec(rule: Any) -> RuleSpec:
    """The gate's copy of a bundle's approval rule (kept in each approval it opens)."""
    from tactician.govern.approvals import Match, Step

    m = rule.match
    return RuleSpec(
        name=rule.name,
        match=Match(
            kinds=tuple(m.kinds or ()),
            tags=tuple(m.tags or ()),
            tenants=tuple(m.tenants or ()),
            sensitive=m.sensitive,
            actions=tuple(m.actions or ()),
            confidence_below=m.confidence_below,
            impact_above=m.impact_above,
        ),
        roles=tuple(rule.approvers.roles or ()),
        groups=tuple(rule.approvers.groups or ()),
        required=rule.required,
        expires_after=float(rule.expires_after),
        escalation=tuple(Step(float(s.after), s.notify) for s in rule.escalation or ()),
        on_expiry=rule.on_expiry,
        editable=tuple(rule.editable or ()),
        offline=rule.offline,
    )


class Promoted(Protocol):
    @property
    def version(self) -> str | None: ...

    @property
    def previous(self) -> str | None: ...


P = TypeVar("P", bound=Promoted, covariant=True)


class Registry(Protocol[P]):
    """The model registry as the gate uses it (`tactician.store.registry.ModelRegistry`)."""

    def promote(self, version: str, *, force: bool = False) -> P: ...

    def rollback(self) -> P: ...


T = TypeVar("T", bound=Promoted)


@dataclass
class Gate:
    store: Store
    clock: Clock = SYSTEM_CLOCK
    _cached: tuple[float, dict[str, Deployed]] | None = field(default=None, repr=False)

    # --- who asks ------------------------------------------------------------------------

    def actor(self, token: str | None, *, local_admin: str | None = None) -> Actor:
        """The actor a bearer token names. Without a token, `local_admin` (a CLI with direct
        access to the database file) acts as a bootstrap admin; otherwise a token is needed."""
        if token:
            row = self.store.token_by_hash(token_hash(token))
            if row is None:
                raise Forbidden("unknown token")
            if row.revoked_at is not None:
                # Audited: its holder is known. An unknown token is not (anyone could fill
                # the chain with guesses).
                detail = {"why": "revoked token", "role": row.role.value}
                self.record(row.actor(), "access.refused", "-", detail)
                raise Forbidden(f"token {row.name} was revoked")
            return row.actor()
        if local_admin is not None:
            return Actor(local_admin, Role.ADMIN, bootstrap=True)
        raise Forbidden("a token is needed: --token or TACTICIAN_TOKEN")

    def authorize(self, actor: Actor, operation: Operation, subject: str = "-") -> None:
        """Raise Forbidden unless the actor's role allows it; a refusal is audited first. A
        site's token acts only for its site (`authorize_site`)."""
        if actor.site is not None and subject != f"site:{actor.site}":
            why = f"a token of site {actor.site} acts only as that site's agent"
            self._refused(actor, operation, subject, why)
            raise Forbidden(f"{actor.name}: {why}")
        if allowed(actor, operation):
            return
        self._refused(actor, operation, subject)
        raise Forbidden(f"{actor.name} ({actor.role}) may not {operation.value}")

    def authorize_site(self, actor: Actor, site: str) -> None:
        """An agent's call for `site` (bundle, sync, token leases): only a token made for that
        site (`tokens create --site`), or an admin's. An operator's token for no site is
        refused: it could otherwise sync as any site or hold its shared capacity."""
        subject = f"site:{site}"
        if actor.site is None and actor.role is not Role.ADMIN:
            why = f"acting as site {site} needs a token made for it (tokens create --site)"
            self._refused(actor, Operation.SUBMIT, subject, why)
            raise Forbidden(f"{actor.name}: {why}")
        self.authorize(actor, Operation.SUBMIT, subject)

    def _refused(self, actor: Actor, operation: Operation, subject: str, why: str = "") -> None:
        detail: dict[str, Any] = {"operation": operation.value, "role": actor.role.value}
        if why:
            detail["why"] = why
        self.record(actor, "access.refused", subject, detail)

    def record(
        self, actor: Actor, action: str, subject: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        """Audit a change made outside the store's own audited methods (schedules, pools)."""
        extra = {"bootstrap": True} if actor.bootstrap else {}
        self.store.audit(Entry(actor.name, action, subject, {**(detail or {}), **extra}))

    # --- the live policy -----------------------------------------------------------------

    def policy(self) -> LivePolicy:
        """The live bundle (the built-in one until a bundle is deployed)."""
        live = self.slots().get("live")
        return DEFAULT_POLICY if live is None else live.policy

    def slots(self) -> dict[str, Deployed]:
        """Live, shadow and experiment bundles as deployed now (read at most once a second)."""
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < POLICY_TTL_S:
            return self._cached[1]
        slots = {}
        for slot, (deployment, text) in self.store.deployed().items():
            version = deployment.version or "builtin"
            bundle = parse_bundle(text, f"policy {version[:12]}")
            slots[slot] = Deployed(LivePolicy.of(bundle, version), deployment)
        self._cached = (now, slots)
        return slots

    def compare(self, since: float | None = None) -> dict[str, Any]:
        """The live bundle against the experiment (each arm's KPIs with 95 % intervals, from
        tasks created since `since` or the experiment's start) and the shadow's agreement with
        live; a slot that is not deployed is left out."""
        slots = self.slots()
        live = self.policy()
        report: dict[str, Any] = {"live": live.version}
        experiment = slots.get("experiment")
        if experiment is not None:
            d = experiment.deployment
            start = d.at if since is None else since
            outcomes = self.store.finished_since(start)
            salt, share, split = experiment.policy.version, d.share or 0.0, d.split_by or "task"
            arm_b = [o for o in outcomes if in_experiment(o.task_id, o.tenant, share, split, salt)]
            b_ids = {o.task_id for o in arm_b}
            arm_a = [o for o in outcomes if o.task_id not in b_ids]
            report["experiment"] = {
                "share": share,
                "split_by": split,
                "since": start,
                "arms": [arm_kpis(live.version, arm_a), arm_kpis(salt, arm_b)],
            }
        shadow = slots.get("shadow")
        if shadow is not None:
            first = self.store.recorded_decisions(live.version)
            other = self.store.recorded_decisions(shadow.policy.version)
            report["shadow"] = shadow_report(
                {r.task_id: r for r in first if r.slot == "live"},
                {r.task_id: r for r in other if r.slot == "shadow"},
                live.version,
                shadow.policy.version,
            )
        return report

    def forget(self) -> None:
        self._cached = None

    def deploy(
        self,
        actor: Actor,
        text: str,
        filename: str,
        *,
        slot: str = "live",
        share: float | None = None,
        split_by: str | None = None,
        reason: str | None = None,
    ) -> Deployment:
        """Validate and deploy a bundle; its pools take effect at once."""
        self.authorize(actor, Operation.DEPLOY_POLICY, filename)
        bundle = parse_bundle(text, filename)
        if slot == "experiment":
            if share is None or not 0 < share < 1:
                raise InvalidInput("an experiment needs --share between 0 and 1")
            if split_by not in ("task", "tenant"):
                raise InvalidInput("an experiment splits by task or tenant")
        version = bundle_version(text)
        deployment = self.store.deploy_policy(
            version,
            bundle.name,
            text,
            actor,
            slot=slot,
            share=share,
            split_by=split_by,
            reason=reason,
        )
        if slot == "live":
            self.apply(bundle)
        self.forget()
        return deployment

    def rollback(self, actor: Actor, reason: str | None = None) -> Deployment:
        self.authorize(actor, Operation.ROLLBACK_POLICY, "live")
        deployment = self.store.rollback_policy(actor, reason)
        if deployment.version is not None:
            text = self.store.policy_text(deployment.version)
            self.apply(parse_bundle(text, f"policy {deployment.version}"))
        self.forget()
        return deployment

    def apply(self, bundle: PolicyBundle) -> None:
        """Make the bundle's pools the store's (idempotent)."""
        for pool, capacity in bundle.pools.items():
            self.store.set_pool(pool, capacity)

    # --- approvals -----------------------------------------------------------------------

    def approvals_for(self, tasks: Sequence[NewTask], actor: Actor) -> dict[int, NewApproval]:
        """Task index → the approval its first matching static rule asks for."""
        policy = self.policy()
        if not policy.rules:
            return {}
        opened = {}
        for i, task in enumerate(tasks):
            rule = first_static(
                policy.rules,
                task.kind,
                task.tags,
                task.tenant,
                is_sensitive(task.payload, task.tags),
            )
            if rule is not None:
                opened[i] = NewApproval(rule, policy.version, actor.name)
        return opened

    def vote(
        self,
        actor: Actor,
        task_id: str,
        verdict: str,
        reason: str,
        edits: Mapping[str, Any] | None = None,
        *,
        via: str | None = None,
    ) -> ApprovalRow:
        """Cast `actor`'s vote; `via` names where it was cast when not here (a vote relayed by
        the centre to an edge agent: `centre:<vote id>`)."""
        self.authorize(actor, Operation.VOTE, task_id)
        try:
            return self.store.vote(
                task_id, actor, verdict, reason, edits, now=self.clock.now(), via=via
            )
        except Forbidden as exc:  # self-approval, or not among the rule's approvers
            self._refused(actor, Operation.VOTE, task_id, exc.message)
            raise

    def tick(self, now: float | None = None) -> int:
        """Escalate, expire and release what is due (a planner hook); returns how many."""
        now = self.clock.now() if now is None else now
        done = self.store.expire_overrides(now)
        channels = self.policy().bundle.channels
        for approval in self.store.due_approvals(now):
            if approval.expires_at <= now:
                if self.store.expire_approval(approval.task_id, now) is not None:
                    done += 1
                continue
            steps = due_steps(approval.rule, approval.requested_at, approval.escalated, now)
            if steps:
                self._notify(approval, steps, channels)
                self.store.escalate_approval(approval.task_id, steps, now)
                done += 1
        return done

    def _notify(
        self, approval: ApprovalRow, steps: Sequence[int], channels: Mapping[str, Any]
    ) -> None:
        tasks = []
        for step in steps:
            name = approval.rule.escalation[step].notify
            try:
                channel = Channel.from_mapping(name, channels.get(name))
            except TacticianError as exc:
                log.error(
                    "approval %s: escalation step %d not sent: %s", approval.task_id, step, exc
                )
                continue
            subject = f"approval waiting: task {approval.task_id} ({approval.rule.name})"
            text = (
                f"Task {approval.task_id} has waited for approval since "
                f"{approval.requested_at:.0f}; rule {approval.rule.name} needs "
                f"{approval.tally().text()}. Escalation step {step + 1}."
            )
            tasks.append(
                notification(
                    channel,
                    subject,
                    text,
                    event={"task_id": approval.task_id, "rule": approval.rule.name, "step": step},
                    idempotency_key=f"escalation:{approval.task_id}:{step}",
                )
            )
        if tasks:
            self.store.submit(tasks, {NOTIFY_KIND: notify_kind()}, actor=SYSTEM)

    # --- drift ---------------------------------------------------------------------------

    def clear_drift(self, actor: Actor, reason: str) -> Fallback:
        """End the drift fallback: the decision service's models decide again (audited)."""
        self.authorize(actor, Operation.CLEAR_DRIFT, "fallback")
        return self.store.clear_fallback(actor, reason)

    # --- models --------------------------------------------------------------------------

    def promote_model(
        self, actor: Actor, registry: Registry[T], version: str, *, force: bool = False
    ) -> T:
        """Make a saved model set the active one; audited."""
        self.authorize(actor, Operation.PROMOTE_MODEL, version)
        event = registry.promote(version, force=force)
        self.record(actor, "model.promoted", event.version or "-", {"previous": event.previous})
        return event

    def rollback_model(self, actor: Actor, registry: Registry[T]) -> T:
        """Make the previously active model set active again; audited."""
        self.authorize(actor, Operation.PROMOTE_MODEL, "rollback")
        event = registry.rollback()
        detail = {"previous": event.previous}
        self.record(actor, "model.rolled_back", event.version or "-", detail)
        return event

    # --- tokens --------------------------------------------------------------------------

    def create_token(
        self,
        actor: Actor,
        name: str,
        role: Role,
        groups: Sequence[str] = (),
        site: str | None = None,
    ) -> str:
        """Mint a token and return its secret (shown once; only its hash is kept). With
        `site`, an edge site's token: it acts only as that site's agent."""
        self.authorize(actor, Operation.CREATE_TOKEN, name)
        if not name.strip() or len(name) > 100:
            raise InvalidInput("a token needs a name of 1 to 100 characters")
        if site is not None and not SITE_NAME.fullmatch(site):
            raise InvalidInput(
                f"site {site!r}: a letter or digit, then up to 99 letters, digits, '_', '.' or '-'"
            )
        secret = new_secret()
        token_id = new_ids(1, self.clock.now())[0]
        self.store.create_token(token_id, name, role, groups, token_hash(secret), actor, site)
        return secret

    def revoke_token(self, actor: Actor, name: str) -> None:
        self.authorize(actor, Operation.REVOKE_TOKEN, name)
        self.store.revoke_token(name, actor)


SHADOW_EVERY_S = 10.0
"""How often the shadow bundle decides the waiting tasks beside the live one."""


def scorer_for(policy: LivePolicy, models: ModelSet | None) -> Scorer:
    objective = policy.bundle.objective
    return make_scorer(
        objective.scorer,
        models,
        Objective(
            weight_exponent=objective.weight_exponent,
            optimism=objective.optimism,
            lst=objective.lst,
        ),
    )


@dataclass
class GateHook:
    """The gate inside the live planner (a hook, every half second): follow the deployed
    bundles (live, experiment), hand the ranker the operators' overrides, send the tasks the
    ranker kept back for a decision-dependent rule to approval, let the shadow bundle decide
    beside the live one, and run `Gate.tick`."""

    gate: Gate
    ranker: LiveRanker
    shadow_every_s: float = SHADOW_EVERY_S
    _experiment: str | None = None
    _shadow_at: float = -math.inf

    def __call__(self, now: float) -> int:
        slots = self.gate.slots()
        policy = self.gate.policy()
        if policy.version != self.ranker.policy_version:
            self.follow(policy)
        self._follow_experiment(slots.get("experiment"))
        self.ranker.overrides = {
            o.task_id: (o.what, o.value, o.actor)
            for o in self.gate.store.overrides()
            if o.expires_at is None or o.expires_at > now
        }
        done = 0
        gated, self.ranker.gated = self.ranker.gated, {}
        if gated:
            approvals = {
                task_id: NewApproval(rule, policy.version, "tactician")
                for task_id, (rule, _) in gated.items()
            }
            why = {task_id: text for task_id, (_, text) in gated.items()}
            done += self.gate.store.require_approval(approvals, why)
        shadow = slots.get("shadow")
        if shadow is not None and now - self._shadow_at >= self.shadow_every_s:
            self._shadow_at = now
            self.shadow(policy, shadow.policy, now)
        return done + self.gate.tick(now)

    def follow(self, policy: LivePolicy) -> None:
        """Rank as `policy` says; with no bundle ever deployed, settings.scorer stands."""
        if policy is DEFAULT_POLICY:
            self.ranker.policy_version = policy.version
            return
        self.ranker.use_policy(
            policy.version,
            scorer_for(policy, self.ranker.models),
            policy.rules,
            policy.bundle.objective.max_wait,
            policy.bundle.objective.fair_share,
            policy.bundle.objective.reserve,
            policy.bundle.thresholds.ood,
            policy.bundle.thresholds.confidence,
        )
        self.gate.apply(policy.bundle)  # again: a deploy that died before applying is healed
        log.info("planner follows policy %s (%s)", policy.version[:12], policy.bundle.name)

    def _follow_experiment(self, deployed: Deployed | None) -> None:
        version = None if deployed is None else deployed.policy.version
        if version == self._experiment:
            return
        self._experiment = version
        if deployed is None:
            self.ranker.use_experiment(None)
            return
        d = deployed.deployment
        other = deployed.policy
        self.ranker.use_experiment(
            Experiment(
                other.version,
                d.share or 0.0,
                d.split_by or "task",
                lambda: scorer_for(other, self.ranker.models),
            )
        )
        log.info("A/B: policy %s decides %.0f%% of tasks", other.version[:12], 100 * (d.share or 0))

    def shadow(self, live: LivePolicy, shadow: LivePolicy, now: float) -> int:
        """Both bundles decide the ready tasks; each one's first decision per task is kept.
        The shadow's are never acted on. Returns how many tasks were decided."""
        store = self.gate.store
        waiting = [w for w in store.waiting(SHADOW_BATCH) if w.state == "ready"]
        if not waiting:
            return 0
        usage = store.pools()
        view = CapacityView(
            pool_capacity={u.pool.name: u.pool.capacity for u in usage},
            pool_used={u.pool.name: u.used for u in usage},
        )
        snapshot, _ = self.ranker.snapshot(waiting, view, now)
        rows: list[DecisionRow] = []
        for slot, policy, scorer in (
            ("live", live, self.ranker.scorer),
            ("shadow", shadow, scorer_for(shadow, self.ranker.models)),
        ):
            rules = DecidePolicy(policy.version, policy.bundle.thresholds.confidence)
            for d in decide(snapshot, scorer, rules, model_version=self.ranker.model_version):
                rows.append(
                    DecisionRow(
                        d.task_id,
                        slot,
                        policy.version,
                        1.0 - d.score,
                        d.action.value,
                        d.confidence,
                        now,
                    )
                )
        store.record_decisions(rows)
        return len(waiting)
