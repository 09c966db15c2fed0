-- oldest-compatible-schema: 13
-- The ledger records, for each migration, which older servers may run on the database.
--
-- A server refused any schema newer than its own, so once `conveyor migrate` committed a new
-- release's migrations every server of the previous release answered 503 on /readyz and
-- could not restart, although the rolling upgrade keeps them serving until they are
-- replaced. A server cannot read migration files newer than itself, so the database carries
-- the answer: `migrate` records each migration's `-- oldest-compatible-schema: N` header
-- (servers whose own latest migration is N or newer run correctly once it is applied; a
-- migration without the header only runs with the servers that know it), and a server
-- runs on a newer schema when every migration above its own says so.
--
-- The migrations before this one carry no header; their rows say what is true of them,
-- from their own comments and docs/operations.md's upgrade notes. No server reads these
-- (each server knows the migrations up to its own), but the ledger then says the same of
-- every version. A server of the schema before runs correctly on:
--   0001  nothing older exists.
--   0002  no: schema 1 servers run the reaper and sweeper on every server, unfenced by the
--         leader election this adds.
--   0003  yes (an index).
--   0004  no: schema 3 servers would lease the task types an operator paused.
--   0005  no: schema 4 servers' retention relied on the dropped foreign key's cascade and
--         would leave the deleted tasks' history behind.
--   0006  yes (the same type-name rule, cheaper).
--   0007  no: schema 6 servers register workers with no principal, which any token may
--         then take over on the new servers.
--   0008  no: operator actions through schema 7 servers would be missing from the audit.
--   0009 to 0013: yes, as docs/operations.md describes for a rolling upgrade.
-- This migration only adds a column to the ledger, which servers of schema 13 never read
-- (they compare versions only: so they still refuse this schema, as operations.md says).
ALTER TABLE conveyor_schema_migrations ADD COLUMN oldest_compatible_schema integer;

UPDATE conveyor_schema_migrations
SET oldest_compatible_schema = CASE version
    WHEN 1 THEN 1
    WHEN 2 THEN 2
    WHEN 3 THEN 2
    WHEN 4 THEN 4
    WHEN 5 THEN 5
    WHEN 6 THEN 5
    WHEN 7 THEN 7
    WHEN 8 THEN 8
    WHEN 9 THEN 8
    WHEN 10 THEN 9
    WHEN 11 THEN 10
    WHEN 12 THEN 11
    WHEN 13 THEN 12
END;

-- Every row has one from here on: `migrate` records it with each migration it applies.
ALTER TABLE conveyor_schema_migrations
    ALTER COLUMN oldest_compatible_schema SET NOT NULL,
    ADD CONSTRAINT conveyor_schema_migrations_compatibility_range
        CHECK (oldest_compatible_schema BETWEEN 1 AND version);
