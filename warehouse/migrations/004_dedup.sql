-- Near-duplicate detection: which document a dropped one duplicates, found how.
CREATE TABLE dedup_clusters (
    build_id     VARCHAR NOT NULL,
    method       VARCHAR NOT NULL,             -- minhash, embedding
    cluster_id   VARCHAR NOT NULL,             -- sha256 of the member plan row ids, short
    document_id  VARCHAR NOT NULL,             -- the dropped member
    kept_id      VARCHAR NOT NULL,             -- the member the cluster keeps
    similarity   DOUBLE,                       -- cosine, for embedding clusters
    PRIMARY KEY (build_id, document_id)
);

-- Vectors are computed once per text and recipe, then reused by every later build and rerun.
CREATE TABLE embeddings (
    text_hash VARCHAR NOT NULL,                -- documents.text_hash
    model     VARCHAR NOT NULL,
    recipe    VARCHAR NOT NULL,                -- what text was embedded, e.g. head128+tail128
    vector    FLOAT[] NOT NULL,
    PRIMARY KEY (text_hash, model, recipe)
);
