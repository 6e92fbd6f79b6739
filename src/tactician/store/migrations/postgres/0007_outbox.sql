-- The outbox: other applications insert events here, in their own transactions, and an outbox
-- source of `tactician ingest` turns them into tasks. It claims rows with SKIP LOCKED and deletes
-- them in the transaction that commits their tasks (or their dead letters), so each row becomes
-- its task exactly once. Rows are taken in id order per source.
CREATE TABLE outbox (
    id BIGSERIAL PRIMARY KEY,
    source TEXT NOT NULL,                        -- the outbox source (its `name`) that takes it
    body TEXT NOT NULL,                          -- the event, read as that source's format says
    headers JSONB NOT NULL DEFAULT '{}'::jsonb,  -- text values: content-type, ce-* (CloudEvents)
    created_at DOUBLE PRECISION NOT NULL DEFAULT extract(epoch from clock_timestamp())
);
CREATE INDEX outbox_by_source ON outbox (source, id);

-- One NOTIFY per inserting statement and source wakes the outbox sources at once (they also
-- poll, so a lost notification only delays a row).
CREATE FUNCTION tactician_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tactician_outbox', s.source) FROM (SELECT DISTINCT source FROM inserted) AS s;
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION tactician_outbox_notify();

-- A bus source's backpressure counts its tasks not started yet (SqlStore.unstarted_from): this
-- index keeps that count cheap however many finished tasks the source made.
CREATE INDEX tasks_unstarted_by_source ON tasks (source)
    WHERE state IN ('pending', 'awaiting_approval', 'ready', 'leased', 'retry_wait', 'deferred', 'held');
