-- What each planner and worker process counted in memory (tactician.observe.counters): every few
-- seconds, and at exit, a process adds its counts since its last flush here in one transaction,
-- and a scrape reads the sums. A histogram has one row per bucket (its upper bound; counts not
-- cumulative) and one whose bucket is 'sum'; a counter's bucket is ''.
CREATE TABLE metric_counters (
    name TEXT NOT NULL,
    labels TEXT NOT NULL,            -- canonical JSON of the label values: {"tier":"1"}, or {}
    bucket TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, labels, bucket)
)
