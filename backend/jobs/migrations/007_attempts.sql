-- Each attempt of a run is its own: a retry starts attempt n+1, whose worker stamps every
-- event with n+1, so the events of an earlier attempt (its `error`, its phases) can never
-- be read as the new one's. The outcome of every attempt that ended is kept.
ALTER TABLE runs ADD COLUMN attempt INTEGER DEFAULT 0;
UPDATE runs SET attempt = 0;
CREATE TABLE run_attempts (
    run_id VARCHAR NOT NULL,
    attempt INTEGER NOT NULL,       -- 0 for the first, +1 per retry
    status VARCHAR NOT NULL,        -- the terminal state it ended in
    error VARCHAR,
    started_at TIMESTAMP,
    finished_at TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, attempt)
);
