-- Governance: the audit chain, tokens, policy bundles and their deployments, approvals, overrides.

-- Append-only and hash-chained: each record carries the hash of the one before it
-- (tactician.govern.audit). `seq` is assigned by the writer as the previous seq + 1, so a
-- deleted record leaves a gap that `audit verify` names.
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL,            -- canonical JSON, hashed as written
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE FUNCTION tactician_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = 'audit_log is append-only: ' || TG_OP || ' refused';
END;
$$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION tactician_audit_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION tactician_audit_append_only();

CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    groups TEXT NOT NULL DEFAULT '[]',
    hash TEXT NOT NULL UNIQUE,       -- SHA-256 of the secret; the secret itself is never stored
    created_at DOUBLE PRECISION NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at DOUBLE PRECISION
);

CREATE TABLE policies (
    version TEXT PRIMARY KEY,        -- SHA-256 of the bundle's canonical JSON
    name TEXT NOT NULL,
    text TEXT NOT NULL,              -- the YAML as deployed
    created_at DOUBLE PRECISION NOT NULL,
    created_by TEXT NOT NULL
);

-- Every change of what runs live, in shadow or as an experiment; the latest row per slot wins.
CREATE TABLE deployments (
    seq BIGINT PRIMARY KEY,
    slot TEXT NOT NULL,              -- live | shadow | experiment
    version TEXT,                    -- NULL: the slot was cleared
    share DOUBLE PRECISION,                      -- experiment: the share of tasks it decides
    split_by TEXT,                   -- experiment: task | tenant
    at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX deployments_slot ON deployments (slot, seq);

CREATE TABLE approvals (
    task_id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,              -- the rule as it was when the approval was asked (JSON)
    policy_version TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    escalated INTEGER NOT NULL DEFAULT 0,   -- escalation steps already notified
    next_at DOUBLE PRECISION NOT NULL,            -- when the next step or the expiry is due
    state TEXT NOT NULL,             -- pending | approved | rejected
    resolved_at DOUBLE PRECISION,
    resolved_by TEXT,
    reason TEXT
);
CREATE INDEX approvals_pending ON approvals (next_at) WHERE state = 'pending';

CREATE TABLE approval_votes (
    task_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    verdict TEXT NOT NULL,           -- approve | reject
    reason TEXT NOT NULL,
    edits TEXT NOT NULL DEFAULT '{}',
    at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (task_id, actor)
);

CREATE TABLE overrides (
    task_id TEXT NOT NULL,
    what TEXT NOT NULL,              -- pin | run_now
    value DOUBLE PRECISION,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION,
    PRIMARY KEY (task_id, what)
);

-- The live and the shadow bundle's first decision on each task, side by side, for
-- `tactician policy compare` (a shadow's decisions are never acted on).
CREATE TABLE decisions (
    task_id TEXT NOT NULL,
    slot TEXT NOT NULL,              -- live | shadow
    version TEXT NOT NULL,
    position DOUBLE PRECISION NOT NULL,          -- 0: first of its pass, 1: last
    action TEXT NOT NULL,
    confidence DOUBLE PRECISION NOT NULL,
    decided_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (task_id, slot, version)
);

-- Held tasks with a release time: the gate looks for due ones every half second.
CREATE INDEX tasks_held ON tasks (run_at) WHERE state = 'held';
CREATE INDEX tasks_awaiting ON tasks (id) WHERE state = 'awaiting_approval'
