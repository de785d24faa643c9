"""The eval stage's public face: what other stages and the experiment runner may call."""

from __future__ import annotations

from eval.bank import ChoiceItem, OpenItem, audit_bank, load_bank, load_banks, value_labels

__all__ = ["ChoiceItem", "OpenItem", "audit_bank", "load_bank", "load_banks", "value_labels"]
