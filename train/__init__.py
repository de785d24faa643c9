"""The train stage: midtraining on a corpus, then AFT on demonstrations (LoRA or full)."""
