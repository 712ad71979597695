-- The worker that holds a run: its pid and its start time (clock ticks since boot, from
-- /proc), so a restarted service re-attaches to it and never mistakes a reused pid.
ALTER TABLE runs ADD COLUMN worker_pid INTEGER;
ALTER TABLE runs ADD COLUMN worker_start BIGINT;
ALTER TABLE runs ADD COLUMN session_path VARCHAR;
