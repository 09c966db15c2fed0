-- The claim's plan must not depend on how many task types the statistics have seen.
--
-- task_claim looks each wanted type up as `type = <a value known only at run time>` (one
-- element of the worker's array of types), which the planner estimates to match
-- 1 / (distinct types in the statistics) of the rows. When the table holds a single type,
-- or one type and a rare one that ANALYZE's sample missed, that is "every queued row", and
-- the planner walked (state, seq) with the type as a filter instead of probing
-- (type, state, seq). A worker that also serves a type with no queued task then read the
-- whole backlog of the other type in every claim: 130-170 ms a claim at a million queued,
-- and W4's drain fell from 8,300 to 500 tasks/s (docs/performance.md, the eighth round).
--
-- Pinning the estimate at 100 distinct types makes the probe the plan whatever the table
-- holds (with one type it is the same scan either way). No other statement's plan turns on
-- it: listings and counts by type read (type, state, seq) already. Both statements take
-- only a SHARE UPDATE EXCLUSIVE lock, so enqueues, claims and reports go on meanwhile, and
-- ANALYZE reads a sample of the type column alone, whatever the table's size.
ALTER TABLE conveyor_tasks ALTER COLUMN type SET (n_distinct = 100);
ANALYZE conveyor_tasks (type);
