"""The real-server tier: msm against third-party OpenAI-compatible servers (`make smoke`)."""
