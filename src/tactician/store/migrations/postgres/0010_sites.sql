-- Edge agents (tactician.agent). The centre keeps the first three tables, an agent's own
-- SQLite file the last two; both dialects carry all five so one migration list serves both.

-- One row per site the centre has heard from: what it runs and how far its chain is synced.
CREATE TABLE sites (
    name TEXT PRIMARY KEY,
    bundle_version TEXT,             -- the policy version of the last bundle it pulled
    first_seen DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,         -- link state: the last request from the site
    acked_seq BIGINT NOT NULL DEFAULT 0,   -- the site's audit chain is accepted up to here
    head_hash TEXT NOT NULL,         -- the hash of that record (GENESIS for none)
    backlog INTEGER NOT NULL DEFAULT 0,     -- waiting tasks at the site, as it last said
    unsynced INTEGER NOT NULL DEFAULT 0,    -- records the site still had to send
    oldest_unsynced_at DOUBLE PRECISION          -- the time of the oldest of them (lag)
);

-- The site's records as accepted (idempotency by (site, seq), and outcomes for the centre).
CREATE TABLE site_records (
    site TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (site, seq)
);

-- Global-limit tokens lent to sites. A kind's central bucket is the rate_buckets row
-- 'global:<kind>'; a lease takes tokens from it, and unspent tokens a site returns go back.
CREATE TABLE site_leases (
    id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    granted INTEGER NOT NULL,
    returned INTEGER,                -- unspent tokens the site gave back; NULL: not yet
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX site_leases_site ON site_leases (site, expires_at);

-- At an agent: the leases it holds. Its planner spends them through the rate_buckets row
-- 'kind:<kind>' (the kind's bucket there refills at ~0/s: only leases add tokens).
CREATE TABLE agent_leases (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    granted INTEGER NOT NULL,
    remaining INTEGER NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL         -- the agent's own clock, with a safety margin taken off
);

-- At an agent: how far the centre has acknowledged its audit chain.
CREATE TABLE agent_sync (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    acked_seq BIGINT NOT NULL
)
