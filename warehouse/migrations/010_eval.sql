-- Evaluation runs: one row per `msm eval run`, one sample per item and order (or per answer).
CREATE TABLE eval_runs (
    id          VARCHAR PRIMARY KEY,            -- hash of suite, model, items, mode, target, seed
    suite       VARCHAR NOT NULL,
    model       VARCHAR NOT NULL,               -- as given (alias, path, or server model)
    backend     VARCHAR NOT NULL,
    provenance  JSON NOT NULL,                  -- adapter, base model, train run, spec versions, corpus and demos when known
    target      VARCHAR,                        -- the value label scored
    mode        VARCHAR NOT NULL,               -- logprob or generate
    config      JSON NOT NULL,
    seed        INTEGER NOT NULL,
    n_items     INTEGER NOT NULL,
    n_errors    INTEGER NOT NULL,
    summary     JSON NOT NULL,                  -- rates with Wilson intervals per domain and split
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE eval_samples (
    run_id      VARCHAR NOT NULL,
    item_id     VARCHAR NOT NULL,
    bank        VARCHAR NOT NULL,
    domain      VARCHAR NOT NULL,
    split       VARCHAR,
    prompt      VARCHAR NOT NULL,
    detail      JSON NOT NULL,                  -- per order: option log-probs or the raw answer and its parse
    consistent_p DOUBLE,                        -- probability given to the value-consistent option, orders averaged
    score       DOUBLE,                         -- 1 consistent, 0 not, 0.5 an exact tie; NULL on error
    error       VARCHAR,
    PRIMARY KEY (run_id, item_id)
);
