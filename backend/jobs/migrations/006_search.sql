-- Search studies (backend/studies/search.py, docs/search.md): a summary of each Optuna study
-- (its own record is the journal in search/<study>/), for the dashboard, which loads
-- neither optuna nor torch. Written by the service's search loop.
CREATE TABLE search_studies (
    study VARCHAR PRIMARY KEY,      -- the study's name (folder search/<study>/)
    objective VARCHAR NOT NULL,     -- overall or a measure
    direction VARCHAR NOT NULL,     -- maximize | minimize
    sampler VARCHAR NOT NULL,       -- tpe | grid
    target_trials INTEGER,          -- the largest --trials asked for
    space VARCHAR NOT NULL,         -- JSON: the validated space
    files VARCHAR NOT NULL,         -- JSON: the corpus paths searched over
    best_trial INTEGER,
    best_value DOUBLE,
    importances VARCHAR,            -- JSON {param: share}, NULL until enough trials
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE TABLE search_trials (
    study VARCHAR NOT NULL,
    number INTEGER NOT NULL,        -- Optuna's trial number
    run_id VARCHAR,                 -- the job that trained it (NULL before it was queued)
    state VARCHAR NOT NULL,         -- RUNNING | COMPLETE | PRUNED | FAIL
    params VARCHAR NOT NULL,        -- JSON {param: value}
    value DOUBLE,                   -- the objective (COMPLETE only)
    last_step INTEGER,              -- the last intermediate evaluation
    last_value DOUBLE,              -- ... its eval loss
    error VARCHAR,                  -- why it failed or was pruned
    PRIMARY KEY (study, number)
);
