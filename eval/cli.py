"""`msm eval ...`: item banks now; suites and runs come with the eval-run stage."""

from __future__ import annotations

import sys
from collections import Counter

import click


@click.group("eval")
def eval_group():
    """Evaluate models on the spec's item banks."""


@eval_group.command("items")
@click.argument("paths", nargs=-1)
def items(paths):
    """Validate item banks (default: every bank in eval/items/) and count their items."""
    from pathlib import Path

    from eval.bank import ITEMS_DIR, audit_bank, load_bank, load_banks

    if paths:
        banks = {Path(p).stem: load_bank(p) for p in paths}
    else:
        banks = load_banks(ITEMS_DIR)
    failed = 0
    click.echo(f"{'BANK':<28} {'KIND':<6} {'ITEMS':>5}  DOMAINS")
    for name, bank in banks.items():
        kind = "choice" if hasattr(bank[0], "options") else "open"
        domains = Counter(item.domain for item in bank)
        click.echo(f"{name:<28} {kind:<6} {len(bank):>5}  " + ", ".join(f"{d} {n}" for d, n in sorted(domains.items())))
        for problem in audit_bank(bank):
            click.echo(f"{name}: {problem}")
            failed += 1
    if failed:
        click.echo(f"{failed} problem(s) in the item banks; fix the items named above", err=True)
        sys.exit(1)
