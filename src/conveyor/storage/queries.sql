-- Every query Conveyor runs at runtime, one "-- name:" block each, named noun first.
-- Values are always bind parameters. A state change and its history row are written by
-- the same statement, so they commit or roll back together. The one exception is a task's
-- first event, `enqueued`: the task row is its record, and readers see it through the
-- view conveyor_task_history (migration 0009).

-- name: task_insert_many
-- $1 ids; $2 types, $3 payloads, $4 timeouts (seconds), $5 max_retries, $6 trace contexts
-- (JSON text or NULL). $1 has one element per task, in the batch's order; each of $2-$6
-- has either one element per task too, or a single element that applies to every task (a
-- batch mostly repeats one type, timeout and retry count: sending it once spares encoding
-- and decoding a thousand copies).
-- Inserts the tasks in that order (their seq follows it) and wakes the long polls once.
-- No history row: a task's `enqueued` event is read from its row (conveyor_task_history).
-- For ids that are all new: an id already taken fails the whole statement with
-- unique_violation and nothing is inserted; the caller then runs
-- task_insert_skipping_taken. Deciding that per row instead (ON CONFLICT) costs a second
-- index descent per task, about a sixth of the statement.
WITH inserted AS (
    INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries, trace_context)
    SELECT i.id,
           CASE WHEN cardinality($2::text[]) = 1 THEN ($2::text[])[1] ELSE i.type END,
           CASE WHEN cardinality($3::bytea[]) = 1 THEN ($3::bytea[])[1] ELSE i.payload END,
           make_interval(secs => CASE WHEN cardinality($4::float8[]) = 1
                                      THEN ($4::float8[])[1] ELSE i.timeout_s END),
           CASE WHEN cardinality($5::integer[]) = 1 THEN ($5::integer[])[1] ELSE i.max_retries END,
           (CASE WHEN cardinality($6::text[]) = 1 THEN ($6::text[])[1] ELSE i.trace_context END)::jsonb
    FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::float8[], $5::integer[], $6::text[])
        WITH ORDINALITY AS i (id, type, payload, timeout_s, max_retries, trace_context, ord)
    ORDER BY i.ord
    RETURNING id
), wake AS (
    -- One payload-free notification per commit wakes every long poll.
    SELECT pg_notify('conveyor_task_ready', '') FROM (SELECT 1 FROM inserted LIMIT 1) AS any_inserted
)
SELECT (SELECT count(*) FROM wake) AS woken;

-- name: task_insert_skipping_taken
-- The parameters of task_insert_many, and its inserts, but idempotent per id: an id already
-- taken (by an existing task, or by an earlier entry of the same batch) is skipped.
-- Returns one row whatever the batch size: `skipped`, the 1-based positions of the entries
-- whose id some other task already had (usually none). A repeat of an id within the batch
-- is not listed there: the caller sees it in its own input.
WITH inserted AS (
    INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries, trace_context)
    SELECT i.id,
           CASE WHEN cardinality($2::text[]) = 1 THEN ($2::text[])[1] ELSE i.type END,
           CASE WHEN cardinality($3::bytea[]) = 1 THEN ($3::bytea[])[1] ELSE i.payload END,
           make_interval(secs => CASE WHEN cardinality($4::float8[]) = 1
                                      THEN ($4::float8[])[1] ELSE i.timeout_s END),
           CASE WHEN cardinality($5::integer[]) = 1 THEN ($5::integer[])[1] ELSE i.max_retries END,
           (CASE WHEN cardinality($6::text[]) = 1 THEN ($6::text[])[1] ELSE i.trace_context END)::jsonb
    FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::float8[], $5::integer[], $6::text[])
        WITH ORDINALITY AS i (id, type, payload, timeout_s, max_retries, trace_context, ord)
    ORDER BY i.ord
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), wake AS (
    -- One payload-free notification per commit wakes every long poll.
    SELECT pg_notify('conveyor_task_ready', '') FROM (SELECT 1 FROM inserted LIMIT 1) AS any_inserted
)
SELECT ARRAY(
           SELECT given.ord::integer
           FROM unnest($1::uuid[]) WITH ORDINALITY AS given (id, ord)
           WHERE NOT EXISTS (SELECT FROM inserted WHERE inserted.id = given.id)
           ORDER BY given.ord
       ) AS skipped,
       (SELECT count(*) FROM wake) AS woken;

-- name: task_insert_one
-- $1 id, $2 type, $3 payload, $4 timeout (s), $5 max_retries, $6 trace context (JSON text
-- or NULL). task_insert_skipping_taken for a batch of one, the common case of a producer
-- enqueueing one task at a time: without the arrays, their unnest and the per-column
-- CASE, PostgreSQL spends 35-75 µs less CPU on each (W3 sequential: 327-341 µs per enqueue
-- against 376-402), and sequential enqueues run 4-8 % faster (docs/performance.md, "The
-- ninth round").
-- Returns `created` (false: the id was already taken).
WITH inserted AS (
    INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries, trace_context)
    VALUES ($1::uuid, $2::text, $3::bytea, make_interval(secs => $4::float8), $5::integer,
            $6::text::jsonb)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), wake AS (
    -- One payload-free notification per commit wakes every long poll.
    SELECT pg_notify('conveyor_task_ready', '') FROM inserted
)
SELECT EXISTS (SELECT FROM inserted) AS created, (SELECT count(*) FROM wake) AS woken;

-- name: task_insert_leasing
-- The parameters of task_insert_skipping_taken, then $7 the worker each task is offered to
-- (NULL: none), $8 lease ttl (s: the longest of the offered workers', see
-- worker_lease_ttl), $9 grace after deadline (s), $10 the lease id each
-- offered task gets (made by the server, so it can hand the lease back by that id if it
-- cannot tell whether the statement committed). Inserts like
-- task_insert_skipping_taken, but a task offered to a worker (a long poll of this server
-- waiting for its type) is inserted already leased to it, as task_claim would lease it,
-- with its `started` event: the enqueue's own statement and commit hand it over, with no
-- claim after it. Only when that keeps FIFO order and pauses: its type has no task queued
-- and available (an older task would have to start first) and is not paused; otherwise the
-- task is queued as usual. Returns one row per entry in order: `created` (false: the id was
-- taken, or repeats an earlier entry), and for a task leased here the columns task_claim
-- returns, with `leased` true.
WITH given AS (
    SELECT i.id, i.ord, i.worker_id, i.lease_id,
           CASE WHEN cardinality($2::text[]) = 1 THEN ($2::text[])[1] ELSE i.type END AS type,
           CASE WHEN cardinality($3::bytea[]) = 1 THEN ($3::bytea[])[1] ELSE i.payload END
               AS payload,
           make_interval(secs => CASE WHEN cardinality($4::float8[]) = 1
                                      THEN ($4::float8[])[1] ELSE i.timeout_s END) AS timeout,
           CASE WHEN cardinality($5::integer[]) = 1 THEN ($5::integer[])[1] ELSE i.max_retries END
               AS max_retries,
           (CASE WHEN cardinality($6::text[]) = 1 THEN ($6::text[])[1] ELSE i.trace_context END)::jsonb
               AS trace_context
    FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::float8[], $5::integer[], $6::text[],
                $7::text[], $10::uuid[])
        WITH ORDINALITY AS i (id, type, payload, timeout_s, max_retries, trace_context,
                              worker_id, lease_id, ord)
), open_types AS (
    -- Types a task may skip the queue for: nothing of theirs waits (a probe of
    -- (type, state, seq) each) and they are not paused (a primary-key probe each).
    SELECT DISTINCT g.type
    FROM given AS g
    WHERE g.worker_id IS NOT NULL
      AND NOT EXISTS (SELECT FROM conveyor_tasks AS t
                      WHERE t.type = g.type AND t.state = 'queued' AND t.available_at <= now())
      AND NOT EXISTS (SELECT FROM conveyor_paused_types AS p WHERE p.type = g.type)
), inserted AS (
    INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries, trace_context, state,
                                attempt, worker_id, lease_id, started_at, deadline_at,
                                lease_expires_at)
    SELECT g.id, g.type, g.payload, g.timeout, g.max_retries, g.trace_context,
           CASE WHEN o.type IS NULL THEN 'queued' ELSE 'running' END::conveyor_task_state,
           CASE WHEN o.type IS NULL THEN 0 ELSE 1 END,
           CASE WHEN o.type IS NULL THEN NULL ELSE g.worker_id END,
           CASE WHEN o.type IS NULL THEN NULL ELSE g.lease_id END,
           CASE WHEN o.type IS NULL THEN NULL ELSE now() END,
           CASE WHEN o.type IS NULL THEN NULL ELSE now() + g.timeout END,
           CASE WHEN o.type IS NULL THEN NULL ELSE least(
               now() + make_interval(secs => $8), now() + g.timeout + make_interval(secs => $9)
           ) END
    FROM given AS g
    LEFT JOIN open_types AS o ON o.type = g.type AND g.worker_id IS NOT NULL
                              AND g.lease_id IS NOT NULL
    ORDER BY g.ord
    ON CONFLICT (id) DO NOTHING
    RETURNING id, type, payload, attempt, max_retries, timeout, lease_id, lease_expires_at,
              deadline_at, trace_context::text AS trace_context, state, worker_id
), history AS (
    INSERT INTO conveyor_task_events (task_id, event, state, attempt, worker_id)
    SELECT id, 'started', 'running', attempt, worker_id FROM inserted WHERE state = 'running'
), wake AS (
    -- Only tasks left queued need a long poll to claim them.
    SELECT pg_notify('conveyor_task_ready', '')
    FROM (SELECT 1 FROM inserted WHERE state = 'queued' LIMIT 1) AS any_queued
)
SELECT g.ord, i.id IS NOT NULL AS created, i.state = 'running' AS leased,
       i.id, i.type, i.payload, i.attempt, i.max_retries, i.timeout, i.lease_id,
       i.lease_expires_at, i.deadline_at, 0::float8 AS waited, i.trace_context,
       (SELECT count(*) FROM wake) AS woken
