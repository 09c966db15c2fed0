-- Where in the queue order the retention may stop looking: marks of (time, seq).
--
-- task_prune_finished walks each final state's tasks through (state, seq), oldest first,
-- and deletes those that finished before the retention's cutoff. Nothing bounded the walk:
-- the batch that found fewer old tasks than its size (every round ends with one, and in a
-- deployment's first week every batch is one) read the whole range of finished tasks, all
-- of them younger than the cutoff. At 1.2 million finished tasks that was 358 ms a batch,
-- growing with the table, under the leader row's share lock that every election and
-- renewal waits for; at about 30 million (7 days at 55 tasks/s) the statement timeout
-- would end every batch and nothing would be pruned again (docs/performance.md, "The
-- twelfth round").
--
-- A task's seq is drawn when it is enqueued (or re-queued by an operator's retry), and it
-- finishes after that, so every task that finished before a time T has a seq drawn before
-- T. The leader records, each retention round, the sequence's last value with the time it
-- read it; a prune bounds its walk by the newest mark at or before its cutoff, so it reads
-- the old tasks it deletes plus the few with an older seq that finished later (a task
-- delayed or retried for longer than the retention). An index on finished_at would bound
-- it too, at the price of one more index entry for every task that finishes.
CREATE TABLE conveyor_seq_marks (
    marked_at timestamptz PRIMARY KEY,
    seq       bigint NOT NULL
);

-- The tasks already here: every seq drawn so far is at most the sequence's last value.
-- Dated -infinity, this mark lets the pruner reach all of them at once (walking their
-- whole range, as it did before) until a mark of its own is older than the cutoff.
INSERT INTO conveyor_seq_marks (marked_at, seq)
SELECT '-infinity',
       coalesce(pg_sequence_last_value(pg_get_serial_sequence('conveyor_tasks', 'seq')::regclass), 0);
