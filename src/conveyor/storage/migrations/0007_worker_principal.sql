-- Security: each worker id belongs to the principal (token name) that registered it.
--
-- With authentication on, the server refuses leases, heartbeats and reports for a worker id
-- from any other principal, and every report is fenced by the holding worker's id as well
-- as the lease id. Together: a lease can be reported only by its own worker, under its own
-- credentials. NULL: registered while authentication was off.
ALTER TABLE conveyor_workers ADD COLUMN principal text;
