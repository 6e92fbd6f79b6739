"""Global limits lent to sites as leased tokens: the centre's books.

**A global rate** (`per_second`, `burst`) is a token bucket whose tokens may sit at the centre
or at the sites, minted by `tactician.plan.flow.mint` (the live centre's rule too): a site
spends one token per start, only before its lease expires, and gives back what it did not spend
when it renews. A lease that expires unrenewed (a site cut off from the centre) destroys its
tokens: the centre counts them no more and mints anew. So the starts in any interval [t1, t2]
are at most `burst + per_second (t2 - t1)`: the same bound a single bucket gives.

**A shared pool** of `units` is lent as units: a site may hold a unit while its lease runs, in
use or idle. It returns idle units it no longer needs; when its lease expires unrenewed the site
must stop the work that holds them (fencing, as with a lock service's lease) and the centre lends
them again. Units in use across the sites never exceed `units`.

Both are plain bookkeeping on a time the caller gives (`now`); the simulator's sites hold their
side (tokens, expiry) and ask through these methods only while their link is up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tactician.errors import InvalidInput
from tactician.plan.flow import Bucket, mint


@dataclass
class Lease:
    amount: int
    """Tokens or units lent and not yet given back (the site may have spent some)."""
    expires_at: float


@dataclass(frozen=True)
class RateLimit:
    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and math.isfinite(self.per_second)):
            raise InvalidInput(f"a global rate must be positive, got {self.per_second}")
        if not (self.burst >= 1 and math.isfinite(self.burst)):
            raise InvalidInput(f"a global rate's burst must be at least 1, got {self.burst}")


class RateLeases:
    """The centre's side of one global rate limit (see the module doc)."""

    def __init__(self, limit: RateLimit, start: float = 0.0) -> None:
        self.limit = limit
        self.available = float(limit.burst)
        self.updated_at = start
        self.leases: dict[str, Lease] = {}

    def outstanding(self) -> int:
        return sum(lease.amount for lease in self.leases.values())

    def advance(self, now: float) -> None:
        """Bring the books to `now`: mint, and drop the leases that expired on the way (their
        tokens are gone; minting resumes from the moment each expired)."""
        leases = [(lease.expires_at, lease.amount) for lease in self.leases.values()]
        bucket = mint(
            Bucket(self.available, self.updated_at),
            leases,
            self.limit.per_second,
            self.limit.burst,
            now,
        )
        self.available, self.updated_at = bucket.tokens, bucket.updated_at
        for site in [s for s, lease in self.leases.items() if lease.expires_at <= now]:
            del self.leases[site]

    def give_back(self, site: str, unspent: int, now: float) -> None:
        """The site returns the tokens it did not spend; its lease ends."""
        self.advance(now)
        lease = self.leases.pop(site, None)
        if lease is not None:
            self.available += min(unspent, lease.amount)

    def lend(self, site: str, want: int, now: float, ttl: float) -> int:
        """Up to `want` tokens for the site; its whole lease now expires at `now + ttl`."""
        self.advance(now)
        granted = max(0, min(want, math.floor(self.available + 1e-9)))
        self.available -= granted
        lease = self.leases.setdefault(site, Lease(0, now + ttl))
        lease.amount += granted
        lease.expires_at = now + ttl
        return granted

    def next_token_at(self, now: float) -> float | None:
        """When the centre will next have a whole token to lend, if no lease changes first
        (None: not before a lease expires or is given back)."""
        self.advance(now)
        missing = 1.0 - self.available
        if missing <= 1e-9:
            return now
        if self.limit.burst - self.available - self.outstanding() >= missing - 1e-9:
            return now + missing / self.limit.per_second
        expiries = [lease.expires_at for lease in self.leases.values()]
        return min(expiries) if expiries else None


class PoolLeases:
    """The centre's side of one shared pool (see the module doc)."""

    def __init__(self, units: int) -> None:
        if units < 1:
            raise InvalidInput(f"a shared pool needs at least one unit, got {units}")
        self.units = units
        self.leases: dict[str, Lease] = {}

    def advance(self, now: float) -> None:
        for site in [s for s, lease in self.leases.items() if lease.expires_at <= now]:
            del self.leases[site]

    def lent(self, now: float) -> int:
        self.advance(now)
        return sum(lease.amount for lease in self.leases.values())

    def free(self, now: float) -> int:
        return self.units - self.lent(now)

    def keep(self, site: str, amount: int, now: float) -> None:
        """The site keeps only `amount` of its units and returns the rest."""
        self.advance(now)
        lease = self.leases.get(site)
        if lease is not None:
            lease.amount = min(lease.amount, max(0, amount))

    def lend(self, site: str, want: int, now: float, ttl: float) -> int:
        """Up to `want` more units for the site; its whole lease now expires at `now + ttl`."""
        granted = max(0, min(want, self.free(now)))
        lease = self.leases.setdefault(site, Lease(0, now + ttl))
        lease.amount += granted
        lease.expires_at = now + ttl
        return granted


def water_fill(available: int, demands: dict[str, int]) -> dict[str, int]:
    """`available` shared among claimants, no one given more than it asks: the smallest claims
    are met in full, the rest share what is left evenly (ties broken by name)."""
    given = {name: 0 for name in demands}
    left = available
    pending = sorted((d, name) for name, d in demands.items() if d > 0)
    while pending and left > 0:
        share = left // len(pending)
        if share == 0:
            for _, name in pending[:left]:
                given[name] += 1
            break
        rest = []
        for demand, name in pending:
            take = min(share, demand - given[name])
            given[name] += take
            left -= take
            if given[name] < demand:
                rest.append((demand, name))
        pending = rest
    return given


_PER = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_rate(text: str, default_burst_s: float = 60.0) -> tuple[str, RateLimit]:
    """`KIND=N/UNIT[,burst=B]` (UNIT s, min or h), e.g. `deliver=110/h,burst=20`. The burst is
    `default_burst_s` seconds' worth of the rate when not given (at least 1)."""
    shape = (
        f"--global-rate must look like KIND=N/s, N/min or N/h (optionally ,burst=B), got {text!r}"
    )
    kind, equals, rest = text.partition("=")
    rate_text, _, burst_text = rest.partition(",")
    count, slash, unit = rate_text.partition("/")
    if not equals or not slash or not kind.strip() or unit.strip() not in _PER:
        raise InvalidInput(shape)
    try:
        per_second = float(count) / _PER[unit.strip()]
        burst = max(1.0, math.floor(per_second * default_burst_s))
        if burst_text:
            name, _, value = burst_text.partition("=")
            if name.strip() != "burst":
                raise InvalidInput(shape)
            burst = float(value)
    except ValueError:
        raise InvalidInput(shape) from None
    return kind.strip(), RateLimit(per_second, burst)


def parse_pools(items: Sequence[str]) -> dict[str, int]:
    """`pool=N` options (`--global-pool`) as pool → units."""
    pools: dict[str, int] = {}
    for item in items:
        pool, _, units = item.partition("=")
        if not pool.strip() or not units.strip().isdigit() or int(units) < 1:
            raise InvalidInput(f"--global-pool must look like pool=N with N >= 1, got {item!r}")
        pools[pool.strip()] = int(units)
    return pools
