-- Attribution studies (backend/studies/attribution_study.py, docs/attribution.md): which runs
-- serve which subset of a study's files. A run may fill several slots (two files with the
-- same text give the same single-file run), so the key is the slot, not the run.
CREATE TABLE attribution_studies (
    study_id VARCHAR PRIMARY KEY,   -- from the files' contents and the run settings
    files VARCHAR NOT NULL,         -- JSON [{path, name, sha256}], the study's order
    settings VARCHAR NOT NULL,      -- JSON: the runs' settings record (as runs.settings)
    subsets INTEGER NOT NULL,       -- random subsets asked for so far (the largest N)
    seeds VARCHAR NOT NULL,         -- JSON list of the seeds asked for so far
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE TABLE attribution_runs (
    study_id VARCHAR NOT NULL,
    design VARCHAR NOT NULL,        -- 'none' (the baseline) | 'alone' | 'all' | 'random'
    slot INTEGER NOT NULL,          -- the file (alone) or the draw (random); 0 otherwise
    seed INTEGER NOT NULL,
    members VARCHAR NOT NULL,       -- JSON: indices into the study's files
    run_id VARCHAR NOT NULL,
    PRIMARY KEY (study_id, design, slot, seed)
);
