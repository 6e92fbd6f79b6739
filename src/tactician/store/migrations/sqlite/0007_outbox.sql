-- The outbox table is PostgreSQL's only (an outbox source needs the row claim and the task commit
-- in one transaction of a server other applications write to). Both dialects count a bus source's
-- tasks not started yet for its backpressure (SqlStore.unstarted_from): this index keeps it cheap.
CREATE INDEX tasks_unstarted_by_source ON tasks (source)
    WHERE state IN ('pending', 'awaiting_approval', 'ready', 'leased', 'retry_wait', 'deferred', 'held')
