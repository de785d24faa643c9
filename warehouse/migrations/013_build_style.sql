-- The spec style a build was written in (corpus/spec_format.yaml, `styles`): 'values' (documents
-- explain behaviour by the reasons the spec gives) or 'rules' (compliance documents that add no
-- reason the spec does not give). Builds before this column were all written with the values
-- prompts; imported documents had no prompts, so theirs stays NULL.
-- (DuckDB cannot add a NOT NULL column to a table other tables reference; the build code always sets it.)
ALTER TABLE builds ADD COLUMN style VARCHAR;
UPDATE builds SET style = 'values' WHERE backend <> 'import';
