-- Operator control and inspection: paused task types, task listings, trace context.

-- A paused type is not leased: the claim skips it (one primary-key probe per wanted type).
-- Its queued tasks stay queued and keep their place; running attempts finish normally.
CREATE TABLE conveyor_paused_types (
    type       text PRIMARY KEY CHECK (type ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    paused_at  timestamptz NOT NULL DEFAULT now(),
    reason     text
);

-- Task listings (`conveyor tasks list`, the dashboard, bulk retry/cancel by filter) page
-- newest first by queue order, filtered by state, or by type and state. Each listing is
-- one index range scan per state however many tasks the table holds.
CREATE INDEX conveyor_tasks_state_seq_idx ON conveyor_tasks (state, seq);
CREATE INDEX conveyor_tasks_type_state_seq_idx ON conveyor_tasks (type, state, seq);

-- W3C trace context (traceparent, tracestate) of the producer, handed to the handler so its
-- spans join the producer's trace. NULL when the producer had none.
ALTER TABLE conveyor_tasks ADD COLUMN trace_context jsonb;
