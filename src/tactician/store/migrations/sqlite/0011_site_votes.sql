-- Votes on a site's approvals (tactician.agent.approvals). The centre keeps the first table, an
-- agent's own SQLite file the second; both dialects carry both, as in 0010.

-- At the centre: a vote an approver cast on a site's pending approval, sent to the site with
-- each sync reply until the agent reports what its gate made of it.
CREATE TABLE site_votes (
    id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    task_id TEXT NOT NULL,
    actor TEXT NOT NULL,             -- the voter as the centre authenticated them
    role TEXT NOT NULL,
    groups TEXT NOT NULL,            -- JSON list
    verdict TEXT NOT NULL,           -- approve or reject
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',   -- queued, then applied or refused at the site
    message TEXT,                    -- the site's answer: the tally, or why its gate refused
    reported_at REAL
);
CREATE INDEX site_votes_queued ON site_votes (site, state, id);
CREATE INDEX site_votes_task ON site_votes (site, task_id);

-- At the centre: a site's approval records, to tell the pending ones from the resolved.
CREATE INDEX site_records_action ON site_records (site, action, subject);

-- At the centre: the mirrored approval records of a task, without reading the chain whole.
CREATE INDEX audit_log_site_approval ON audit_log (subject)
    WHERE action >= 'site.approval.' AND action < 'site.approval/';

-- At an agent: what its gate made of each vote from the centre (applied once per id, however
-- often the centre sends it), kept until the centre has the report and after (late resends).
CREATE TABLE agent_votes (
    id TEXT PRIMARY KEY,             -- the centre's vote id
    task_id TEXT NOT NULL,
    ok INTEGER NOT NULL,             -- 1: applied, 0: refused
    message TEXT NOT NULL,
    at REAL NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX agent_votes_unreported ON agent_votes (reported, id)
