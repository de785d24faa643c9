"""The eval stage's public face: what other stages and the experiment runner may call."""

from __future__ import annotations

from eval.bank import ChoiceItem, OpenItem, audit_bank, load_bank, load_banks, value_labels
from eval.report import load_runs
from eval.run import aggregate_runs, compare_runs, run_eval
from eval.stats import mcnemar, wilson
from eval.suites import get_suite, registry

def count_items(suite: str, items: list[str] | None = None, target: str | None = None, limit: int | None = None,
                options: dict | None = None) -> int:
    """How many samples `run_eval` would score with these arguments (no model is loaded)."""
    from eval.run import parse_options

    found = get_suite(suite)
    pool = found.load_items(list(items or []), parse_options(found, options))
    if found.needs_target:
        pool = [i for i in pool if target in i.consistent_with]
    return min(len(pool), limit) if limit else len(pool)


def suite_options(suite: str, options: dict | None = None) -> dict:
    """A suite's options as a run would use them: the given ones over the suite's defaults."""
    from eval.run import parse_options

    return parse_options(get_suite(suite), options)


__all__ = ["ChoiceItem", "OpenItem", "aggregate_runs", "audit_bank", "compare_runs", "count_items", "get_suite",
           "load_bank", "load_banks", "load_runs", "mcnemar", "registry", "run_eval", "suite_options", "value_labels", "wilson"]
