-- Throughput and failure rates over the last minute read the history by time.
-- The history is append-only with a monotonically growing `at`, so this index is written at
-- its right edge and stays cheap.
CREATE INDEX conveyor_task_events_at_idx ON conveyor_task_events (at);
