-- The W3C traceparent a task continues (the ingest span's, or the incoming one when tracing is
-- off): the worker's run span is its child, so one trace reaches from the event to the handler.
ALTER TABLE tasks ADD COLUMN trace_context TEXT
