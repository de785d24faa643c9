-- Ablation corpora: a plan row's cell (the same cell is generated under each condition), the
-- ablations built, and which documents each matched corpus took or lost.
ALTER TABLE plan_rows ADD COLUMN cell_id VARCHAR;

CREATE TABLE ablations (
    id           VARCHAR PRIMARY KEY,            -- hash of the builds and the matching settings
    name         VARCHAR NOT NULL,
    spec_version VARCHAR NOT NULL,
    conditions   VARCHAR NOT NULL,               -- JSON list, in the order asked for
    builds       VARCHAR NOT NULL,               -- JSON list of build ids (one per round)
    tolerance    DOUBLE NOT NULL,                -- allowed relative difference in kept tokens
    token_error  DOUBLE,                         -- the relative difference reached
    cells        INTEGER NOT NULL,               -- cells planned
    matched      INTEGER NOT NULL,               -- cells in the matched corpora
    created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE ablation_cells (
    ablation_id VARCHAR NOT NULL,
    cell_id     VARCHAR NOT NULL,
    condition   VARCHAR NOT NULL,
    document_id VARCHAR,                         -- the plan row id; documents use it as their id
    status      VARCHAR NOT NULL,                -- matched, lost_to_matching, unmatched (dropped under some condition)
    n_tokens    INTEGER,
    PRIMARY KEY (ablation_id, cell_id, condition)
);
