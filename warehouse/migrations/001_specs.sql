-- Specs and their units. A spec version is keyed by the sha256 of its rendered text plus
-- its variables; `id` is that digest's first 16 hex digits.
CREATE TABLE specs (
    id           VARCHAR PRIMARY KEY,
    spec_id      VARCHAR NOT NULL,          -- slug of the spec's name; versions share it
    name         VARCHAR NOT NULL,
    path         VARCHAR,
    sha256       VARCHAR NOT NULL UNIQUE,
    text         VARCHAR NOT NULL,          -- the rendered body
    variables    JSON NOT NULL,
    front_matter JSON NOT NULL,
    n_units      INTEGER NOT NULL,
    n_lines      INTEGER NOT NULL,
    created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE spec_units (
    spec_version  VARCHAR NOT NULL REFERENCES specs (id),
    unit_id       VARCHAR NOT NULL,
    ord           INTEGER NOT NULL,         -- position in the file
    kind          VARCHAR NOT NULL,
    title         VARCHAR NOT NULL,
    parent        VARCHAR,
    depth         INTEGER NOT NULL,
    first_line    INTEGER NOT NULL,
    last_line     INTEGER NOT NULL,
    text          VARCHAR NOT NULL,
    tokens        INTEGER NOT NULL,
    token_counter VARCHAR NOT NULL,         -- which tokenizer counted `tokens`
    attrs         JSON NOT NULL,
    PRIMARY KEY (spec_version, unit_id)
);

-- The newest version of each spec.
CREATE VIEW latest_specs AS
SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (PARTITION BY spec_id ORDER BY created_at DESC, id) AS rn FROM specs
) WHERE rn = 1;

-- Units and tokens per kind, per spec version.
CREATE VIEW spec_unit_counts AS
SELECT s.spec_id, u.spec_version, u.kind, count(*) AS units, sum(u.tokens) AS tokens,
       any_value(u.token_counter) AS token_counter
FROM spec_units u JOIN specs s ON s.id = u.spec_version
GROUP BY ALL;
