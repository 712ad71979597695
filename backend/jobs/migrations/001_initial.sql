CREATE TABLE corpora (
    corpus_id VARCHAR PRIMARY KEY,  -- sha256 hex of the file bytes
    path VARCHAR NOT NULL,          -- the latest path this content was added from
    name VARCHAR NOT NULL,
    format VARCHAR,
    encoding VARCHAR,
    bytes BIGINT,
    chars BIGINT,
    words BIGINT,
    pages DOUBLE,
    added_at TIMESTAMP NOT NULL
);
CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY,     -- one row is both the job and its result
    kind VARCHAR NOT NULL,          -- 'adapter' | 'baseline'
    corpus_id VARCHAR,
    corpus_path VARCHAR,
    base VARCHAR NOT NULL,
    settings VARCHAR NOT NULL DEFAULT '{}',
    seed INTEGER NOT NULL DEFAULT 0,
    status VARCHAR NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    error VARCHAR,
    created_at TIMESTAMP NOT NULL,
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    updated_at TIMESTAMP NOT NULL,
    tokens BIGINT,
    steps INTEGER,
    train_seconds DOUBLE,
    eval_seconds DOUBLE,
    final_loss DOUBLE,
    overall DOUBLE,
    run_dir VARCHAR,
    ingested BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE scores (
    run_id VARCHAR NOT NULL,
    measure VARCHAR NOT NULL,
    value DOUBLE,
    n INTEGER,
    PRIMARY KEY (run_id, measure)
);
CREATE TABLE scene_results (
    run_id VARCHAR NOT NULL,
    battery VARCHAR NOT NULL,
    scene_id VARCHAR NOT NULL,
    kind VARCHAR,
    metric VARCHAR,
    score DOUBLE,
    correct BOOLEAN,
    detail VARCHAR,                 -- JSON
    PRIMARY KEY (run_id, battery, scene_id)
);
CREATE TABLE curves (
    run_id VARCHAR NOT NULL,
    step INTEGER NOT NULL,
    loss DOUBLE,
    lr DOUBLE,
    tokens BIGINT,
    tokens_per_s DOUBLE,
    PRIMARY KEY (run_id, step)
);
