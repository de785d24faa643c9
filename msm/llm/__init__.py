"""One interface to every model msm calls: Anthropic, OpenAI-compatible servers, local transformers."""
