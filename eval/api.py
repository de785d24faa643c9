"""The eval stage's public face: what other stages and the experiment runner may call."""

from __future__ import annotations

from eval.bank import ChoiceItem, OpenItem, audit_bank, load_bank, load_banks, value_labels
from eval.run import aggregate_runs, compare_runs, run_eval
from eval.stats import mcnemar, wilson
from eval.suites import get_suite, registry

__all__ = ["ChoiceItem", "OpenItem", "aggregate_runs", "audit_bank", "compare_runs", "get_suite", "load_bank",
           "load_banks", "mcnemar", "registry", "run_eval", "value_labels", "wilson"]