FROM given AS g LEFT JOIN inserted AS i ON i.id = g.id
ORDER BY g.ord;

-- name: task_claim
-- $1 task types, $2 max tasks, $3 worker id, $4 lease ttl (s: the worker's, see
-- worker_lease_ttl), $5 grace after deadline (s),
-- $6 the bytes the leases may take in one message (NULL: no bound), $7 a lease's bytes
-- besides its payload and its trace context's JSON text.
-- Oldest first within each type (one range of (type, state, seq) per type), then oldest
-- overall.
-- Paused types are skipped (a primary-key probe each).
-- Bounded by bytes as well as by count: the oldest candidates whose leases, estimated as
-- the server's lease_size_bound estimates them, fit $6 together (always the oldest one,
-- which fits any message alone), so a claim takes nothing its message cannot carry.
-- Neither size reads a TOASTed value: octet_length of a bytea reads the length from its
-- TOAST pointer, and a trace context is small. The candidates are locked before they are
-- measured (FOR UPDATE takes no window function at its own level), so candidates past the
-- bound stay locked, untouched, until the claim commits; another claim skips them meanwhile.
-- `more` (on every row): a candidate was left for want of room, so tasks remain ready and
-- the claim has not drained its types (wake_rounds.py).
-- A claim that leased nothing returns one row of NULLs but `held` instead, when a task of
-- its types was ready in its snapshot: another claim had it locked (a worker serving
-- several types locks candidates of each and keeps the oldest overall), so the types are
-- not drained and the poll claims again soon (WorkerService.lease). The probe runs only
-- then (its subplan's one-time filter reads `claimed` first), one index descent per type.
WITH candidates AS (
    SELECT c.id, c.seq, c.lease_bytes
    FROM unnest($1::text[]) AS wanted (type)
    CROSS JOIN LATERAL (
        SELECT t.id, t.seq,
               octet_length(t.payload) + coalesce(octet_length(t.trace_context::text), 0)
                   + $7::integer AS lease_bytes
        FROM conveyor_tasks AS t
        WHERE t.state = 'queued' AND t.type = wanted.type AND t.available_at <= now()
        ORDER BY t.seq
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ) AS c
    WHERE NOT EXISTS (SELECT 1 FROM conveyor_paused_types AS p WHERE p.type = wanted.type)
    ORDER BY c.seq
    LIMIT $2
), fitting AS (
    -- A prefix in seq order: the running sum (bigint, of integers) only grows, so FIFO
    -- holds.
    SELECT id
    FROM (SELECT id,
                 sum(lease_bytes) OVER (ORDER BY seq) AS through,
                 row_number() OVER (ORDER BY seq) AS position
          FROM candidates) AS measured
    WHERE position = 1 OR $6::bigint IS NULL OR through <= $6::bigint
), claimed AS (
    UPDATE conveyor_tasks AS t
    SET state = 'running',
        attempt = t.attempt + 1,
        worker_id = $3,
        lease_id = gen_random_uuid(),
        started_at = now(),
        deadline_at = now() + t.timeout,
        lease_expires_at = least(
            now() + make_interval(secs => $4), now() + t.timeout + make_interval(secs => $5)
        )
    FROM fitting
    WHERE t.id = fitting.id
    RETURNING t.id, t.seq, t.type, t.payload, t.attempt, t.max_retries, t.timeout,
              t.lease_id, t.lease_expires_at, t.deadline_at, t.trace_context::text AS trace_context,
              -- queue wait: from becoming available (enqueue, or end of backoff) to start
              extract(epoch FROM now() - t.available_at)::float8 AS waited
), history AS (
    INSERT INTO conveyor_task_events (task_id, event, state, attempt, worker_id)
    SELECT id, 'started', 'running', attempt, $3 FROM claimed
)
SELECT id, type, payload, attempt, max_retries, timeout, lease_id, lease_expires_at, deadline_at,
       waited, trace_context,
       (SELECT count(*) FROM candidates) > (SELECT count(*) FROM fitting) AS more,
       false AS held, seq
FROM claimed
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, false, true, NULL
WHERE NOT EXISTS (SELECT 1 FROM claimed)
  AND EXISTS (
    SELECT 1
    FROM unnest($1::text[]) AS wanted (type)
    CROSS JOIN LATERAL (
        SELECT 1
        FROM conveyor_tasks AS t
        WHERE t.state = 'queued' AND t.type = wanted.type AND t.available_at <= now()
        LIMIT 1
    ) AS ready
    WHERE NOT EXISTS (SELECT 1 FROM conveyor_paused_types AS p WHERE p.type = wanted.type)
  )
ORDER BY seq;

-- name: task_succeed
-- $1 task id, $2 lease id, $3 result (nullable), $4 the reporting worker's id.
-- Every report is fenced by (lease id, worker id): a lease id reported by any worker but
-- the one that holds it is refused, even if it leaked.
-- A lease (its id and its expiry) means the task is running: the table's CHECK
-- `conveyor_tasks_running_has_lease` ties `state = 'running'` to both. So this and every
-- other report and heartbeat name the lease and its expiry and leave the state unnamed:
-- with `state = 'running'` in the probe, statistics gathered while no task ran (after a
-- burst of enqueues) made the planner read every running task through (state, seq), dead
-- entries too, for each report instead of one primary-key probe (docs/performance.md,
-- "The tenth round"). The expiry is what the CHECK needs: a lease id alone on a task in
-- another state would pass it.
-- Every report (this one, task_succeed_many, task_fail, task_release) clears the expiry and
-- keeps the lease id: the row then says which lease settled the task's last attempt, at no
-- cost of its own, so that a worker sending an applied outcome again (its answer was lost)
-- is told it was applied rather than refused as stale (task_briefs_get). A claim replaces
-- the lease id; the reaper, cancels and operator retries clear it.
WITH done AS (
    UPDATE conveyor_tasks
    SET state = 'succeeded', finished_at = now(), result = $3, last_error = NULL,
        lease_expires_at = NULL, deadline_at = NULL
    WHERE id = $1 AND lease_id = $2 AND lease_expires_at IS NOT NULL AND worker_id = $4
    RETURNING id, type, state, attempt, worker_id,
              extract(epoch FROM now() - started_at)::float8 AS ran_for
), history AS (
    INSERT INTO conveyor_task_events (task_id, event, state, attempt, worker_id)
    SELECT id, 'succeeded', state, attempt, worker_id FROM done
)
SELECT type, state, ran_for FROM done;

-- name: task_succeed_many
-- $1 task ids, $2 lease ids, $3 results (NULL: none), $4 has_result flags, $5 the reporting
-- workers' ids, one element per report. Applies every success whose lease is current, in
-- one statement (group commit of concurrent reports). Returns one row per input, in input
-- order: `applied` says whether that report took effect (false: fencing refused it, or an
-- earlier report of the same task with a current lease in this statement already did), and
-- `busy` that it was not applied because another transaction holds the task's row, whose
-- lease this statement's snapshot still saw current: the caller applies that one alone
-- (task_succeed), which waits for the lock on a connection of its own. SKIP LOCKED: a
-- joined write that waited for a row locked elsewhere (an operator's open transaction)
-- held every success joined to it, and the group commit's slots, until the lock went.
-- Rows are locked in task id order, the lock order of every multi-row writer, so
-- concurrent statements do not deadlock.
WITH input AS (
    -- Each array through a scalar subquery, so that no plan knows its length. A custom plan
    -- that does prices a batch of a few reports below the generic plan (which guesses ten),
    -- and PostgreSQL then planned every execution anew (0.3-0.7 ms, more than running it)
    -- and never kept the generic plan; now a connection keeps it from the sixth execution
    -- on (docs/performance.md, "The eleventh round").
    SELECT *
    FROM unnest((SELECT $1::uuid[]), (SELECT $2::uuid[]), (SELECT $3::bytea[]),
                (SELECT $4::boolean[]), (SELECT $5::text[]))
        WITH ORDINALITY AS i (task_id, lease_id, result, has_result, worker_id, ord)
), target AS (
    -- One primary-key probe per report, locked in task id order. Written as a join, the
    -- planner read batches of about 70 reports and more by scanning every running task
    -- through the reaper's index and hashing them: at 5,000 running, 5-7 ms for 100 reports
    -- where the probes take 2-3 (docs/performance.md, "The ninth round"). A locking LATERAL
    -- subquery cannot be flattened into a join, so each report is one probe.
    -- Of a task's reports, the first whose lease is current wins: a stale report of the
    -- same task earlier in the batch (another worker's, joined by the group commit) must
    -- not hide it, or the holder would be told its lease was lost and the task run again.
    SELECT DISTINCT ON (input.task_id)
           t.id, input.ord, input.lease_id, input.result, input.has_result
    FROM (SELECT * FROM input ORDER BY task_id, ord) AS input
    CROSS JOIN LATERAL (
        SELECT t.id FROM conveyor_tasks AS t
        WHERE t.id = input.task_id AND t.lease_id = input.lease_id
          AND t.lease_expires_at IS NOT NULL  -- with the lease, 'running' (task_succeed)
          AND t.worker_id = input.worker_id
        FOR UPDATE SKIP LOCKED
    ) AS t
    ORDER BY input.task_id, input.ord
), done AS (
    UPDATE conveyor_tasks AS t
    SET state = 'succeeded', finished_at = now(),
        result = CASE WHEN target.has_result THEN target.result END, last_error = NULL,
        lease_expires_at = NULL, deadline_at = NULL
    FROM target
    -- The rows are locked and checked above. Saying `state = 'running'` again here would let
    -- the planner scan every running task through the reaper's index instead of probing.
    WHERE t.id = target.id AND t.lease_id = target.lease_id
    RETURNING t.id, t.type, t.state, t.attempt, t.worker_id,
              extract(epoch FROM now() - t.started_at)::float8 AS ran_for
), history AS (
    INSERT INTO conveyor_task_events (task_id, event, state, attempt, worker_id)
    SELECT id, 'succeeded', state, attempt, worker_id FROM done
)
SELECT input.task_id, done.id IS NOT NULL AS applied, done.type, done.state, done.ran_for,
       -- CASE, so that an applied report (nearly all) reads nothing more.
       CASE WHEN done.id IS NOT NULL THEN false
            ELSE NOT EXISTS (SELECT FROM done AS d WHERE d.id = input.task_id)
                 AND EXISTS (
                     SELECT FROM conveyor_tasks AS s
                     WHERE s.id = input.task_id AND s.lease_id = input.lease_id
                       AND s.lease_expires_at IS NOT NULL AND s.worker_id = input.worker_id
                 )
       END AS busy
FROM input
LEFT JOIN target ON target.ord = input.ord
LEFT JOIN done ON done.id = target.id
ORDER BY input.ord;

-- name: task_fail
-- $1 task id, $2 lease id, $3 error, $4 event ('failed' or 'timed_out'), $5 retryable,
-- $6 backoff base (s), $7 backoff cap (s), $8 the reporting worker's id.
-- Retries while attempts remain: scheduled, for an exponential backoff with jitter (half
-- fixed, half random, so the delay still grows while retries spread out), after which
-- task_promote_due puts it back in the queue (migration 0015).
WITH done AS (
    UPDATE conveyor_tasks AS t
    SET state = CASE WHEN $5 AND t.attempt < t.max_retries + 1
                     THEN 'scheduled' ELSE 'failed' END::conveyor_task_state,
        available_at = CASE WHEN $5 AND t.attempt < t.max_retries + 1
            THEN now() + make_interval(
                secs => least($7::float8, $6::float8 * power(2, t.attempt - 1))
                        * (0.5 + random() * 0.5))
            ELSE t.available_at END,
        finished_at = CASE WHEN $5 AND t.attempt < t.max_retries + 1 THEN NULL ELSE now() END,
        last_error = $3,
        lease_expires_at = NULL, deadline_at = NULL
    -- The lease and its expiry: the task is running (see task_succeed).
    WHERE t.id = $1 AND t.lease_id = $2 AND t.lease_expires_at IS NOT NULL AND t.worker_id = $8
    RETURNING t.id, t.type, t.state, t.attempt, t.worker_id, t.available_at,
              extract(epoch FROM now() - t.started_at)::float8 AS ran_for
), history AS (
    INSERT INTO conveyor_task_events (task_id, event, state, attempt, worker_id, detail)
    SELECT id, $4, state, attempt, worker_id, $3 FROM done
)
-- retry_in: seconds until a retry is due, by the database clock (servers' clocks may skew).
SELECT type, state, available_at, ran_for,
       extract(epoch FROM available_at - now())::float8 AS retry_in
FROM done;

-- name: task_release
-- $1 task id, $2 lease id, $3 reason, $4 the holding worker's id, $5 whether the lease
-- reached its worker, $6 the most releases a series of attempts may have. Hands a lease
-- back without spending the attempt. A delivered lease started the task, which is
-- available again from now. An undelivered one (the server hands it back) started nothing:
-- the task keeps its available_at, so the wait of the start that does come (task_claim's
-- `waited`) runs from when it first became available. Since a release spends nothing,
-- nothing else ends a loop of leases and hand-backs, each writing two history rows: the
-- $6th release since the task's last operator retry fails the task instead, saying why
-- (one probe of the task's history by its primary key, a few rows for any task not near
-- the limit). That release keeps the attempt: the task ends on the attempt it was on, and
-- a failed task with 0 attempts would tell `explain` and GetTask it never ran.
WITH released_before AS (
    SELECT count(*) AS releases
    FROM conveyor_task_events AS e
    WHERE e.task_id = $1 AND e.event = 'released'
      AND e.id > coalesce((SELECT max(r.id) FROM conveyor_task_events AS r
                           WHERE r.task_id = $1 AND r.event = 'retried'), 0)
), done AS (
    UPDATE conveyor_tasks
    SET state = CASE WHEN r.releases + 1 < $6 THEN 'queued' ELSE 'failed'
                END::conveyor_task_state,
        attempt = CASE WHEN r.releases + 1 < $6 THEN attempt - 1 ELSE attempt END,
        available_at = CASE WHEN $5::boolean THEN now() ELSE available_at END,
        finished_at = CASE WHEN r.releases + 1 < $6 THEN NULL ELSE now() END,
        last_error = CASE WHEN r.releases + 1 < $6 THEN last_error
            ELSE format('handed back %s times without finishing (the limit): the worker or '
                        'the server could not run it; the last time: %s', $6::integer, $3::text)
            END,
        lease_expires_at = NULL, deadline_at = NULL
    FROM released_before AS r
    -- The lease and its expiry: the task is running (see task_succeed).
    WHERE id = $1 AND lease_id = $2 AND lease_expires_at IS NOT NULL AND worker_id = $4
    RETURNING id, type, state, attempt, worker_id, last_error
), history AS (
    INSERT INTO conveyor_task_events (task_id, event, state, attempt, worker_id, detail)
    -- The attempt the lease belonged to, as its `started` event says.
    SELECT id, 'released', state, CASE WHEN state = 'failed' THEN attempt ELSE attempt + 1 END,
           worker_id, CASE WHEN state = 'failed' THEN last_error ELSE $3::text END
    FROM done
), wake AS (
    SELECT pg_notify('conveyor_task_ready', '')
    FROM (SELECT 1 FROM done WHERE state = 'queued' LIMIT 1) AS any_done
)
SELECT type, state, (SELECT count(*) FROM wake) AS woken FROM done;

-- name: task_lock_for_cancel
SELECT id, state, attempt, worker_id FROM conveyor_tasks WHERE id = $1 FOR UPDATE;

-- name: task_cancel
-- $1 task id, $2 detail, $3 actor. Only called on a live task locked by task_lock_for_cancel.
-- Stamped with the clock, not now(): now() is when the transaction began, before it waited
-- for the row's lock, and a claim that held the lock meanwhile wrote `started` later than
-- that; the timeline then read `cancelled` before `started` (task_cancel_many likewise).
WITH done AS (
    UPDATE conveyor_tasks
    SET state = 'cancelled', finished_at = clock_timestamp(),
        lease_id = NULL, lease_expires_at = NULL, deadline_at = NULL
    WHERE id = $1 AND state IN ('queued', 'scheduled', 'running')
    RETURNING id, state, attempt, worker_id, finished_at
), history AS (
    INSERT INTO conveyor_task_events
        (task_id, event, state, attempt, worker_id, detail, actor, at)
    SELECT id, 'cancelled', state, attempt, worker_id, $2, $3, finished_at FROM done
)
SELECT state FROM done;

-- name: task_lease_extend
-- $1 task ids, $2 lease ids, $5 progress reports (NULL: none), pairwise; $3 lease ttl (s:
-- the worker's, see worker_lease_ttl), $4 grace after deadline (s), $6 the heartbeating
-- worker's id.
-- Extends the leases that are still current, unexpired and held by that worker; returns every named lease that
-- is not, with the task's state (cancelled, or anything else: the lease was lost), and
-- `busy` true for a lease left alone because another transaction holds its row's lock.
-- SKIP LOCKED: waiting for that lock held up the whole beat, so a row locked by another
-- session (an operator's psql, a long transaction) cost every other lease of the worker
-- its renewal; they expired and ran again. A busy lease is neither extended nor lost: the
-- row as this statement's snapshot saw it still holds the lease, and the next beat tries
-- again (or finds it lost, if the locker cancelled the task or the lease changed under the
-- lock meanwhile).
WITH named AS (
    -- Arrays through scalar subqueries, as in task_succeed_many and for the same reason: a
    -- heartbeat of a few leases was planned anew at every execution.
    SELECT *
    FROM unnest((SELECT $1::uuid[]), (SELECT $2::uuid[]), (SELECT $5::text[]))
        AS n (task_id, lease_id, progress)
), current AS (
    -- One primary-key probe per named lease, locked in task id order, as task_succeed_many
    -- does and for the same reason: as a join, the planner scanned every running task.
    SELECT t.id, named.lease_id, named.progress
    FROM (SELECT * FROM named ORDER BY task_id) AS named
    CROSS JOIN LATERAL (
        SELECT t.id FROM conveyor_tasks AS t
        WHERE t.id = named.task_id AND t.lease_id = named.lease_id
          AND t.lease_expires_at > now()  -- with the lease, 'running' (task_succeed)
          AND t.worker_id = $6
        FOR UPDATE SKIP LOCKED
    ) AS t
), extended AS (
    UPDATE conveyor_tasks AS t
    SET lease_expires_at = least(
            now() + make_interval(secs => $3), t.deadline_at + make_interval(secs => $4)
        ),
        progress = coalesce(current.progress, t.progress),
        progress_at = CASE WHEN current.progress IS NULL THEN t.progress_at ELSE now() END
    FROM current
    WHERE t.id = current.id AND t.lease_id = current.lease_id  -- locked and checked above
    RETURNING t.id, t.lease_id
)
-- By lease, not by task: a heartbeat may name a task's old lease beside its new one (the
-- task was reaped while the old attempt ran on, then leased to the same worker again), and
-- the old one must be told to stop although the task's current lease was extended. (The
-- worker of this repository stops the old attempt itself when the task comes back to it.)
SELECT named.task_id, named.lease_id, t.state,
       coalesce(t.lease_id = named.lease_id AND t.worker_id = $6
                AND t.lease_expires_at > now(), false) AS busy
FROM named LEFT JOIN conveyor_tasks AS t ON t.id = named.task_id
WHERE (named.task_id, named.lease_id) NOT IN (SELECT id, lease_id FROM extended);

-- name: task_reap_expired
-- $1 batch size, $2 backoff base (s), $3 backoff cap (s), $4 leader id, $5 leader term.
-- Leader only: writes nothing unless ($4, $5) still holds the maintenance role.
-- Running tasks whose lease ran out are scheduled for a retry after backoff, as a failed
-- attempt is (or fail, out of attempts). The history says whether the attempt outlived
-- its timeout or its worker went silent.
WITH leader AS (
    SELECT 1 FROM conveyor_leader
    WHERE name = 'maintenance' AND holder = $4 AND term = $5 AND expires_at > now()
    FOR SHARE
), expired AS (
    -- `timed_out` only if the worker was heard from (a heartbeat, or its goodbye) at or
    -- after the deadline: it was alive while the attempt ran past its timeout. Finding
    -- the lease expired after the deadline is no evidence of that: a lease runs to
    -- deadline + grace, and the sweeper waits worker_lost_after (15 s) before ending a
    -- silent worker's leases, so a worker that died up to 15 s before its deadline (any
    -- death, for timeouts under 15 s) is found after it. No row for the worker (it never
    -- registered, so its heartbeats were never recorded) is no evidence either. The state
    -- plays no part: a draining worker heartbeats, a stopped one said goodbye at
    -- last_heartbeat_at, a lost one went silent then. A primary-key probe per reaped task.
    SELECT t.id,
           coalesce((SELECT w.last_heartbeat_at >= t.deadline_at
                     FROM conveyor_workers AS w WHERE w.id = t.worker_id), false) AS timed_out
    FROM conveyor_tasks AS t
    WHERE t.state = 'running' AND t.lease_expires_at < now() AND EXISTS (SELECT 1 FROM leader)
    ORDER BY t.lease_expires_at
    LIMIT $1
    FOR UPDATE OF t SKIP LOCKED
), done AS (
    UPDATE conveyor_tasks AS t
    SET state = CASE WHEN t.attempt < t.max_retries + 1
                     THEN 'scheduled' ELSE 'failed' END::conveyor_task_state,
        available_at = CASE WHEN t.attempt < t.max_retries + 1
            THEN now() + make_interval(
                secs => least($3::float8, $2::float8 * power(2, t.attempt - 1))
                        * (0.5 + random() * 0.5))
            ELSE t.available_at END,
        finished_at = CASE WHEN t.attempt < t.max_retries + 1 THEN NULL ELSE now() END,
        last_error = CASE WHEN expired.timed_out
            THEN 'TimeoutError: attempt exceeded its timeout of ' || t.timeout::text
                 || ' and its worker did not report it'
            ELSE 'LeaseExpired: worker ' || coalesce(t.worker_id, '?')
                 || ' stopped renewing its lease' END,
        lease_id = NULL, lease_expires_at = NULL, deadline_at = NULL
    FROM expired
    WHERE t.id = expired.id
    RETURNING t.id, t.type, t.state, t.attempt, t.worker_id, t.last_error, expired.timed_out,
              t.available_at
), history AS (
    INSERT INTO conveyor_task_events (task_id, event, state, attempt, worker_id, detail)
    SELECT id, CASE WHEN timed_out THEN 'timed_out' ELSE 'lease_expired' END,
           state, attempt, worker_id, last_error
    FROM done
)
SELECT id, type, state, timed_out, attempt, worker_id,
       extract(epoch FROM available_at - now())::float8 AS retry_in
FROM done;

-- name: task_promote_due
-- $1 batch size. Scheduled tasks whose backoff has ended join their type's queue, in their
-- place (their seq): the server that scheduled a retry runs this when its timer fires, and
-- the leader at each reaper round for timers lost with their server. Any server may run it
-- at any time: SKIP LOCKED, and the state is checked. No history row: the task's public
-- state (QUEUED) does not change. Reads conveyor_tasks_scheduled_idx, whose predicate
-- (`state > 'cancelled'`, see migration 0015) the second condition repeats.
WITH due AS (
    SELECT id FROM conveyor_tasks
    WHERE state = 'scheduled' AND state > 'cancelled' AND available_at <= now()
    ORDER BY available_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), done AS (
    UPDATE conveyor_tasks AS t SET state = 'queued'
    FROM due
    WHERE t.id = due.id
    RETURNING t.id
), wake AS (
    -- In the same transaction as the promotion, as every writer that makes tasks available.
    SELECT pg_notify('conveyor_task_ready', '') FROM (SELECT 1 FROM done LIMIT 1) AS any_done
)
SELECT count(*) AS promoted, (SELECT count(*) FROM wake) AS woken FROM done;

-- name: task_get
SELECT id, type, state, attempt, max_retries, timeout, created_at, available_at, started_at,
       finished_at, last_error, worker_id, result, progress, progress_at
FROM conveyor_tasks
WHERE id = $1;

-- name: task_event_list
-- $1 task id, $2 most events, $3 most bytes of their text, $4 only events before this id
-- (NULL: up to the latest). A task's history, oldest first, bounded however long it grew
-- (a task handed back over and over): its first event, always, and the latest events
-- before $4, as many as fit both bounds (the latest one always). `total` counts the task's
-- events before $4 (every one without $4) and `id` orders them, for the reader to say how
-- many it left out and to ask for the ones before. The history view: the `enqueued` event comes from the task row
-- (migration 0009). Each half reads the (task_id, id) primary key from one end.
WITH latest AS (
    SELECT id, at, event, state, attempt, worker_id, detail, actor,
           sum(octet_length(coalesce(detail, '')) + octet_length(coalesce(worker_id, ''))
               + octet_length(coalesce(actor, '')) + 64) OVER (ORDER BY id DESC) AS bytes
    FROM (
        SELECT * FROM conveyor_task_history
        WHERE task_id = $1 AND ($4::bigint IS NULL OR id < $4::bigint)
        ORDER BY id DESC
        LIMIT $2
    ) AS page
), first AS (
    SELECT id, at, event, state, attempt, worker_id, detail, actor
    FROM conveyor_task_history
    WHERE task_id = $1
    ORDER BY id
    LIMIT 1
)
SELECT shown.*,
       (SELECT count(*) FROM conveyor_task_history
        WHERE task_id = $1 AND ($4::bigint IS NULL OR id < $4::bigint)) AS total
FROM (
    SELECT * FROM first
    UNION
    SELECT id, at, event, state, attempt, worker_id, detail, actor
    FROM latest
    WHERE bytes <= $3 OR bytes = (SELECT min(bytes) FROM latest)
) AS shown
ORDER BY id;

-- name: task_live_stats
-- $1 how many types to name by need, $2 types to name anyway. Per type: queued (available
-- now, or scheduled: waiting for a backoff), running, and how long the oldest available
-- queued task has waited. Each part reads only live rows (the queued and scheduled ranges
-- of (state, seq), the partial index of running tasks), however many finished tasks the
-- table holds. Named are the $1
-- types an operator most needs to see, by oldest queued age, then queued, then running
-- (then name, so the choice is stable), every paused type and the types of $2; all other
-- types come summed in one row whose type is NULL, `types` saying how many. So the totals
-- stay exact and the answer bounded, however many types producers invent (a top-N sort
-- keeps only $1 rows in memory).
WITH live AS MATERIALIZED (
    SELECT type,
           sum(queued)::bigint AS queued,
           sum(running)::bigint AS running,
           max(oldest)::float8 AS oldest
    FROM (
        SELECT type, count(*) AS queued, 0 AS running,
               coalesce(extract(epoch FROM now() - min(available_at)
                        FILTER (WHERE available_at <= now())), 0) AS oldest
        FROM conveyor_tasks
        WHERE state = 'queued'
        GROUP BY type
        UNION ALL
        SELECT type, count(*), 0, 0
        FROM conveyor_tasks
        WHERE state = 'scheduled'
        GROUP BY type
        UNION ALL
        SELECT type, 0, count(*), 0
        FROM conveyor_tasks
        WHERE state = 'running'
        GROUP BY type
    ) AS parts
    GROUP BY type
), named AS (
    (SELECT type FROM live ORDER BY oldest DESC, queued DESC, running DESC, type LIMIT $1)
    UNION
    SELECT type FROM conveyor_paused_types
    UNION
    SELECT unnest($2::text[])
)
SELECT named.type,
       sum(live.queued)::bigint AS queued,
       sum(live.running)::bigint AS running,
       max(live.oldest)::float8 AS oldest_queued_seconds,
       count(*)::bigint AS types
FROM live LEFT JOIN named ON named.type = live.type
GROUP BY named.type;

-- name: statement_timeout_set_local
-- $1 milliseconds. The statement timeout of the rest of this transaction only (a leader-only
-- statement's budget: queries.LeaderProof), never longer than the session's own (0: none);
-- and as long for the transaction to sit idle. A leader frozen (SIGSTOP, a VM paused)
-- between its statement and its COMMIT kept the leader row locked, and every election
-- waited behind it, until the session's own idle timeout ended it (30 s): its successor
-- took over that late instead of within the leader's TTL.
SELECT set_config('statement_timeout',
                  (CASE WHEN s.ms = 0 THEN $1::integer ELSE least($1::integer, s.ms) END)::text,
                  true),
       set_config('idle_in_transaction_session_timeout', $1::integer::text, true)
FROM (SELECT setting::integer AS ms FROM pg_settings WHERE name = 'statement_timeout') AS s;

-- name: task_prune_finished
-- $1 retention (s), $2 batch size, $3 leader id, $4 leader term, $5 how far (s) before the
-- cutoff the newest mark may be for the walk to stop there, $6 per final state (succeeded,
-- failed, cancelled) the seq its walk goes on after (0 at a round's start), $7 how many of
-- each state's tasks past there the batch may read (at least $2). Leader only, fenced.
-- Deletes up to $2 tasks that finished more than $1 seconds ago, oldest first through the
-- (state, seq) index, with their history (by its primary key, in the same statement).
-- The walk stops at a mark's seq (seq_mark_record; migration 0013), so that a batch reads
-- the tasks it deletes, not every finished task. A task that finished before the cutoff
-- drew its seq before it, so:
-- - the newest mark at or before the cutoff covers the tasks that finished before that
--   mark: when it is recent (within $5 of the cutoff, as every round marks), the others
--   wait at most that long, and the walk reads hardly a task it does not delete;
-- - after a gap in the marks (retention off for a while, a leader that did not mark), that
--   mark is old, and stopping there would leave the gap's tasks for a whole retention:
--   the walk goes to the oldest mark after the cutoff instead, or the sequence's last value
--   if there is none, and reads the young tasks up to there until the marks catch up.
-- Below the bound, the walk still reads the tasks with an old seq that finished late (a
-- backlog drained, or a type paused, for longer than the retention: millions, after an
-- outage), and skips them as young. Each batch starts where the previous one reached ($6),
-- so they are read once, not once per batch; and a batch reads at most $7 of them per
-- state: the walk also stops at the seq of the $7th task past its start (found in the
-- index alone, `capped`), so that a batch stays a short statement under the leader row's
-- lock however many there are (all of them, in one batch, passed the leader's statement
-- budget at about 8 million). The caller passes a few batches' worth (ten,
-- queries.PRUNE_READ_BATCHES): a window of mostly old tasks still yields a full batch, and
-- reading it (index entries, then at most $7 rows) costs a batch a few milliseconds.
-- Returns one row per final state: how many of its tasks were deleted, the seq its walk
-- reached (the next batch's $6): the last one deleted, or where it stopped when it read all
-- there was up to there; and whether that was the read limit ($7) with more tasks after it
-- (`more`): the batch then has more to do, as after a full one, even if it deleted none.
WITH leader AS (
    SELECT 1 FROM conveyor_leader
    WHERE name = 'maintenance' AND holder = $3 AND term = $4 AND expires_at > now()
    FOR SHARE
), before_cutoff AS (
    SELECT m.marked_at, m.seq FROM conveyor_seq_marks AS m
    WHERE m.marked_at <= now() - make_interval(secs => $1)
    ORDER BY m.marked_at DESC
    LIMIT 1
), bound AS (
    SELECT CASE
        WHEN b.marked_at >= now() - make_interval(secs => $1 + $5) THEN b.seq
        ELSE coalesce(
            (SELECT m.seq FROM conveyor_seq_marks AS m
             WHERE m.marked_at > now() - make_interval(secs => $1)
             ORDER BY m.marked_at
             LIMIT 1),
            pg_sequence_last_value(pg_get_serial_sequence('conveyor_tasks', 'seq')::regclass)
        )
    END AS seq
    FROM (SELECT) AS one LEFT JOIN before_cutoff AS b ON true
), final AS (
    SELECT f.state, f.i, ($6::bigint[])[f.i] AS after
    FROM unnest('{succeeded,failed,cancelled}'::conveyor_task_state[]) WITH ORDINALITY
         AS f (state, i)
), capped AS (
    -- Per state, the seq of the $7th task past where the walk goes on (NULL: fewer).
    SELECT final.i,
           (SELECT t.seq FROM conveyor_tasks AS t
            WHERE t.state = final.state
              AND t.seq > final.after
              AND t.seq <= (SELECT seq FROM bound)
              AND EXISTS (SELECT 1 FROM leader)
            ORDER BY t.seq
            OFFSET $7 - 1
            LIMIT 1) AS seq
    FROM final
), walked AS (
    SELECT final.i, old.id, old.seq
    FROM final
    JOIN capped ON capped.i = final.i
    CROSS JOIN LATERAL (
        SELECT t.id, t.seq FROM conveyor_tasks AS t
        WHERE t.state = final.state
          AND t.seq > final.after
          AND t.seq <= coalesce(capped.seq, (SELECT seq FROM bound))
          AND t.finished_at < now() - make_interval(secs => $1)
          AND EXISTS (SELECT 1 FROM leader)
        ORDER BY t.seq
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ) AS old
), doomed AS (
    SELECT i, id, seq FROM walked
    ORDER BY seq
    LIMIT $2
), doomed_ids AS (
    SELECT ARRAY(SELECT id FROM doomed) AS ids
), history AS (
    DELETE FROM conveyor_task_events
    WHERE task_id = ANY ((SELECT ids FROM doomed_ids)::uuid[])
), deleted AS (
    DELETE FROM conveyor_tasks
    -- An array, not IN (subquery): the deletes are then primary-key probes, never a hash
    -- join over a scan of the whole table.
    WHERE id = ANY ((SELECT ids FROM doomed_ids)::uuid[])
    RETURNING state
), walks AS (
    SELECT final.state, final.i, final.after, capped.seq AS capped,
           -- Fewer than a batch found, and all of them deleted: nothing is left to read up
           -- to where the walk stopped (what lies below is young, or was locked by another
           -- statement: the next walk from the start reads it again).
           (SELECT count(*) FROM walked AS w WHERE w.i = final.i) < $2
           AND (SELECT count(*) FROM walked AS w WHERE w.i = final.i)
               = (SELECT count(*) FROM doomed AS d WHERE d.i = final.i) AS read_all
    FROM final JOIN capped ON capped.i = final.i
)
SELECT walks.state::text AS state,
       (SELECT count(*) FROM deleted AS d WHERE d.state = walks.state) AS deleted,
       CASE
           WHEN NOT EXISTS (SELECT 1 FROM leader) THEN walks.after
           WHEN walks.read_all
               THEN greatest(walks.after,
                             coalesce(walks.capped, (SELECT seq FROM bound), walks.after))
           ELSE coalesce((SELECT max(d.seq) FROM doomed AS d WHERE d.i = walks.i), walks.after)
       END AS reached,
       (EXISTS (SELECT 1 FROM leader) AND walks.read_all AND walks.capped IS NOT NULL
        AND walks.capped < (SELECT seq FROM bound)) AS more
FROM walks
ORDER BY walks.i;

-- name: seq_mark_record
-- $1 retention (s), $2 leader id, $3 leader term, $4 spacing (s). Leader only, fenced.
-- Marks where the queue order stands now (the seq sequence's last value: every seq drawn
-- before this statement is at most that), for task_prune_finished's bound, unless the
-- newest mark is younger than $4 (the retention interval): rounds catching up on a backlog
-- run a second or so apart, and a mark each, kept for the whole retention, piled up
-- hundreds of thousands over a backlog of days. Also drops the marks older than the one a
-- prune uses now: a prune's cutoff only moves forward (a longer retention later finds
-- nothing older than the shorter one left).
WITH leader AS (
    SELECT 1 FROM conveyor_leader
    WHERE name = 'maintenance' AND holder = $2 AND term = $3 AND expires_at > now()
    FOR SHARE
), in_use AS (
    SELECT max(marked_at) AS marked_at FROM conveyor_seq_marks
    WHERE marked_at <= now() - make_interval(secs => $1)
), trimmed AS (
    DELETE FROM conveyor_seq_marks
    WHERE marked_at < (SELECT marked_at FROM in_use) AND EXISTS (SELECT 1 FROM leader)
)
INSERT INTO conveyor_seq_marks (marked_at, seq)
SELECT now(),
       coalesce(pg_sequence_last_value(pg_get_serial_sequence('conveyor_tasks', 'seq')::regclass), 0)
WHERE EXISTS (SELECT 1 FROM leader)
  AND NOT EXISTS (
      SELECT 1 FROM conveyor_seq_marks WHERE marked_at > now() - make_interval(secs => $4)
  )
ON CONFLICT (marked_at) DO NOTHING;

-- name: worker_register
-- $1 id, $2 host, $3 pid, $4 task types, $5 concurrency, $6 version, $7 principal (NULL when
-- authentication is off), $8 silence (s) after which a worker counts as gone. A worker id
-- stays with the principal that registered it: registering it again under another
-- principal changes nothing and returns no row. An id registered while authentication was
-- off belongs to nobody and may be taken, once its worker is gone (stopped, lost, or silent
-- that long): a live one is not handed to whoever asks first. With authentication off, ids
-- are not bound at all. $9 the lease length this server tells the worker: with $8, the
-- worker's own pace, by which every server leases to it and the leader sweeps it.
INSERT INTO conveyor_workers (id, host, pid, task_types, concurrency, version, principal,
                              lease_ttl, lost_after)
VALUES ($1, $2, $3, $4, $5, $6, $7, make_interval(secs => $9), make_interval(secs => $8))
ON CONFLICT (id) DO UPDATE
SET host = excluded.host, pid = excluded.pid, task_types = excluded.task_types,
    concurrency = excluded.concurrency, version = excluded.version,
    state = 'active', last_heartbeat_at = now(), principal = excluded.principal,
    lease_ttl = excluded.lease_ttl, lost_after = excluded.lost_after
WHERE excluded.principal IS NULL
   OR conveyor_workers.principal = excluded.principal
   OR (conveyor_workers.principal IS NULL
       AND (conveyor_workers.state IN ('stopped', 'lost')
            OR conveyor_workers.last_heartbeat_at < now() - make_interval(secs => $8)))
RETURNING id;

-- name: worker_principal
-- $1 id. Whose the worker id is (no row: never registered).
SELECT principal FROM conveyor_workers WHERE id = $1;

-- name: worker_touch
-- $1 id, $2 draining, $3 in flight, $4 loop lag (ms).
-- A heartbeat from a worker that was swept as lost revives it: it is demonstrably alive
-- (its old leases stay lost; fencing refuses them). A stopped worker stays stopped, even
-- for a draining heartbeat that commits after its goodbye (in flight on another server):
-- revived as draining, the sweeper would have marked it lost 15 s later.
UPDATE conveyor_workers
SET last_heartbeat_at = now(),
    state = CASE WHEN state = 'stopped' THEN state WHEN $2 THEN 'draining' ELSE 'active' END,
    in_flight = $3,
    loop_lag_ms = $4
WHERE id = $1
-- No row: the worker is unknown (deleted after a long silence), and must register again.
-- lease_ttl: the lease it registered with (worker_lease_ttl).
RETURNING true AS known, lease_ttl;

-- name: worker_lease_ttl
-- $1 id. The lease length the worker registered with (NULL: registered by a server of an
-- earlier release, or unknown). A server leases to the worker, and renews its leases, for
-- the longer of that and its own --lease-ttl: servers may differ during a rolling change of
-- settings, and the worker paces its heartbeats for the lease it was told (migration 0016).
-- Read on a claim of a worker the server has not heard of for a minute; a heartbeat
-- brings it along (worker_touch), so that no statement per task joins this table.
SELECT lease_ttl FROM conveyor_workers WHERE id = $1;

-- name: worker_set_state
UPDATE conveyor_workers SET state = $2, last_heartbeat_at = now() WHERE id = $1;

-- name: worker_sweep_lost
-- $1 silence (s) after which an active or draining worker is presumed lost, $2 leader id,
-- $3 leader term, $4 how long (s) the leader has reached the database without a failure.
-- Leader only. Marks silent workers lost and ends their leases now, so the reaper's next
-- round requeues their tasks instead of waiting out the lease. Fencing keeps this safe if
-- the worker was only slow: its next report or heartbeat is refused. Silence counts only
-- while the database could be reached ($4): no heartbeat lands while it is down, and after
-- an outage longer than the silence every worker alive would have been marked lost, its
-- finished work refused and run again.
WITH leader AS (
    SELECT 1 FROM conveyor_leader
    WHERE name = 'maintenance' AND holder = $2 AND term = $3 AND expires_at > now()
    FOR SHARE
), lost AS (
    UPDATE conveyor_workers
    SET state = 'lost'
    WHERE state IN ('active', 'draining')
      AND last_heartbeat_at < now() - make_interval(secs => $1)
      -- Nor before the silence its own server allows (a longer heartbeat interval).
      AND (lost_after IS NULL OR last_heartbeat_at < now() - lost_after)
      -- Nor before the database has been reachable for that long.
      AND make_interval(secs => $4) > greatest(make_interval(secs => $1), lost_after)
      AND EXISTS (SELECT 1 FROM leader)
    -- How long it was silent, for the log (the threshold understated it by up to a round,
    -- or more for a worker with a longer allowance of its own).
    RETURNING id, extract(epoch FROM now() - last_heartbeat_at)::float8 AS silent_for
), releasable AS (
    -- Skips a row another statement holds (a late report or heartbeat of the worker, an
    -- operator's cancel): never waits, so it cannot deadlock with them, and the reaper ends
    -- a skipped lease when it expires.
    SELECT t.id
    FROM conveyor_tasks AS t
    WHERE t.state = 'running' AND t.worker_id IN (SELECT id FROM lost)
      AND t.lease_expires_at > now()
    FOR UPDATE SKIP LOCKED
), released AS (
    UPDATE conveyor_tasks AS t
    SET lease_expires_at = now()
    FROM releasable
    WHERE t.id = releasable.id
    RETURNING t.worker_id
)
SELECT lost.id, lost.silent_for,
       (SELECT count(*) FROM released WHERE released.worker_id = lost.id) AS leases
FROM lost;

-- name: worker_prune_gone
-- $1 retention (s), $2 batch size, $3 leader id, $4 leader term. Leader only, fenced.
-- Deletes up to $2 workers that stopped or were lost and were last heard from more than
-- $1 seconds ago, longest silent first. Returns the deleted workers' states.
-- Nothing refers to a worker's row: tasks and their history keep its id as text, and the
-- reaper and task_explain read a missing row as an unknown worker (the reaper's rows are
-- long gone by then: a worker's leases end within a lease of its last heartbeat). A
-- sequential scan, on purpose: the table holds the live workers and those gone within
-- $1, and an index on last_heartbeat_at would make every heartbeat (worker_touch) update
-- an index entry instead of a heap-only tuple. The sweeper scans it every second anyway.
WITH leader AS (
    SELECT 1 FROM conveyor_leader
    WHERE name = 'maintenance' AND holder = $3 AND term = $4 AND expires_at > now()
    FOR SHARE
), doomed AS (
    -- Skips a row a registration or a heartbeat holds: it is coming back to life.
    SELECT id
    FROM conveyor_workers
    WHERE state IN ('stopped', 'lost')
      AND last_heartbeat_at < now() - make_interval(secs => $1)
      AND EXISTS (SELECT 1 FROM leader)
    ORDER BY last_heartbeat_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM conveyor_workers
-- An array, not a join: primary-key probes, never a second scan of the table.
WHERE id = ANY (ARRAY(SELECT id FROM doomed))
RETURNING state;

-- name: worker_list
-- $1 include stopped workers, $2 at most this many, $3 the loop lag (ms) that counts as a
-- blocked event loop, $4 $5 $6 the (troubled, started_at, id) of the previous page's last
-- worker, all NULL for the first page.
-- Workers in trouble (lost, or a live one with a blocked event loop) first, then newest
-- first: they are what an operator looks for, and a page limit must not hide them. Keyset
-- pages, every key descending: the next page holds the rows whose key is below the last
-- one's. A worker whose trouble starts or ends between two pages may be listed twice or
-- not at all. The table holds a row per worker of the last day (worker retention): sorted
-- whole, as before.
SELECT id, host, pid, task_types, concurrency, version, state, started_at, last_heartbeat_at,
       in_flight, loop_lag_ms, silent_for, troubled
FROM (
    SELECT id, host, pid, task_types, concurrency, version, state, started_at,
           last_heartbeat_at, in_flight, loop_lag_ms, now() - last_heartbeat_at AS silent_for,
           state = 'lost' OR (state IN ('active', 'draining') AND loop_lag_ms >= $3)
               AS troubled
    FROM conveyor_workers
    WHERE $1 OR state IN ('active', 'draining', 'lost')
) AS listed
WHERE $4::boolean IS NULL OR (troubled, started_at, id) < ($4::boolean, $5::timestamptz, $6::text)
ORDER BY troubled DESC, started_at DESC, id DESC
LIMIT $2;

-- name: worker_list_count
-- $1 include stopped workers. How many workers worker_list lists in all its pages.
SELECT count(*) FROM conveyor_workers WHERE $1 OR state IN ('active', 'draining', 'lost');

-- name: leader_attempt_elect
-- $1 role, $2 holder, $3 ttl (s), $4 the term $2 leads in as far as it knows (NULL: none).
-- Takes the role if it is free or expired; renews it only if $2 holds it in term $4, so
-- two processes given the same server id never share a term: the one that did not win it
-- waits for the role to expire, and then leads in a new term that fences the other out.
-- The term grows whenever the role changes hands or the lease had lapsed. Returns the term
-- when $2 leads afterwards, no row otherwise.
WITH attempt AS (
    INSERT INTO conveyor_leader AS l (name, holder, term, elected_at, expires_at)
    VALUES ($1, $2, 1, now(), now() + make_interval(secs => $3))
    ON CONFLICT (name) DO UPDATE
    SET holder = excluded.holder,
        term = CASE WHEN l.holder = excluded.holder AND l.term = $4 AND l.expires_at > now()
                    THEN l.term ELSE l.term + 1 END,
        elected_at = CASE WHEN l.holder = excluded.holder AND l.term = $4
                               AND l.expires_at > now()
                          THEN l.elected_at ELSE now() END,
        expires_at = excluded.expires_at
    WHERE l.expires_at <= now() OR (l.holder = excluded.holder AND l.term = $4)
    RETURNING l.name, l.holder, l.term, l.elected_at, l.expires_at
), new_term AS (
    -- Only a new term is recorded; a duplicate (name, term) would be an error, not hidden.
    INSERT INTO conveyor_leader_terms (name, term, holder, elected_at)
    SELECT name, term, holder, elected_at FROM attempt WHERE elected_at = now()
)
SELECT term, expires_at FROM attempt;

-- name: leader_resign
-- $1 role, $2 holder, $3 term. Ends the lease now and tells the other servers to campaign
-- at once (only the term's own lease: not another process's under the same server id).
WITH resigned AS (
    UPDATE conveyor_leader SET expires_at = now() WHERE name = $1 AND holder = $2 AND term = $3
    RETURNING name
)
SELECT pg_notify('conveyor_leader_resigned', '') FROM resigned;

-- name: leader_get
SELECT holder, term, elected_at, expires_at, expires_at > now() AS active
FROM conveyor_leader
WHERE name = $1;

-- name: worker_count_by_state
SELECT state, count(*) AS workers FROM conveyor_workers GROUP BY state;

-- name: task_ready_notify
-- Wakes every server's long polls (a retry's backoff ended).
SELECT pg_notify('conveyor_task_ready', '');

-- name: database_ping
SELECT 1;

-- name: session_configure
-- The server's session settings, applied once a connection is open (see
-- Database.connect_options for why not as startup parameters), and the session's backend
-- pid: the one a NOTIFY it sends carries, which a pooling proxy's BackendKeyData is not.
SELECT pg_backend_pid(),
       set_config('statement_timeout', $1, false),
       set_config('idle_in_transaction_session_timeout', $2, false),
       set_config('lock_timeout', '0', false);

-- name: session_read_only
-- A standby in recovery, or default_transaction_read_only on: no write would succeed.
SELECT current_setting('transaction_read_only') = 'on';

-- name: session_mark
-- The pooling check's marker: a setting that lives exactly as long as the session.
SELECT set_config('conveyor.session_probe', $1, false);

-- name: session_marked
SELECT current_setting('conveyor.session_probe', true) AS marker, pg_backend_pid() AS pid;

-- name: session_backend_pid
SELECT pg_backend_pid();

-- name: task_explain
-- $1 task id, $2 worker silence (s) after which a worker does not count as live.
-- Everything `conveyor tasks explain` needs, in one round trip. The position counts read
-- the queued range of (type, state, seq).
SELECT t.id, t.type, t.state, t.attempt, t.max_retries, t.worker_id, t.last_error,
       t.progress, t.progress_at, t.created_at, t.started_at, t.finished_at,
       t.available_at > now() AS backing_off,
       extract(epoch FROM t.available_at - now())::float8 AS available_in,
       extract(epoch FROM now() - t.started_at)::float8 AS running_for,
       extract(epoch FROM t.lease_expires_at - now())::float8 AS lease_left,
       (SELECT count(*) FROM conveyor_tasks AS o
        WHERE o.state = 'queued' AND o.type = t.type AND o.seq < t.seq
          AND o.available_at <= now()) AS ahead,
       (SELECT count(*) FROM conveyor_workers AS w
        WHERE w.state = 'active' AND t.type = ANY (w.task_types)
          AND w.last_heartbeat_at > now() - make_interval(secs => $2)) AS live_workers,
       (SELECT coalesce(sum(w.concurrency), 0) FROM conveyor_workers AS w
        WHERE w.state = 'active' AND t.type = ANY (w.task_types)
          AND w.last_heartbeat_at > now() - make_interval(secs => $2)) AS live_slots,
       (SELECT extract(epoch FROM now() - w.last_heartbeat_at)::float8
        FROM conveyor_workers AS w WHERE w.id = t.worker_id) AS worker_silent_for,
       (SELECT w.state FROM conveyor_workers AS w WHERE w.id = t.worker_id) AS worker_state,
       -- No history row yet: the task's only event is its `enqueued` (migration 0009).
       coalesce((SELECT e.event FROM conveyor_task_events AS e
                 WHERE e.task_id = t.id ORDER BY e.id DESC LIMIT 1), 'enqueued') AS last_event,
       (SELECT e.detail FROM conveyor_task_events AS e
        WHERE e.task_id = t.id ORDER BY e.id DESC LIMIT 1) AS last_detail,
       p.paused_at, p.reason AS paused_reason
FROM conveyor_tasks AS t
LEFT JOIN conveyor_paused_types AS p ON p.type = t.type
WHERE t.id = $1;

-- name: task_list_by_state
-- $1 states, $2 keyset: only tasks with seq below it, $3 limit. Newest first.
-- One range scan of (state, seq) per state, merged.
SELECT t.id, t.seq, t.type, t.state, t.attempt, t.max_retries, t.timeout, t.created_at,
       t.available_at, t.started_at, t.finished_at, t.last_error, t.worker_id,
       NULL::bytea AS result, t.progress, t.progress_at
FROM unnest($1::conveyor_task_state[]) AS wanted (state)
CROSS JOIN LATERAL (
    SELECT * FROM conveyor_tasks AS c
    WHERE c.state = wanted.state AND c.seq < $2
    ORDER BY c.seq DESC
    LIMIT $3
) AS t
ORDER BY t.seq DESC
LIMIT $3;

-- name: task_list_by_type_and_state
-- $1 states, $2 keyset: only tasks with seq below it, $3 limit, $4 type. Newest first.
-- One range scan of (type, state, seq) per state, merged.
SELECT t.id, t.seq, t.type, t.state, t.attempt, t.max_retries, t.timeout, t.created_at,
       t.available_at, t.started_at, t.finished_at, t.last_error, t.worker_id,
       NULL::bytea AS result, t.progress, t.progress_at
FROM unnest($1::conveyor_task_state[]) AS wanted (state)
CROSS JOIN LATERAL (
    SELECT * FROM conveyor_tasks AS c
    WHERE c.type = $4 AND c.state = wanted.state AND c.seq < $2
    ORDER BY c.seq DESC
    LIMIT $3
) AS t
ORDER BY t.seq DESC
LIMIT $3;

-- name: task_count_by_state
-- $1 states. For a bulk action's confirmation; an index-only scan of (state, seq).
SELECT count(*) FROM conveyor_tasks WHERE state = ANY ($1::conveyor_task_state[]);

-- name: task_count_by_type_and_state
-- $1 states, $2 type. An index-only scan of (type, state, seq).
SELECT count(*) FROM conveyor_tasks WHERE type = $2 AND state = ANY ($1::conveyor_task_state[]);

-- name: task_states_get
-- $1 task ids. The current state of each that exists.
SELECT id, state FROM conveyor_tasks WHERE id = ANY ($1::uuid[]);

-- name: task_briefs_get
-- $1 task ids. Of each that exists, why reports naming it were not applied: its type, state
-- and attempt; the lease whose report settled its last attempt (`settled_lease_id`: the
-- lease id a report keeps, with no expiry; NULL while it runs, and after a reap, a cancel
-- or an operator's retry), the worker that held it, and the task's latest event. A report
-- of that lease by that worker whose outcome recorded that event is a repeat of the one
-- applied. One primary-key probe per task, and the newest of its events through
-- (task_id, id); only refused reports come here.
SELECT t.id, t.type, t.state, t.attempt, t.worker_id,
       CASE WHEN t.lease_expires_at IS NULL THEN t.lease_id END AS settled_lease_id,
       (SELECT e.event FROM conveyor_task_events AS e
        WHERE e.task_id = t.id ORDER BY e.id DESC LIMIT 1) AS last_event
FROM conveyor_tasks AS t WHERE t.id = ANY ($1::uuid[]);

-- name: task_retry_many
-- $1 task ids, $2 detail, $3 states it applies to (failed and/or cancelled), $4 actor. Those
-- tasks go
-- back to QUEUED as a new series of attempts: the attempt count starts again, and the task
-- joins the back of its queue with a new seq, drawn in the tasks' original order, so a bulk
-- retry of old failures neither jumps ahead of work enqueued meanwhile nor scrambles its
-- own order. Tasks in other states are left alone (the caller reports them). Recorded as
-- `retried` in the history.
WITH target AS (
    -- One primary-key probe per named task, locked in task id order (the lock order of
    -- every multi-row writer), in the named states (PostgreSQL filters under the lock,
    -- and again on the newest version of a row it waited for). Written as `id = ANY`
    -- beside `state = ANY`, a planner whose statistics had seen none of these tasks (an
    -- incident's failures, before the next ANALYZE) read every task in those states
    -- through (state, seq) for each page (docs/performance.md, "The tenth round").
    SELECT t.id, t.seq
    FROM (SELECT DISTINCT n.id FROM unnest($1::uuid[]) AS n (id) ORDER BY n.id) AS named
    CROSS JOIN LATERAL (
        SELECT c.id, c.seq, c.state FROM conveyor_tasks AS c WHERE c.id = named.id FOR UPDATE
    ) AS t
    WHERE t.state = ANY ($3::conveyor_task_state[]) AND t.state IN ('failed', 'cancelled')
), renumbered AS (
    SELECT id, nextval(pg_get_serial_sequence('conveyor_tasks', 'seq')) AS new_seq
    FROM (SELECT id, seq FROM target ORDER BY seq) AS oldest_first
), done AS (
    -- The clock, not now(): after the row locks, so that `retried` follows the cancel
    -- this retry may have waited for (see task_cancel).
    UPDATE conveyor_tasks AS t
    SET state = 'queued', attempt = 0, seq = renumbered.new_seq,
        available_at = clock_timestamp(),
        started_at = NULL, finished_at = NULL, worker_id = NULL, result = NULL,
        progress = NULL, progress_at = NULL, lease_id = NULL
    FROM renumbered
    WHERE t.id = renumbered.id
    RETURNING t.id, t.type, t.available_at
), history AS (
    INSERT INTO conveyor_task_events (task_id, event, state, attempt, detail, actor, at)
    SELECT id, 'retried', 'queued', 0, $2, $4, available_at FROM done
), wake AS (
    SELECT pg_notify('conveyor_task_ready', '') FROM (SELECT 1 FROM done LIMIT 1) AS any_done
)
SELECT id, type, (SELECT count(*) FROM wake) AS woken FROM done;

-- name: task_cancel_many
-- $1 task ids, $2 detail, $3 states it applies to (queued and/or running), $4 actor. Those
-- tasks are
-- CANCELLED; a running attempt's lease is revoked at once (its worker learns it at its next
-- heartbeat). Others are left alone: a cancel of queued tasks never touches one that was
-- claimed since it was listed.
WITH target AS (
    -- Probed by id and locked in id order, in the named states: see
    -- task_retry_many.
    SELECT t.id
    FROM (SELECT DISTINCT n.id FROM unnest($1::uuid[]) AS n (id) ORDER BY n.id) AS named
    CROSS JOIN LATERAL (
        SELECT c.id, c.state FROM conveyor_tasks AS c WHERE c.id = named.id FOR UPDATE
    ) AS t
    WHERE t.state = ANY ($3::conveyor_task_state[])
      AND t.state IN ('queued', 'scheduled', 'running')
), done AS (
    -- The clock, not now(): after the row locks (see task_cancel).
    UPDATE conveyor_tasks AS t
    SET state = 'cancelled', finished_at = clock_timestamp(),
        lease_id = NULL, lease_expires_at = NULL, deadline_at = NULL
    FROM target
    WHERE t.id = target.id
    RETURNING t.id, t.type, t.attempt, t.worker_id, t.finished_at
), history AS (
    INSERT INTO conveyor_task_events
        (task_id, event, state, attempt, worker_id, detail, actor, at)
    SELECT id, 'cancelled', 'cancelled', attempt, worker_id, $2, $4, finished_at FROM done
)
SELECT id, type FROM done;

-- name: task_seq_last
-- The highest queue position handed out so far: a bulk action covers tasks up to it.
SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('conveyor_tasks', 'seq')), 0);

-- name: task_list_oldest_by_state
-- $1 states, $2 only seq above it (the cursor), $3 only seq up to it, $4 limit. Oldest
-- first: a bulk action walks its tasks in queue order. One range scan per state, merged.
SELECT t.id, t.seq
FROM unnest($1::conveyor_task_state[]) AS wanted (state)
CROSS JOIN LATERAL (
    SELECT c.id, c.seq FROM conveyor_tasks AS c
    WHERE c.state = wanted.state AND c.seq > $2 AND c.seq <= $3
    ORDER BY c.seq
    LIMIT $4
) AS t
ORDER BY t.seq
LIMIT $4;

-- name: task_list_oldest_by_type_and_state
-- $1 states, $2 only seq above it, $3 only seq up to it, $4 limit, $5 type. Oldest first.
SELECT t.id, t.seq
FROM unnest($1::conveyor_task_state[]) AS wanted (state)
CROSS JOIN LATERAL (
    SELECT c.id, c.seq FROM conveyor_tasks AS c
    WHERE c.type = $5 AND c.state = wanted.state AND c.seq > $2 AND c.seq <= $3
    ORDER BY c.seq
    LIMIT $4
) AS t
ORDER BY t.seq
LIMIT $4;

-- name: task_payload_get
SELECT payload FROM conveyor_tasks WHERE id = $1;

-- name: task_payload_head
-- $1 task id, $2 bytes. The payload's beginning and its whole size, for a preview: a page
-- showing a task need not carry a payload of a megabyte.
SELECT substring(payload FROM 1 FOR $2) AS head, octet_length(payload) AS size
FROM conveyor_tasks
WHERE id = $1;

-- name: paused_type_set
-- $1 type, $2 reason, $3 actor. Returns whether this call paused it (false: it already was);
-- an effective pause is also written to the audit log.
WITH paused AS (
    INSERT INTO conveyor_paused_types (type, reason, paused_by) VALUES ($1, $2, $3)
    ON CONFLICT (type) DO NOTHING
    RETURNING paused_at
), audit AS (
    INSERT INTO conveyor_audit_log (actor, action, target, detail)
    SELECT $3, 'pause', $1, $2 FROM paused
)
SELECT paused_at FROM paused;

-- name: paused_type_clear
-- $1 type, $2 actor. Wakes every long poll: the type's queued tasks are claimable again. An
-- effective resume is written to the audit log.
WITH resumed AS (
    DELETE FROM conveyor_paused_types WHERE type = $1 RETURNING type
), audit AS (
    INSERT INTO conveyor_audit_log (actor, action, target)
    SELECT $2, 'resume', type FROM resumed
)
SELECT pg_notify('conveyor_task_ready', '') FROM resumed;

-- name: paused_type_list
SELECT type, paused_at, reason, paused_by FROM conveyor_paused_types ORDER BY type;

-- name: audit_log_add
-- $1 actor, $2 action, $3 target, $4 detail.
INSERT INTO conveyor_audit_log (actor, action, target, detail) VALUES ($1, $2, $3, $4);

-- name: audit_log_list
-- $1 limit. The latest operator actions on no single task, newest first.
SELECT at, actor, action, target, detail FROM conveyor_audit_log ORDER BY id DESC LIMIT $1;

-- name: database_now
SELECT now();

-- name: task_event_buckets
-- $1 since, $2 bucket width (s, dividing a minute). Outcome counts of the history since $1
-- per bucket, oldest first (index on `at`); buckets are aligned to whole minutes.
-- `retried`: a failed or timed-out attempt, or an expired lease, that went back to the queue.
SELECT date_bin(make_interval(secs => $2), at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
       count(*) FILTER (WHERE event = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       count(*) FILTER (WHERE state IN ('queued', 'scheduled')
                        AND event IN ('failed', 'timed_out', 'lease_expired'))
           AS retried,
       count(*) FILTER (WHERE event = 'started') AS started
FROM conveyor_task_events
WHERE at >= $1
GROUP BY 1
ORDER BY 1;

-- name: task_table_changes
-- How many rows of conveyor_tasks were inserted, updated or deleted since its statistics
-- were last gathered, and how many rows those statistics counted (0 before the first).
-- Read from PostgreSQL's cumulative statistics: no scan of the table.
SELECT s.n_mod_since_analyze AS changed, greatest(c.reltuples, 0)::bigint AS analyzed_rows
FROM pg_stat_user_tables AS s
JOIN pg_class AS c ON c.oid = s.relid
WHERE s.relid = 'conveyor_tasks'::regclass;

-- name: task_table_analyze
-- Gathers conveyor_tasks' planner statistics now (a sample of 30,000 rows at the default
-- statistics target); skips the table rather than wait while autovacuum works on it. A
-- skip is no error: PostgreSQL only sends a WARNING (SQLSTATE 55P03), which the caller
-- watches for (queries.task_table_analyze).
ANALYZE (SKIP_LOCKED) conveyor_tasks;

