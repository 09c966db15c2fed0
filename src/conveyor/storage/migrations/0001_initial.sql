-- Conveyor schema, version 1: tasks, their history, workers.
--
-- Invariants are enforced here as well as in code: a running task always holds a
-- lease, attempts never exceed 1 + max_retries, type names follow the documented
-- pattern. Every per-task query is served by one of the indexes below (see
-- tests/integration/test_query_plans.py, which checks them with EXPLAIN).

CREATE TYPE conveyor_task_state AS ENUM ('queued', 'running', 'succeeded', 'failed', 'cancelled');

CREATE TABLE conveyor_tasks (
    id                uuid PRIMARY KEY,
    -- FIFO order: a task keeps its place across retries.
    seq               bigint GENERATED ALWAYS AS IDENTITY,
    type              text NOT NULL CHECK (type ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    state             conveyor_task_state NOT NULL DEFAULT 'queued',
    attempt           integer NOT NULL DEFAULT 0,
    max_retries       integer NOT NULL CHECK (max_retries >= 0),
    timeout           interval NOT NULL CHECK (timeout > interval '0'),
    created_at        timestamptz NOT NULL DEFAULT now(),
    available_at      timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    worker_id         text,
    -- The fencing token of the current attempt; NULL whenever the task is not running.
    lease_id          uuid,
    lease_expires_at  timestamptz,
    -- started_at + timeout of the current attempt; the lease never outlives it by more
    -- than the server's grace period.
    deadline_at       timestamptz,
    last_error        text,
    payload           bytea NOT NULL,
    result            bytea,
    CONSTRAINT conveyor_tasks_attempt_range CHECK (attempt >= 0 AND attempt <= max_retries + 1),
    CONSTRAINT conveyor_tasks_running_has_lease CHECK (
        (state = 'running') = (lease_id IS NOT NULL AND lease_expires_at IS NOT NULL)
    )
) WITH (fillfactor = 80);  -- free space on each page for the updated row versions

-- The claim: oldest queued task of a type. Partial, so it holds only the backlog.
CREATE INDEX conveyor_tasks_claim_idx ON conveyor_tasks (type, seq) WHERE state = 'queued';
-- The reaper: running tasks whose lease ran out.
CREATE INDEX conveyor_tasks_lease_expiry_idx ON conveyor_tasks (lease_expires_at)
    WHERE state = 'running';

CREATE TABLE conveyor_task_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id    uuid NOT NULL REFERENCES conveyor_tasks (id) ON DELETE CASCADE,
    at         timestamptz NOT NULL DEFAULT now(),
    -- enqueued, started, succeeded, failed, timed_out, lease_expired, released, cancelled
    event      text NOT NULL,
    -- The state the task is in after this event.
    state      conveyor_task_state NOT NULL,
    attempt    integer NOT NULL,
    worker_id  text,
    detail     text
);

CREATE INDEX conveyor_task_events_task_idx ON conveyor_task_events (task_id, id);

CREATE TABLE conveyor_workers (
    id                 text PRIMARY KEY,
    host               text NOT NULL,
    pid                integer NOT NULL,
    task_types         text[] NOT NULL,
    concurrency        integer NOT NULL CHECK (concurrency > 0),
    version            text NOT NULL,
    state              text NOT NULL DEFAULT 'active'
                       CHECK (state IN ('active', 'draining', 'lost', 'stopped')),
    started_at         timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at  timestamptz NOT NULL DEFAULT now()
);
