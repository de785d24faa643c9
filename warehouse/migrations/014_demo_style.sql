-- AFT demonstrations per spec: the response style a demo build wrote in (the spec's `style:`,
-- rules or values), how many answers were cut off at max_tokens (counted, never kept), and token
-- matching (`msm demos build --match-tokens-of NAME`): the target a build matched and the tokens
-- of every demo set (assistant text: the response, plus the reasoning where the set keeps one).
ALTER TABLE demo_builds ADD COLUMN style VARCHAR NOT NULL DEFAULT 'values';
ALTER TABLE demo_builds ADD COLUMN n_truncated INTEGER NOT NULL DEFAULT 0;
ALTER TABLE demo_builds ADD COLUMN match_tokens_of VARCHAR;   -- the demo set whose tokens it matched
ALTER TABLE demo_builds ADD COLUMN target_tokens BIGINT;      -- that set's tokens (same counter)
ALTER TABLE demo_set_versions ADD COLUMN n_tokens BIGINT;
ALTER TABLE demo_set_versions ADD COLUMN token_counter VARCHAR;
