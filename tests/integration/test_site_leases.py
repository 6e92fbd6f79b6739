"""The centre's books of a global rate on a real database (SQLite and PostgreSQL): tokens lent
to several sites on leases, spent, given back or left to expire, never let the sites together
start more than `burst + rate x W` in any W seconds; what a site gives back unspent is lent
again at once, and the tokens of a site that vanished are minted anew once its lease expires.

Times are the database's (`Lease.expires_at - lease_s` is the moment the centre lent), so the
checks hold however slow the machine is."""

from __future__ import annotations

import random
import time

from tactician.domain import KindSpec, NewTask
from tactician.domain import RateLimit as DomainRate
from tactician.plan.capacity import plan_starts
from tactician.sim.checks import rate_violations
from tactician.sim.leases import RateLimit
from tests.integration.driving import Opener

KIND = "call_api"


def test_sites_together_never_start_more_than_the_shared_rate(opener: Opener) -> None:
    store = opener()
    limit = RateLimit(40.0, 3.0)
    rng = random.Random(11)
    held: dict[str, list[list[object]]] = {s: [] for s in ("north", "south", "east")}
    starts: list[float] = []
    lent = returned = vanished = 0
    stop = time.time() + 2.0
    while time.time() < stop:
        site = rng.choice(sorted(held))
        leases = held[site]
        action = rng.random()
        if action < 0.5:  # the site's planner spends what it holds, before each lease ends
            for lease in leases:
                for _ in range(rng.randint(0, 2)):
                    now = time.time()
                    if int(lease[1]) > 0 and now < float(lease[2]) - 0.002:  # type: ignore[arg-type]
                        starts.append(now)
                        lease[1] = int(lease[1]) - 1  # type: ignore[call-overload]
        elif action < 0.9:  # a round with the centre: give some back, ask for more
            back = [x for x in leases if rng.random() < 0.5]
            returned += len(back)
            held[site] = [x for x in leases if x not in back]
            lease = store.lease_tokens(
                site,
                KIND,
                rng.randint(0, 4),
                limit.per_second,
                limit.burst,
                rng.choice([0.05, 0.3]),
                [(str(x[0]), int(x[1])) for x in back],  # type: ignore[call-overload]
            )
            lent += lease.granted
            held[site].append([lease.id, lease.granted, lease.expires_at])
        else:  # the site vanishes with its leases (a cut link, a crash): never given back
            vanished += len(leases)
            held[site] = []
    assert lent > 20 and returned and vanished  # the books were exercised
    assert len(starts) > 20
    assert rate_violations(starts, limit) == 0, (len(starts), lent)


def test_given_back_tokens_return_at_once_and_expired_ones_are_minted_anew(
    opener: Opener,
) -> None:
    store = opener()
    rate, burst = 10.0, 2.0
    first = store.lease_tokens("north", KIND, 5, rate, burst, 60.0)
    assert first.granted == 2  # the bucket starts full: burst tokens
    assert store.lease_tokens("south", KIND, 2, rate, burst, 60.0).granted == 0
    # North spent one and gives the lease back: its one unspent token goes to south at once;
    # the spent one is gone, and minting has the room for it again from now.
    back = store.lease_tokens("north", KIND, 0, rate, burst, 60.0, [(first.id, 1)])
    again = store.lease_tokens("south", KIND, 2, rate, burst, 1.0)
    took = again.expires_at - 1.0 - (back.expires_at - 60.0)
    assert again.granted == min(2, 1 + int(rate * took)), took
    # Given back twice (a lost reply): the second time changes nothing.
    twice = store.lease_tokens("north", KIND, 0, rate, burst, 60.0, [(first.id, 1)])
    assert twice.granted == 0
    # South vanishes holding the whole burst of another kind. Until its lease ends the centre
    # lends none of it; from its end it mints again (a token after 1/rate).
    gone = store.lease_tokens("south", "other", 2, rate, burst, 1.0)
    assert gone.granted == 2
    asks = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ask = store.lease_tokens("north", "other", 1, rate, burst, 60.0)
        at = ask.expires_at - 60.0
        asks.append(at)
        if at < gone.expires_at:
            assert ask.granted == 0, at
        elif at >= gone.expires_at + 1 / rate + 1e-6:
            assert ask.granted == 1, at
        if ask.granted:
            break
        time.sleep(0.03)
    assert asks[0] < gone.expires_at <= asks[-1]


def test_the_centres_own_planner_draws_on_the_same_rate(opener: Opener) -> None:
    """Once sites lease a kind's global rate, the centre's own work of that kind takes its
    tokens from that bucket too, not from a bucket of its own beside it."""
    store = opener()
    store.register_kinds([KindSpec(KIND, pool="p", rate=DomainRate(10.0, 2.0))])
    store.set_pool("p", 100)
    store.submit([NewTask(KIND) for _ in range(5)], store.kinds())
    north = store.lease_tokens("north", KIND, 2, 10.0, 2.0, 60.0)
    assert north.granted == 2  # the whole burst is out at the site
    assert store.plan(plan_starts, store.kinds()).started == 0
    store.lease_tokens("north", KIND, 0, 10.0, 2.0, 60.0, [(north.id, 2)])  # given back unspent
    assert store.plan(plan_starts, store.kinds()).started == 2  # the burst, and no more
    # What the centre took counts: the next site gets only what was minted since.
    south = store.lease_tokens("south", KIND, 2, 10.0, 2.0, 60.0)
    assert south.granted < 2
