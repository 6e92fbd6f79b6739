"""`tactician agent`: a site's own planner and workers, on a signed bundle from the centre.

The agent runs the ordinary `Tactician` (same decide, gate and plan code) on its own SQLite
file. At start it pulls the bundle and checks it (tactician.agent.bundle); unreachable, it
falls back to the last bundle it verified, checked again. The live policy of the bundle is
deployed in the local store, so its approval rules apply here exactly as at the centre: a task
an approval rule matches waits in `awaiting_approval` and never runs unapproved. An approver
signed in at the centre answers it there: the vote comes with a sync reply and is applied
through the local gate (tactician.agent.approvals). Cut off from the centre for
`offline_after_s`, the site follows each rule's `offline` fallback: hold (the approval still
expires as the rule says), or approve or reject in the site's name, audited.

A link process, separate from the planner and the workers, syncs the local audit chain (every
decision, outcome and transition) to the centre and leases global-limit tokens, with backoff
while the centre cannot be reached; the planner and workers never wait for it. A kind with a
global limit is registered locally with a bucket that does not refill: only leased tokens go
into it (tactician.store.sites), so the planner starts such a task only with a token in hand,
and a lease past its (local, conservative) expiry leaves the bucket unspent.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from tactician.agent.approvals import after_sync, offline_fallback, reports_json, vote_reports
from tactician.agent.bundle import Bundle, BundleRefused, load_public_key, verify
from tactician.app import Tactician
from tactician.domain import RateLimit
from tactician.errors import TacticianError
from tactician.govern.roles import Actor, Role
from tactician.run.worker import WorkerOptions
from tactician.store.sites import AGENT_BURST, AGENT_RATE_PER_S, Lease

log = logging.getLogger("tactician.agent")
CENTRE = Actor("centre", Role.ADMIN)
"""Who deploys the centre's bundle in the agent's store."""
SYNC_BATCH = 1000


class LinkDown(TacticianError):
    """The centre cannot be reached."""


@dataclass(frozen=True)
class AgentOptions:
    central: str
    token: str
    site: str
    public_key: str
    """64 hex digits, or the path of the centre's `signing.pub`."""
    workers: int = 1
    concurrency: int = 1
    sync_every: float = 0.5
    lease_s: float = 10.0
    lease_margin_s: float = 1.0
    """Taken off a lease's expiry at the agent: clocks and latency never make it spend late."""
    max_backoff_s: float = 5.0
    timeout_s: float = 5.0
    offline_after_s: float = 30.0
    """Without a successful sync for this long, the site counts as offline: no approver can
    answer, and the approval rules' `offline` fallbacks apply (tactician.agent.approvals)."""


