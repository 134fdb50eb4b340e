-- The `traceparent` of the call that wrote the event, so that its
-- delivery joins that call's trace. NULL when traces were not exported.
ALTER TABLE trellis_outbox ADD COLUMN trace_context text;
