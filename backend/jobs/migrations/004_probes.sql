-- What training changed inside the network (backend/compute/probes.py): the headline numbers as
-- columns (the results table shows and sorts them), the per-layer arrays as JSON.
CREATE TABLE probes (
    run_id VARCHAR PRIMARY KEY,
    weight_change DOUBLE,           -- Frobenius norm of the whole update
    weight_rel_change DOUBLE,       -- ... relative to the base weights' norm
    attn_entropy_change DOUBLE,     -- mean over layers and heads, adapter - base, nats
    attn_js DOUBLE,                 -- mean Jensen-Shannon distance of attention rows
    drift_layer INTEGER,            -- residual-stream depth of lowest CKA (0: embeddings)
    min_cka DOUBLE,
    mean_cka DOUBLE,
    lens_layer_base DOUBLE,         -- mean depth where the logit lens settles on the answer
    lens_layer_adapter DOUBLE,
    seconds DOUBLE,
    error VARCHAR,                  -- the probe failed; the run itself stands
    detail VARCHAR                  -- JSON: the whole probe result (docs/probes.md)
);
