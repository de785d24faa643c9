-- Experiment steps: one row per step of `msm experiment run`, keyed by the hash of its inputs, so a
-- rerun (after a crash, or after an arm is added) reuses every step whose inputs it has seen.
CREATE TABLE experiment_steps (
    key          VARCHAR PRIMARY KEY,           -- sha256 of kind, inputs and the upstream steps' keys
    kind         VARCHAR NOT NULL,              -- corpus, ablation, demos, train or eval
    label        VARCHAR NOT NULL,              -- e.g. "train pro_america seed 0"
    experiment   VARCHAR NOT NULL,              -- the experiment (and profile) that first ran it
    profile      VARCHAR NOT NULL,
    inputs       JSON NOT NULL,
    outputs      JSON,                          -- corpus id, demo set id, run folder, eval run id...
    status       VARCHAR NOT NULL,              -- running, complete or failed
    error        VARCHAR,
    seconds      DOUBLE,
    started_at   TIMESTAMP NOT NULL DEFAULT current_timestamp,
    finished_at  TIMESTAMP
);

-- One row per `msm experiment run`: which steps it needed and how many it reused.
CREATE TABLE experiment_runs (
    id           VARCHAR PRIMARY KEY,
    experiment   VARCHAR NOT NULL,
    profile      VARCHAR NOT NULL,
    source       VARCHAR NOT NULL,
    steps        JSON NOT NULL,                 -- the step keys, in order
    status       VARCHAR NOT NULL,              -- running, complete or failed
    steps_run    INTEGER,
    steps_cached INTEGER,
    seconds      DOUBLE,
    started_at   TIMESTAMP NOT NULL DEFAULT current_timestamp,
    finished_at  TIMESTAMP
);
