-- Training runs: a row when `msm train run` starts (status running) and again when it ends
-- (complete or failed). The loop itself never opens the warehouse.
CREATE TABLE train_runs (
    id          VARCHAR PRIMARY KEY,             -- hash of the config and the ids of its inputs
    output_dir  VARCHAR NOT NULL,
    base_model  VARCHAR NOT NULL,
    config      JSON NOT NULL,
    inputs      JSON NOT NULL,                   -- per stage: corpus or demo set, its id, spec versions, records
    status      VARCHAR NOT NULL,                -- running, complete, failed
    metrics     JSON,                            -- per stage: steps, tokens, first and final loss, seconds, tokens/s
    world_size  INTEGER NOT NULL,
    started_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
    finished_at TIMESTAMP
);
