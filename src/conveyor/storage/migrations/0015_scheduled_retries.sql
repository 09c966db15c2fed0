-- oldest-compatible-schema: 15
-- Tasks waiting out a retry backoff get a state of their own, `scheduled`, out of the queue.
--
-- A failed attempt's task went back to `queued` with `available_at` in the future and kept
-- its `seq`, its place at the head of its type's range of the (type, state, seq) index. The
-- claim reads that range in seq order with `available_at <= now()` as a filter, so it
-- walked past every task in backoff before the first available one, and a claim finding
-- none walked them all; so did the FIFO check of a handed-over enqueue. An audit measured,
-- with 300,000 tasks of one type in backoff (a downstream outage), 34 ms for a claim of 10
-- instead of 5 (109 ms when none was available) and 31 ms for a handed-over enqueue
-- instead of 0.5, for as long as the backoffs lasted.
--
-- A retry now waits as `scheduled` and joins the queue, in its place (its seq), when its
-- backoff ends: the server that scheduled it promotes it then (the timer that used to only
-- wake the polls), and the leader promotes whatever is due at each reaper round, for timers
-- lost with their server. The claim's range holds only tasks that are available or nearly
-- so. Publicly the state is still QUEUED ("queued, not available before available_at"):
-- clients, the CLI and the dashboard see no new state.
--
-- Servers of schema 14 cannot run on this: they would read `scheduled` rows they do not
-- know, and would not promote them. Tasks already in backoff stay `queued` and are claimed
-- as before once due (the claim keeps its `available_at` filter).
--
-- PostgreSQL adds an enum value in a transaction but lets nobody use it until that
-- transaction commits, and every pending migration runs in one transaction: the promotion's
-- index therefore names the value by its place, after the five the type was created with.
-- Only the scheduled tasks are in it, so it costs an index entry per retry, not per task.
ALTER TYPE conveyor_task_state ADD VALUE IF NOT EXISTS 'scheduled';
CREATE INDEX IF NOT EXISTS conveyor_tasks_scheduled_idx ON conveyor_tasks (available_at)
    WHERE state > 'cancelled';
