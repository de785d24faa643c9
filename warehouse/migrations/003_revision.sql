-- The optional revision step: what happened to the draft, and the draft itself when it was rewritten.
ALTER TABLE documents ADD COLUMN revision VARCHAR;    -- NULL (not asked), 'revised' or 'kept draft: why'
ALTER TABLE documents ADD COLUMN draft_text VARCHAR;  -- the text before the rewrite, when there was one
