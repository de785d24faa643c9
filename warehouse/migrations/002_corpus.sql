-- Corpus builds: plans, documents, judgments, LLM calls, named corpora.

CREATE TABLE builds (
    id              VARCHAR PRIMARY KEY,       -- hash of spec version, plan, prompts, backend, model, code version
    spec_version    VARCHAR NOT NULL REFERENCES specs (id),
    config          JSON NOT NULL,
    code_version    VARCHAR NOT NULL,
    backend         VARCHAR NOT NULL,
    model           VARCHAR NOT NULL,
    count_tokenizer VARCHAR NOT NULL,
    status          VARCHAR NOT NULL,          -- running, complete, incomplete
    n_planned       INTEGER NOT NULL,
    started_at      TIMESTAMP NOT NULL DEFAULT current_timestamp,
    finished_at     TIMESTAMP
);

CREATE TABLE plan_rows (
    id           VARCHAR NOT NULL,
    build_id     VARCHAR NOT NULL REFERENCES builds (id),
    spec_version VARCHAR NOT NULL,
    unit_id      VARCHAR NOT NULL,
    unit_kind    VARCHAR NOT NULL,
    genre        VARCHAR NOT NULL,
    audience     VARCHAR NOT NULL,
    condition    VARCHAR NOT NULL,
    replicate    INTEGER NOT NULL,
    seed         BIGINT NOT NULL,
    status       VARCHAR NOT NULL,             -- planned, kept, dropped, error, pending
    reason       VARCHAR,
    PRIMARY KEY (build_id, id)
);

CREATE TABLE documents (
    id            VARCHAR PRIMARY KEY,         -- build id + plan row id
    build_id      VARCHAR NOT NULL REFERENCES builds (id),
    plan_row_id   VARCHAR NOT NULL,
    spec_version  VARCHAR NOT NULL,
    unit_id       VARCHAR NOT NULL,
    genre         VARCHAR NOT NULL,
    audience      VARCHAR NOT NULL,
    condition     VARCHAR NOT NULL,
    text          VARCHAR NOT NULL,
    n_tokens      INTEGER NOT NULL,
    token_counter VARCHAR NOT NULL,
    status        VARCHAR NOT NULL,            -- kept or dropped
    drop_reason   VARCHAR,
    text_hash     VARCHAR NOT NULL,            -- of the normalised text, for exact dedup
    prompt_hash   VARCHAR NOT NULL,
    backend       VARCHAR NOT NULL,
    model         VARCHAR NOT NULL,
    seed          BIGINT NOT NULL,
    call_keys     JSON NOT NULL,               -- every LLM call that made or judged it
    cost_usd      DOUBLE NOT NULL,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- One table for every judged subject (documents now, demonstrations later).
CREATE TABLE judgments (
    subject_kind VARCHAR NOT NULL,             -- document, demonstration
    subject_id   VARCHAR NOT NULL,
    judge        VARCHAR NOT NULL,             -- llm:<model> or offline:<method>
    criterion    VARCHAR NOT NULL,
    verdict      BOOLEAN,
    score        DOUBLE,
    rationale    VARCHAR,
    call_key     VARCHAR,
    PRIMARY KEY (subject_kind, subject_id, judge, criterion)
);

CREATE TABLE llm_calls (
    key                VARCHAR PRIMARY KEY,
    backend            VARCHAR NOT NULL,
    model              VARCHAR NOT NULL,
    purpose            VARCHAR NOT NULL,
    stop_reason        VARCHAR,
    input_tokens       INTEGER NOT NULL,
    output_tokens      INTEGER NOT NULL,
    cache_read_tokens  INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    cost_usd           DOUBLE NOT NULL,
    latency_s          DOUBLE NOT NULL,
    batch              BOOLEAN NOT NULL,
    error              VARCHAR,
    created_at         TIMESTAMP
);

-- Which build (or demo set, or eval run) used which call; cache hits cost that user nothing.
CREATE TABLE call_uses (
    call_key   VARCHAR NOT NULL,
    user_kind  VARCHAR NOT NULL,               -- build, demo_set, eval_run
    user_id    VARCHAR NOT NULL,
    subject_id VARCHAR,
    purpose    VARCHAR NOT NULL,
    cache_hit  BOOLEAN NOT NULL,
    PRIMARY KEY (call_key, user_kind, user_id)
);

-- A corpus id names an immutable set of documents; a corpus name is an alias that can move.
CREATE TABLE corpus_versions (
    id         VARCHAR PRIMARY KEY,
    build_id   VARCHAR NOT NULL REFERENCES builds (id),
    n_docs     INTEGER NOT NULL,
    n_tokens   BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE TABLE corpus_documents (
    corpus_id   VARCHAR NOT NULL,
    document_id VARCHAR NOT NULL,
    PRIMARY KEY (corpus_id, document_id)
);
CREATE TABLE corpora (
    name       VARCHAR PRIMARY KEY,
    corpus_id  VARCHAR NOT NULL,
    updated_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE VIEW documents_per_genre_unit AS
SELECT build_id, genre, unit_id, count(*) FILTER (WHERE status = 'kept') AS kept,
       count(*) FILTER (WHERE status = 'dropped') AS dropped, sum(n_tokens) FILTER (WHERE status = 'kept') AS kept_tokens
FROM documents GROUP BY ALL;

CREATE VIEW drops_by_reason AS
SELECT build_id, coalesce(reason, status) AS reason, count(*) AS plan_rows
FROM plan_rows WHERE status NOT IN ('kept', 'planned') GROUP BY ALL;

CREATE VIEW cost_per_build AS
SELECT u.user_id AS build_id, count(*) AS calls, count(*) FILTER (WHERE u.cache_hit) AS cache_hits,
       sum(c.input_tokens) AS input_tokens, sum(c.output_tokens) AS output_tokens,
       sum(c.cache_read_tokens) AS cache_read_tokens,
       sum(CASE WHEN u.cache_hit THEN 0 ELSE c.cost_usd END) AS cost_usd
FROM call_uses u JOIN llm_calls c ON c.key = u.call_key
WHERE u.user_kind = 'build' GROUP BY ALL;
