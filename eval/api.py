"""The eval stage's public face: what other stages and the experiment runner may call."""

from __future__ import annotations

from eval.bank import ChoiceItem, OpenItem, audit_bank, load_bank, load_banks, value_labels
from eval.run import SUITES, compare_runs, run_eval
from eval.stats import mcnemar, wilson

__all__ = ["SUITES", "ChoiceItem", "OpenItem", "audit_bank", "compare_runs", "load_bank", "load_banks", "mcnemar",
           "run_eval", "value_labels", "wilson"]
