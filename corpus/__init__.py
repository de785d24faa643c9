"""The corpus stage: spec parsing (IR), and later planning, prompts and generation."""
