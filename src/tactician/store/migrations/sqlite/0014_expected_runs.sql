-- The run time the planner expected when it granted the task (seconds), kept while the task
-- holds its units so that EASY reservations know when they come free (NULL: granted without
-- reservations, or with no expectation).
ALTER TABLE tasks ADD COLUMN expected_s REAL;
