"""Suites by name. A suite is a module in this package that defines `SUITE`: its items (a bank
or another dataset), a solver that asks the model under test, and a scorer that turns answers
into Samples (Inspect's Task = dataset + solver + scorer). Adding a suite is adding a module
here and its item file; `msm eval suites` lists what is registered.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

from msm.errors import MsmError


@dataclass
class Job:
    """What a solver gets: the items to ask, the model under test, and the run's settings."""

    items: list
    model: object  # eval.model_under_test.ModelUnderTest
    target: str | None
    mode: str
    seed: int
    judge: dict | None  # {backend, model, base_url} of a capable grader, or None (offline)
    options: dict = field(default_factory=dict)  # suite-specific, from `--option key=value`
    log: Callable[[str], None] = print


@dataclass
class Solved:
    samples: list  # eval.sample.Sample, one per item (or per item and sample)
    mode: str  # the mode actually used (a fallback says so in `note`)
    note: str | None = None
    grader: dict | None = None  # how the answers were graded, kept in the run's provenance


@dataclass(frozen=True)
class Suite:
    name: str
    about: str  # one line for `msm eval suites`
    default_banks: tuple[str, ...]
    load_items: Callable[[list[str], dict], list]  # (--items files or none: the defaults, the options)
    solve: Callable[[Job], Solved]
    needs_target: bool = False
    modes: tuple[str, ...] = ("generate",)
    options: dict = field(default_factory=dict)  # option name -> (type, default, what it does)
    summarise: Callable[[list], dict] | None = None  # None: rates per split and domain (eval.run.summarise)
    rate_label: str = "rate"  # what the rate counts, for tables and plots
    chance: float | None = None  # the rate a model without the property scores (drawn as a line)
    paired: bool = True  # two runs answer the same items (McNemar applies); False: independent samples


def registry() -> dict[str, Suite]:
    suites = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        suite = getattr(module, "SUITE", None)
        if isinstance(suite, Suite):
            suites[suite.name] = suite
    return suites


def get_suite(name: str) -> Suite:
    suites = registry()
    if name not in suites:
        raise MsmError(f"unknown suite '{name}'", f"use one of: {', '.join(suites)} (`msm eval suites`)")
    return suites[name]


def load_bank_items(paths: list[str], defaults: tuple[str, ...], kind: str, suite: str) -> list:
    """Items of the given bank files (or the suite's default banks), all of one kind."""
    from pathlib import Path

    from eval.bank import ITEMS_DIR, ChoiceItem, OpenItem, load_bank

    files = [Path(p) for p in paths] or [ITEMS_DIR / f"{b}.jsonl" for b in defaults]
    items = [item for f in files for item in load_bank(f)]
    wanted = ChoiceItem if kind == "choice" else OpenItem
    wrong = next((i for i in items if not isinstance(i, wanted)), None)
    if wrong is not None:
        other = "an open" if kind == "choice" else "a choice"
        raise MsmError(f"item '{wrong.id}' in {wrong.bank} is {other} item, which the {suite} suite does not score",
                       f"pass {kind}-item banks with --items")
    return items
