-- Who acted: operator actions record the principal that did them.
--
-- * conveyor_task_events.actor: on the events an operator or a producer caused (cancelled,
--   retried), who: "name (token id)", or "anonymous" when authentication is off. NULL on
--   the events the system itself writes (started, succeeded, a lease that expired).
-- * conveyor_paused_types.paused_by: who paused a type.
-- * conveyor_audit_log: actions on no single task (pausing and resuming a type), oldest
--   first by id. Written only by people's actions, so it stays small; never pruned.
ALTER TABLE conveyor_task_events ADD COLUMN actor text;
ALTER TABLE conveyor_paused_types ADD COLUMN paused_by text;

CREATE TABLE conveyor_audit_log (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL,
    target  text NOT NULL,
    detail  text
);
