"""One scored item, the shape every suite's scorer returns and `eval_samples` stores."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sample:
    item: object  # a ChoiceItem or an OpenItem
    prompt: str
    detail: list | dict  # what the scorer saw: per-order log-probs, answers and their parse, grader replies
    consistent_p: float | None = None  # preferences: P(consistent option); spec_qa: share of rubric points (offline: cosine)
    score: float | None = None  # 1, 0, or 0.5 for an exact tie; None on error
    error: str | None = None  # set when the item could not be scored: it is counted apart, never as 0
