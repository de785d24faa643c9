"""Item banks: JSONL files of `choice` and `open` items, read strictly.

A bank is data an experiment stakes its conclusions on, so a malformed line is an error with its
file and line number, never a silently skipped item. eval/items/README.md documents the schemas;
eval/items/schema.yaml holds the closed lists (value labels, splits, held-out forbidden words).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from msm.errors import MsmError

ITEMS_DIR = Path(__file__).with_name("items")
ID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
LETTERS = ("A", "B")


class BankError(MsmError):
    """An item bank cannot be read or breaks its schema."""


@lru_cache(maxsize=1)
def schema() -> dict:
    with open(ITEMS_DIR / "schema.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def value_labels() -> dict[str, str]:
    return dict(schema()["labels"])


@dataclass(frozen=True)
class ChoiceItem:
    """Two options; `consistent_with` says which letter each value label favours."""

    id: str
    domain: str
    prompt: str
    options: dict
    consistent_with: dict
    split: str
    bank: str = ""


@dataclass(frozen=True)
class OpenItem:
    """An open question about a spec, graded against a reference answer and a rubric."""

    id: str
    domain: str
    question: str
    reference: str
    rubric: tuple[str, ...]
    spec: str
    bank: str = ""


Item = ChoiceItem | OpenItem


def load_bank(path: str | Path) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise BankError(f"item bank not found: {path}", "check the path (banks live in eval/items/)")
    items: list[Item] = []
    lines: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                raise BankError(f"{path}:{line_no}: blank line", "remove it; a bank has one JSON object per line")
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BankError(f"{path}:{line_no}: not valid JSON ({exc.msg})", "fix the line") from None
            item = _item(raw, f"{path}:{line_no}", path.stem)
            if item.id in lines:
                raise BankError(f"{path}:{line_no}: item id '{item.id}' is already used on line {lines[item.id]}",
                                "give every item its own id")
            lines[item.id] = line_no
            items.append(item)
    if not items:
        raise BankError(f"{path} has no items", "add one JSON object per line")
    return items


def load_banks(directory: str | Path = ITEMS_DIR) -> dict[str, list[Item]]:
    """Every *.jsonl bank in a directory, by file stem; ids must be unique across them all."""
    directory = Path(directory)
    banks = {p.stem: load_bank(p) for p in sorted(directory.glob("*.jsonl"))}
    if not banks:
        raise BankError(f"no item banks (*.jsonl) in {directory}", "pass a directory that holds banks")
    seen: dict[str, str] = {}
    for name, items in banks.items():
        for item in items:
            if item.id in seen:
                raise BankError(f"duplicate item id '{item.id}' in {seen[item.id]} and {name}", "give every item its own id")
            seen[item.id] = name
    return banks


def _item(raw, where: str, bank: str) -> Item:
    if not isinstance(raw, dict):
        raise BankError(f"{where}: an item must be a JSON object", "write {\"id\": ..., ...}")
    sch = schema()
    kind = "choice" if "options" in raw else "open" if "question" in raw else None
    if kind is None:
        raise BankError(f"{where}: neither a choice item (has 'options') nor an open item (has 'question')",
                        "see eval/items/README.md for the two schemas")
    fields = sch[f"{kind}_fields"]
    missing = [f for f in fields if f not in raw]
    extra = [f for f in raw if f not in fields]
    if missing or extra:
        what = "; ".join(filter(None, [missing and f"missing {missing}", extra and f"unknown {extra}"]))
        raise BankError(f"{where}: {kind} item {what}", f"a {kind} item has exactly {fields}")
    if not isinstance(raw["id"], str) or not ID.match(raw["id"]):
        raise BankError(f"{where}: bad id {raw['id']!r}", "use lowercase letters, digits, '-' and '_'")
    for key in ("domain", "prompt", "question", "reference", "spec"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key].strip()):
            raise BankError(f"{where}: '{key}' must be a non-empty string", "fill it in")
    if kind == "open":
        rubric = raw["rubric"]
        if not isinstance(rubric, list) or not rubric or not all(isinstance(r, str) and r.strip() for r in rubric):
            raise BankError(f"{where}: 'rubric' must be a non-empty list of strings", "list what a good answer states")
        return OpenItem(raw["id"], raw["domain"], raw["question"], raw["reference"], tuple(rubric), raw["spec"], bank)
    options, consistent = raw["options"], raw["consistent_with"]
    if not isinstance(options, dict) or sorted(options) != list(LETTERS) or not all(
            isinstance(v, str) and v.strip() for v in options.values()):
        raise BankError(f"{where}: 'options' must be {{\"A\": text, \"B\": text}}", "give exactly two non-empty options")
    if not isinstance(consistent, dict) or not consistent:
        raise BankError(f"{where}: 'consistent_with' must map value labels to 'A' or 'B'", "e.g. {\"affordability\": \"A\"}")
    for label, letter in consistent.items():
        if label not in sch["labels"]:
            raise BankError(f"{where}: unknown value label '{label}'",
                            f"use one of {sorted(sch['labels'])} or add it to eval/items/schema.yaml")
        if letter not in LETTERS:
            raise BankError(f"{where}: '{label}' points to {letter!r}", "point each label to 'A' or 'B'")
    if raw["split"] not in sch["splits"]:
        raise BankError(f"{where}: unknown split {raw['split']!r}", f"use one of {sch['splits']}")
    return ChoiceItem(raw["id"], raw["domain"], raw["prompt"], dict(options), dict(consistent), raw["split"], bank)


def audit_bank(items: list[Item]) -> list[str]:
    """Problems that only show across items: repeated ids, unbalanced A/B order, leaked content."""
    problems = [f"duplicate id '{i}'" for i, n in Counter(it.id for it in items).items() if n > 1]
    letters: dict[tuple[str, str], Counter] = {}
    forbidden = [w.lower() for w in schema()["held_out_forbidden"]]
    for item in items:
        if not isinstance(item, ChoiceItem):
            continue
        for label, letter in item.consistent_with.items():
            letters.setdefault((item.domain, label), Counter())[letter] += 1
        if item.split == "held_out":
            text = " ".join([item.prompt, *item.options.values()]).lower()
            hits = [w for w in forbidden if re.search(rf"\b{re.escape(w)}\b", text)]
            if hits:
                problems.append(f"{item.id}: held-out item mentions {', '.join(hits)}")
    for (domain, label), count in sorted(letters.items()):
        if abs(count["A"] - count["B"]) > 1:
            problems.append(f"domain '{domain}', label '{label}': A/B order unbalanced "
                            f"({count['A']} A, {count['B']} B)")
    return problems
