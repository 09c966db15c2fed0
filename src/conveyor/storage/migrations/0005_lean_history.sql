-- A leaner history table: every task writes three history rows (enqueued, started,
-- succeeded), so each index and trigger on it is paid three times per task.
--
-- * The foreign key to conveyor_tasks goes. Its check ran a `SELECT ... FOR KEY SHARE` on the
--   task for every history row: a trigger call, a row lock and a WAL record, three times per
--   task (a tenth of the database's time in the drain benchmark). History rows are only
--   ever written by the same statement that changes the task they describe, so the key
--   can never dangle; the one place that relied on its ON DELETE CASCADE, the retention
--   prune, now deletes a task's history in the same statement that deletes the task.
-- * The primary key becomes (task_id, id): the index that reads a task's timeline in order
--   is then the primary key itself, instead of a second index next to one on `id` alone
--   that no query reads. `id` stays an identity column: it orders one task's events.
ALTER TABLE conveyor_task_events DROP CONSTRAINT conveyor_task_events_task_id_fkey;
ALTER TABLE conveyor_task_events DROP CONSTRAINT conveyor_task_events_pkey;
DROP INDEX conveyor_task_events_task_idx;
ALTER TABLE conveyor_task_events
    ADD CONSTRAINT conveyor_task_events_pkey PRIMARY KEY (task_id, id);
