-- The KPI report (tactician report) reads a time window: what ended in it and what fell due in
-- it. Without these, each report would read the whole tasks table. Partial: a task that has not
-- ended, or has no deadline, costs no index entry.
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX tasks_due ON tasks (due_at) WHERE due_at IS NOT NULL
