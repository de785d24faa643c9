-- LLM-brainstormed planning: what each unit should teach, and the ideas proposed for its cells.
ALTER TABLE plan_rows ADD COLUMN doc_type VARCHAR;
ALTER TABLE plan_rows ADD COLUMN idea VARCHAR;
ALTER TABLE plan_rows ADD COLUMN assertion VARCHAR;

CREATE TABLE plan_assertions (
    build_id VARCHAR NOT NULL,
    unit_id  VARCHAR NOT NULL,
    ord      INTEGER NOT NULL,
    kind     VARCHAR NOT NULL,                 -- behaviour, value, belief, preference
    text     VARCHAR NOT NULL,
    quote    VARCHAR NOT NULL,                 -- the unit's own words that ground it
    status   VARCHAR NOT NULL,                 -- kept or dropped
    reason   VARCHAR,
    PRIMARY KEY (build_id, unit_id, ord)
);

CREATE TABLE plan_ideas (
    build_id    VARCHAR NOT NULL,
    unit_id     VARCHAR NOT NULL,
    round       INTEGER NOT NULL,              -- 0, then top-up rounds
    plan_row_id VARCHAR,                       -- the cell it was proposed for
    doc_type    VARCHAR,
    idea        VARCHAR,
    status      VARCHAR NOT NULL,              -- used or dropped
    reason      VARCHAR
);
