-- The durable core: tasks, their dependencies and attempts, kinds, pools, flow-control state.
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    release_at REAL NOT NULL,
    due_at REAL,
    due_sort REAL NOT NULL,          -- due_at, or far in the future: the EDF order key
    weight REAL NOT NULL,
    estimate REAL,
    attempt INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    source TEXT NOT NULL,
    schedule TEXT,                   -- the schedule that created it, if any
    idempotency_key TEXT,
    pool TEXT NOT NULL,
    units INTEGER NOT NULL,
    concurrency_key TEXT,
    target TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    has_deps INTEGER NOT NULL DEFAULT 0,
    run_at REAL,                     -- retry_wait: when the next attempt may start
    rank REAL NOT NULL DEFAULT 0,    -- the planner's order for claims
    lease_token INTEGER NOT NULL DEFAULT 0,
    lease_expires_at REAL,
    worker_id TEXT,
    started_at REAL,
    finished_at REAL,
    last_error TEXT,
    last_traceback TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE UNIQUE INDEX tasks_idempotency ON tasks (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_ready ON tasks (due_sort, id) WHERE state = 'ready';
CREATE INDEX tasks_leased ON tasks (rank, id) WHERE state = 'leased';
CREATE INDEX tasks_active ON tasks (lease_expires_at) WHERE state IN ('leased', 'running');
CREATE INDEX tasks_waiting ON tasks (run_at) WHERE state = 'retry_wait';
CREATE INDEX tasks_pending ON tasks (release_at) WHERE state = 'pending';
CREATE INDEX tasks_schedule ON tasks (schedule, state) WHERE schedule IS NOT NULL;

CREATE TABLE task_deps (
    task_id TEXT NOT NULL,
    depends_on TEXT NOT NULL,
    PRIMARY KEY (task_id, depends_on)
);
CREATE INDEX task_deps_upstream ON task_deps (depends_on);

CREATE TABLE attempts (
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    token INTEGER NOT NULL,
    worker_id TEXT,
    started_at REAL,
    finished_at REAL NOT NULL,
    outcome TEXT NOT NULL,           -- succeeded | failed | timeout | lost | cancelled
    error TEXT,
    PRIMARY KEY (task_id, token)
);

CREATE TABLE kinds (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    updated_at REAL NOT NULL
);

CREATE TABLE pools (
    name TEXT PRIMARY KEY,
    capacity INTEGER                 -- NULL: unbounded
);

CREATE TABLE rate_buckets (
    key TEXT PRIMARY KEY,
    tokens REAL NOT NULL,
    updated_at REAL NOT NULL
);

CREATE TABLE targets (
    target TEXT PRIMARY KEY,
    breaker TEXT NOT NULL DEFAULT 'closed',
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    opened_at REAL,
    concurrency_limit REAL,
    latency_floor REAL
);

CREATE TABLE schedules (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    last_tick REAL,
    buffered_tick REAL,
    created_at REAL NOT NULL
);

CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    kinds TEXT NOT NULL,
    started_at REAL NOT NULL,
    seen_at REAL NOT NULL
);

CREATE TABLE leader (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL
);
