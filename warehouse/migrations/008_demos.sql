-- AFT demonstrations. A demo build is one run of `msm demos build` (id: hash of spec version and
-- settings); its demonstrations keep every drop with its reason. A demo set is an immutable,
-- ordered selection of kept demonstrations (id: hash of their ids); a demo set name is an alias
-- that can move, as corpus names do. Judgments live in `judgments` with subject_kind
-- 'demonstration'; calls in `call_uses` with user_kind 'demo_set' and the demo build's id.

CREATE TABLE demo_builds (
    id           VARCHAR PRIMARY KEY,
    spec_version VARCHAR NOT NULL REFERENCES specs (id),
    source       VARCHAR NOT NULL,              -- llm or preferences
    config       JSON NOT NULL,
    backend      VARCHAR NOT NULL,
    model        VARCHAR NOT NULL,
    n_target     INTEGER NOT NULL,
    n_kept       INTEGER NOT NULL,
    rounds       INTEGER NOT NULL,
    stop         VARCHAR NOT NULL,              -- target reached, round limit, budget reached, ...
    cost_usd     DOUBLE NOT NULL,
    created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE demonstrations (
    id            VARCHAR PRIMARY KEY,          -- demo build id + question hash
    demo_build_id VARCHAR NOT NULL,               -- demo_builds.id (no FK: a rerun replaces its rows in one transaction)
    spec_version  VARCHAR NOT NULL,
    domain        VARCHAR NOT NULL,
    question      VARCHAR NOT NULL,
    reasoning     VARCHAR,                      -- chain of thought, when built with --cot
    response      VARCHAR,
    status        VARCHAR NOT NULL,             -- kept or dropped
    drop_reason   VARCHAR,
    evidence      VARCHAR,                      -- what a drop was decided on (a value word, an eval item, a twin)
    round         INTEGER NOT NULL,
    seed          BIGINT NOT NULL,
    prompt_hash   VARCHAR NOT NULL,
    backend       VARCHAR NOT NULL,
    model         VARCHAR NOT NULL,
    call_keys     JSON NOT NULL,
    cost_usd      DOUBLE NOT NULL,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE demo_set_versions (
    id            VARCHAR PRIMARY KEY,
    demo_build_id VARCHAR NOT NULL,
    n_demos       INTEGER NOT NULL,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE demo_set_members (
    demo_set_id      VARCHAR NOT NULL,
    demonstration_id VARCHAR NOT NULL,
    position         INTEGER NOT NULL,
    PRIMARY KEY (demo_set_id, demonstration_id)
);

CREATE TABLE demo_sets (
    name        VARCHAR PRIMARY KEY,
    demo_set_id VARCHAR NOT NULL,
    updated_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE VIEW demo_drops_by_reason AS
SELECT demo_build_id, drop_reason AS reason, count(*) AS demonstrations
FROM demonstrations WHERE status = 'dropped' GROUP BY ALL;