class Link:
    """The agent's calls to the centre, each one HTTP request."""

    def __init__(self, options: AgentOptions, client: httpx.Client | None = None) -> None:
        self.options = options
        self.client = client or httpx.Client(
            base_url=options.central.rstrip("/"), timeout=options.timeout_s
        )
        self.headers = {"Authorization": f"Bearer {options.token}"}

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, path, headers=self.headers, **kwargs)
        except httpx.HTTPError as exc:
            raise LinkDown(f"centre {self.options.central} unreachable: {exc}") from None
        if response.status_code >= 500:
            raise LinkDown(f"centre answered {response.status_code}")
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise TacticianError(f"centre refused {path}: {message}")
        return response.json()

    def bundle(self) -> bytes:
        try:
            response = self.client.get(
                "/agents/bundle", params={"site": self.options.site}, headers=self.headers
            )
        except httpx.HTTPError as exc:
            raise LinkDown(f"centre {self.options.central} unreachable: {exc}") from None
        if response.status_code >= 400:
            raise TacticianError(f"centre refused the bundle: {response.text[:300]}")
        return response.content

    def sync(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/agents/{self.options.site}/sync", json=body)
        return result

    def lease(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", f"/agents/{self.options.site}/tokens", json=body
        )
        return result


class Agent:
    def __init__(self, app: Tactician, options: AgentOptions, link: Link | None = None) -> None:
        self.app = app
        self.options = options
        self.link = link or Link(options)
        self.public_key = load_public_key(options.public_key)
        self.bundle: Bundle | None = None

    @property
    def saved_bundle(self) -> Path:
        return Path(self.app.settings.models_dir).parent / "agent" / "bundle.json"

    # --- the bundle ------------------------------------------------------------------------

    def pull(self) -> Bundle:
        """The centre's bundle, verified; offline, the last one verified (checked again)."""
        try:
            raw = self.link.bundle()
            source = "centre"
        except LinkDown as exc:
            if not self.saved_bundle.exists():
                raise LinkDown(f"{exc.message}, and no bundle was pulled before") from None
            log.warning("%s: starting on the last bundle pulled", exc.message)
            raw, source = self.saved_bundle.read_bytes(), str(self.saved_bundle)
        bundle = verify(raw, self.public_key, site=self.options.site)
        if source == "centre":
            self.saved_bundle.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.saved_bundle.with_suffix(".tmp")
            tmp.write_bytes(raw)
            tmp.replace(self.saved_bundle)
        self.install(bundle)
        return bundle

    def install(self, bundle: Bundle) -> None:
        """Deploy the bundle's policy and models locally; register global kinds so that only
        leased tokens start them."""
        from tactician.decide.predictors import ModelSet
        from tactician.store.registry import ModelRegistry

        app = self.app
        app.leased_kinds = set(bundle.global_limits)
        for kind in bundle.global_limits:
            spec = app.kinds.get(kind)
            if spec is not None:
                app.kinds[kind] = replace(spec, rate=RateLimit(AGENT_RATE_PER_S, AGENT_BURST))
        store = app.store
        store.register_kinds(list(app.kinds.values()))
        store.agent_tokens(sorted(bundle.global_limits), store.db_now())  # buckets exist, at 0
        live = store.deployed().get("live")
        if live is None or live[0].version != bundle.policy_version:
            store.deploy_policy(
                bundle.policy_version, "centre", bundle.policy_text, CENTRE, reason="bundle"
            )
        if bundle.models:
            registry = ModelRegistry(app.settings.models_dir)
            for version, data in bundle.models.items():
                registry.save(ModelSet.from_bytes(data, version))
            if bundle.active_model and registry.active_version() != bundle.active_model:
                registry.promote(bundle.active_model, force=True)
        self.bundle = bundle

    # --- the link --------------------------------------------------------------------------

    def sync_once(self) -> int:
        """Send the records after the last acknowledged one; returns how many were accepted."""
        store = self.app.store
        accepted = 0
        for _ in range(20):  # at most this many batches per round
            acked = store.agent_acked()
            batch = list(itertools.islice(store.audit_records(after_seq=acked), SYNC_BATCH))
            head_seq, _ = store.audit_head()
            rest = head_seq - acked - len(batch)
            body = {
                "records": [
                    {
                        "seq": r.seq,
                        "at": r.at,
                        "actor": r.actor,
                        "action": r.action,
                        "subject": r.subject,
                        "detail": r.detail,
                        "prev_hash": r.prev_hash,
                        "hash": r.hash,
                    }
                    for r in batch
                ],
                "backlog": len(store.waiting(10_000)),
                "unsynced": rest,
                "oldest_unsynced_at": batch[-1].at if rest > 0 and batch else None,
            }
            reports = vote_reports(self.app)
            if reports:  # only then: a centre without site votes takes the body as before
                body["votes_applied"] = reports_json(reports)
            answer = self.link.sync(body)
            store.agent_ack(int(answer["acked_seq"]))
            accepted += int(answer["accepted"])
            after_sync(self.app, reports, answer)  # the centre's votes, through the local gate
            if rest <= 0:
                break
        return accepted

    def lease_once(self) -> None:
        """Hold, of each global kind, the tokens the site's ready work can spend before the
        next round: top up when short; holding more than that, give every lease back and take
        what is needed (tokens a site holds count against the shared rate until given back or
        expired, so idle ones would keep the other sites waiting). Spent and expired leases are
        handed back on the way."""
        if self.bundle is None:
            return
        store = self.app.store
        need = store.agent_need(list(self.bundle.global_limits))
        for kind, limit in sorted(self.bundle.global_limits.items()):
            now = store.db_now()
            most = max(1, math.ceil(limit.per_second * self.options.sync_every * 2))
            wanted = min(need.get(kind, 0), most)
            held, _ = store.agent_tokens([kind], now)[kind]
            if held > wanted:
                store.agent_release(kind, now)
                held = 0
            # Every return the centre has not heard, this round's and any a cut link (or a
            # restart) kept back, so their unspent tokens are lent again before they expire.
            dropped = store.agent_returns(kind)
            if held >= wanted and not dropped:
                continue
            body = {
                "kind": kind,
                "want": max(0, wanted - held),
                "lease_s": self.options.lease_s,
                "returns": [{"lease": lease, "unspent": n} for lease, n in dropped],
            }
            sent_at = store.db_now()
            answer = self.link.lease(body)
            store.agent_returned([lease for lease, _ in dropped])
            lease = Lease(answer["lease"], kind, int(answer["granted"]), 0.0)
            expires = sent_at + float(answer["expires_in"]) - self.options.lease_margin_s
            store.agent_add_lease(lease, expires, store.db_now())

    def run_link(self, stop: threading.Event | None = None) -> None:
        """Sync and lease until stopped; back off while the centre cannot be reached, and once
        it has not been reached for `offline_after_s`, apply the approval rules' offline
        fallbacks."""
        if stop is None:
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set() if stop else None)
        wait = self.options.sync_every
        clock = self.app.gate.clock
        reached = clock.now()  # the last successful sync; the link starts out counting as up
        while not stop.is_set():
            offline_s = None
            try:
                self.lease_once()
                self.sync_once()
                reached = clock.now()
                wait = self.options.sync_every
            except LinkDown as exc:
                log.warning("%s: retrying in %.1fs", exc.message, wait)
                wait = min(self.options.max_backoff_s, wait * 2)
                offline_s = clock.now() - reached
            except TacticianError as exc:
                log.error("link: %s", exc.message)
                wait = min(self.options.max_backoff_s, wait * 2)
                offline_s = clock.now() - reached  # refused: no vote comes through either
            if offline_s is not None and offline_s >= self.options.offline_after_s:
                offline_fallback(self.app, self.options.site, offline_s)
            stop.wait(wait)

    def run(self) -> None:
        """Pull the bundle, then the link process, the planner and the workers until SIGTERM."""
        self.pull()
        self.app.close()
        ctx = multiprocessing.get_context("fork")
        link = ctx.Process(target=_link_child, args=(self,), name="agent-link")
        link.start()
        try:
            self.app.serve(
                self.options.workers, WorkerOptions(concurrency=self.options.concurrency)
            )
        finally:
            if link.pid is not None and link.is_alive():
                link.terminate()
            link.join(10)


def _link_child(agent: Agent) -> None:
    agent.app._store = None  # a connection of this process's own
    agent.link = Link(agent.options)
    agent.run_link()


def bundle_json(bundle: Bundle) -> dict[str, Any]:
    return {
        "site": bundle.site,
        "policy_version": bundle.policy_version,
        "models": sorted(bundle.models),
        "global_limits": {k: v.to_json() for k, v in bundle.global_limits.items()},
    }


__all__ = ["Agent", "AgentOptions", "BundleRefused", "Link", "LinkDown", "bundle_json"]
