-- Operators list dead letters often and there are few of them: a small partial index.
CREATE INDEX tasks_dead ON tasks (id) WHERE state = 'dead'
