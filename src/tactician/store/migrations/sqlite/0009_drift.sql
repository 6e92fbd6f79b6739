-- The decision service's drift fallback: one row while it is engaged (a detected drift switched
-- ranking to the bundle's conservative heuristic), none once an operator cleared it. Engaging
-- and clearing each write their audit record in the same transaction.
CREATE TABLE drift_fallback (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    since_at REAL NOT NULL,
    signal TEXT NOT NULL,            -- what drifted: duration_error:<kind>, miss_rate, feature:<name>
    reason TEXT NOT NULL,            -- the detection's one-line text
    policy TEXT NOT NULL             -- the live bundle's version that asked for the fallback
)
;

-- Reading the chain by action (drift records, a kind of intervention) without reading it whole.
CREATE INDEX audit_log_action ON audit_log (action, seq)
