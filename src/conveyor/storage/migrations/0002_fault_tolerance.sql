-- Fault tolerance: leader election, worker health, task progress.

-- Leader election among servers, judged by the database clock.
--
-- One row per elected role. A server holds the role while expires_at is in the future and
-- renews it well before; `term` grows on every change of holder and after any lapse, and
-- every leader-only write checks (holder, term, expires_at > now()) in the same statement,
-- holding this row FOR SHARE, so a leader paused past its lease cannot write with its old
-- term: a new election must wait for that write to commit, and the write sees the lapse.
CREATE TABLE conveyor_leader (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    term        bigint NOT NULL CHECK (term > 0),
    elected_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

-- Every term ever started, for the audit trail: the primary key makes "at most one leader
-- per term" a property of the data, not a hope.
CREATE TABLE conveyor_leader_terms (
    name        text NOT NULL,
    term        bigint NOT NULL,
    holder      text NOT NULL,
    elected_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, term)
);

-- What workers report about themselves with each heartbeat.
ALTER TABLE conveyor_workers ADD COLUMN in_flight integer NOT NULL DEFAULT 0;
-- The longest the worker's event loop was blocked since its previous heartbeat.
ALTER TABLE conveyor_workers ADD COLUMN loop_lag_ms integer NOT NULL DEFAULT 0;

-- Handlers may prove progress (ctx.heartbeat); the latest report is kept on the task.
ALTER TABLE conveyor_tasks ADD COLUMN progress text;
ALTER TABLE conveyor_tasks ADD COLUMN progress_at timestamptz;

-- The sweeper releases a lost worker's leases at once: find them by worker.
CREATE INDEX conveyor_tasks_running_worker_idx ON conveyor_tasks (worker_id)
    WHERE state = 'running';
