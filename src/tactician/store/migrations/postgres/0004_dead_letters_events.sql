-- Events refused at ingestion, kept as received for inspection (promise 5). Ids are
-- time-sortable, so pages go by id; the index on received_at serves look-ups by time.
CREATE TABLE dead_letters (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,            -- the ingestion source: alertmanager, cloudevents, a webhook
    received_at DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL,            -- the one-line error the sender was answered with
    body TEXT NOT NULL,              -- the raw body; bytes that are not UTF-8 as \xNN escapes
    headers TEXT NOT NULL            -- the request's headers as a JSON object
);
CREATE INDEX dead_letters_received ON dead_letters (received_at)
;

-- Signatures of signed webhooks already taken: one is refused the second time (replay), and
-- those older than the replay window are dropped (an older request fails the window anyway).
CREATE TABLE seen_signatures (
    signature TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX seen_signatures_at ON seen_signatures (seen_at)
