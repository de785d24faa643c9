-- How generation ended, and the optional revision step.
ALTER TABLE documents ADD COLUMN trimmed BOOLEAN NOT NULL DEFAULT false;  -- cut at max_tokens, kept to its last whole paragraph or sentence
ALTER TABLE documents ADD COLUMN revision VARCHAR;    -- NULL (not asked), 'revised' or 'kept draft: why'
ALTER TABLE documents ADD COLUMN draft_text VARCHAR;  -- the text before the rewrite, when there was one
