-- The latest outcomes (`outcomes`: the planner's history and fair share every 30 s, `tasks
-- why` with fair share on, training) read by finish time without sorting every attempt.
CREATE INDEX attempts_finished ON attempts (finished_at) WHERE finished_at IS NOT NULL;
