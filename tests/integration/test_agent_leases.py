"""An agent's token leases against a real centre store: it leases by the work it has ready,
gives back what it cannot use, and a return the centre did not hear (link down) is kept in the
site's store and sent again when the link is back, after a restart too, so the unspent tokens
are lent to other sites before they expire.

The agent's HTTP transport is the one part left out here (`StoreLink` calls the centre's store
as the API would); tests/e2e/test_agents.py runs the whole thing over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tactician.agent.bundle import generate_keys, verify
from tactician.agent.centre import issue_bundle, key_dir
from tactician.agent.process import Agent, AgentOptions, LinkDown
from tactician.app import Tactician
from tactician.domain import NewTask
from tactician.govern.roles import Actor, Role
from tactician.settings import Settings

RATE, BURST = 10.0, 2.0
POLICY = f"name: edge\nlimits:\n  call_api:\n    rate: {RATE:g}/s\n    burst: {BURST:g}\n"


class StoreLink:
    """`Link.lease` on the centre's store; `up = False` cuts it."""

    def __init__(self, centre: Tactician, site: str) -> None:
        self.centre, self.site, self.up = centre, site, True

    def lease(self, body: dict[str, Any]) -> dict[str, Any]:
        if not self.up:
            raise LinkDown("cut")
        lease = self.centre.store.lease_tokens(
            self.site,
            body["kind"],
            body["want"],
            RATE,
            BURST,
            body["lease_s"],
            [(r["lease"], r["unspent"]) for r in body["returns"]],
        )
        return {"lease": lease.id, "granted": lease.granted, "expires_in": body["lease_s"]}


def test_an_unheard_return_is_sent_again_when_the_link_is_back_even_after_a_restart(
    tmp_path: Path,
) -> None:
    centre = Tactician(
        settings=Settings(db=f"sqlite:///{tmp_path}/centre.db", models_dir=str(tmp_path / "m"))
    )
    centre.gate.deploy(Actor("root", Role.ADMIN), POLICY, "edge.yaml")
    _, public = generate_keys(key_dir(centre.settings))
    site = Tactician(settings=Settings(db=f"sqlite:///{tmp_path}/north.db"))

    @site.task(name="call_api")
    def call_api() -> None:
        pass

    link = StoreLink(centre, "north")
    options = AgentOptions("http://centre", "t", "north", str(public), lease_s=60.0)
    agent = Agent(site, options, link=link)  # type: ignore[arg-type]
    agent.install(verify(issue_bundle(centre, "north"), agent.public_key, site="north"))

    agent.lease_once()  # no work ready: nothing asked for
    assert centre.store.sites()[0].tokens_held == {}
    ids = site.submit_many([NewTask("call_api") for _ in range(3)])
    agent.lease_once()
    assert centre.store.sites()[0].tokens_held == {"call_api": 2}  # the whole burst
    for task in ids:
        site.cancel(task)
    link.up = False
    try:
        agent.lease_once()  # holds 2, needs 0: gives them up here; the centre does not hear
    except LinkDown:
        pass
    else:
        raise AssertionError("the lease call should have failed")
    assert site.store.agent_tokens(["call_api"], site.store.db_now())["call_api"][0] == 0
    (kept,) = site.store.agent_returns("call_api")  # in the site's store, not in memory
    assert kept[1] == 2
    assert centre.store.lease_tokens("south", "call_api", 2, RATE, BURST, 60.0).granted == 0
    # The agent restarts (a new process: nothing of the old one's memory) and the link is back.
    agent = Agent(site, options, link=link)  # type: ignore[arg-type]
    agent.install(verify(issue_bundle(centre, "north"), agent.public_key, site="north"))
    link.up = True
    agent.lease_once()  # needs nothing, but has a return to make
    assert centre.store.sites()[0].tokens_held == {}
    assert site.store.agent_returns("call_api") == []  # heard: no longer kept
    assert centre.store.lease_tokens("south", "call_api", 2, RATE, BURST, 60.0).granted == 2
    site.close()
    centre.close()
