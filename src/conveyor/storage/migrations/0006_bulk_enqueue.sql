-- The type-name CHECK, same rule, cheaper to evaluate.
--
-- PostgreSQL's regex engine expands the bounded repetition `{1,128}` into 128 copies of
-- the character class, and runs that automaton for every row it checks: about 15 us for a
-- ten-character name, on every INSERT into conveyor_tasks and on every UPDATE of a task
-- (claims, reports, retries: PostgreSQL re-checks a table's CHECK constraints on each
-- update). In a bulk enqueue of 1000 tasks it was the largest single cost of the statement.
-- `+` with a separate length bound accepts exactly the same names (1-128 characters of
-- [A-Za-z0-9_.:-]) for about a tenth of the cost. Every existing row satisfies the old
-- rule, so it satisfies the new one; adding the constraint re-checks them all (a scan of
-- the table under its lock, about a second per million tasks).

ALTER TABLE conveyor_tasks DROP CONSTRAINT conveyor_tasks_type_check;
ALTER TABLE conveyor_tasks ADD CONSTRAINT conveyor_tasks_type_check
    CHECK (type ~ '^[A-Za-z0-9_.:-]+$' AND length(type) <= 128);

ALTER TABLE conveyor_paused_types DROP CONSTRAINT conveyor_paused_types_type_check;
ALTER TABLE conveyor_paused_types ADD CONSTRAINT conveyor_paused_types_type_check
    CHECK (type ~ '^[A-Za-z0-9_.:-]+$' AND length(type) <= 128);
