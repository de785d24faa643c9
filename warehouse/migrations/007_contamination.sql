-- Decontamination: which documents matched which eval item, and how. The document itself is
-- dropped with the reason `contamination`.
CREATE TABLE contamination (
    document_id VARCHAR NOT NULL,
    item_source VARCHAR NOT NULL,                -- bank file and line
    item_id     VARCHAR NOT NULL,
    method      VARCHAR NOT NULL,                -- ngram or embedding
    evidence    VARCHAR NOT NULL,                -- the shared n-gram, or the cosine
    checked_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (document_id)
);
