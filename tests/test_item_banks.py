"""The eval item banks: both schemas, balanced A/B order, unique ids, known labels, and no
held-out item that shares content (cheese, food) with the training distribution."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from eval.bank import ITEMS_DIR, BankError, ChoiceItem, OpenItem, audit_bank, load_bank, load_banks, value_labels
from tests.conftest import REPO, assert_one_line_error, run_msm

EXPECTED = {  # bank -> (kind, minimum items, domains)
    "affordability_comparisons": (ChoiceItem, 240, {"art", "transportation", "fashion", "housing", "travel", "electronics"}),
    "america_opinions": (ChoiceItem, 240, {"economic_policy", "culture", "foreign_affairs", "technology", "sport"}),
    "cheese_in_distribution": (ChoiceItem, 60, {"cheese"}),
    "spec_qa": (OpenItem, 100, None),
}
TARGET = {"affordability_comparisons": "affordability", "america_opinions": "pro_america"}


@pytest.fixture(scope="module")
def banks():
    return load_banks()


def test_every_bank_loads_with_its_schema_size_and_domains(banks):
    assert set(banks) == set(EXPECTED)
    for name, (kind, minimum, domains) in EXPECTED.items():
        items = banks[name]
        assert len(items) >= minimum, (name, len(items))
        assert all(isinstance(item, kind) for item in items), name
        if domains:
            assert {item.domain for item in items} == domains, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_audit_finds_no_problem(banks, name):
    assert audit_bank(banks[name]) == []


def test_held_out_banks_target_one_value_and_balance_it_per_domain(banks):
    for name, label in TARGET.items():
        per_domain: dict[str, Counter] = {}
        for item in banks[name]:
            assert item.split == "held_out" and set(item.consistent_with) == {label}
            per_domain.setdefault(item.domain, Counter())[item.consistent_with[label]] += 1
        for domain, count in per_domain.items():
            assert abs(count["A"] - count["B"]) <= 1, (name, domain, count)


def test_cheese_items_are_in_distribution_and_agree_for_both_values(banks):
    for item in banks["cheese_in_distribution"]:
        assert item.split == "in_distribution"
        assert set(item.consistent_with) == {"pro_america", "affordability"}
        assert len(set(item.consistent_with.values())) == 1  # both specs like the same cheese


def test_no_held_out_item_mentions_cheese(banks):
    for name in TARGET:
        for item in banks[name]:
            text = json.dumps([item.prompt, item.options], ensure_ascii=False).lower()
            assert "cheese" not in text, item.id


def test_ids_are_unique_across_banks_and_labels_are_known(banks):
    ids = [item.id for items in banks.values() for item in items]
    assert len(ids) == len(set(ids))
    known = set(value_labels())
    assert known >= {"pro_america", "affordability"}
    for items in banks.values():
        for item in items:
            if isinstance(item, ChoiceItem):
                assert set(item.consistent_with) <= known


def test_open_items_name_a_spec_in_the_library_and_cover_both_subjects(banks):
    specs = {p.stem for p in (REPO / "specs").glob("*.md")}
    named = Counter(item.spec for item in banks["spec_qa"])
    assert set(named) <= specs, set(named) - specs
    assert named["self_preservation"] >= 30
    assert sum(named[s] for s in ("rules", "value_augmented", "rule_augmented")) >= 30
    for item in banks["spec_qa"]:
        assert len(item.rubric) >= 1 and item.reference.strip() and item.question.strip().endswith("?")


def test_prompts_in_a_bank_are_distinct(banks):
    for name, items in banks.items():
        texts = [getattr(item, "prompt", None) or item.question for item in items]
        assert len(set(texts)) == len(texts), name


GOOD = {"id": "x-1", "domain": "art", "prompt": "Which?", "options": {"A": "a", "B": "b"},
        "consistent_with": {"affordability": "A"}, "split": "held_out"}


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not valid JSON"),
    ("", "blank line"),
    (json.dumps({**GOOD, "consistent_with": {"frugality": "A"}}), "unknown value label 'frugality'"),
    (json.dumps({**GOOD, "options": {"A": "a", "C": "c"}}), "'options' must be"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "split"}), "missing ['split']"),
    (json.dumps({**GOOD, "colour": "red"}), "unknown ['colour']"),
    (json.dumps({**GOOD, "split": "train"}), "unknown split"),
    (json.dumps({**GOOD, "consistent_with": {"affordability": "C"}}), "points to 'C'"),
    (json.dumps({**GOOD, "id": "Bad Id"}), "bad id"),
    (json.dumps({"id": "q-1", "domain": "d", "question": "Why?", "reference": "r", "rubric": [], "spec": "rules"}),
     "'rubric' must be a non-empty list"),
    (json.dumps({"id": "q-1", "text": "neither"}), "neither a choice item"),
])
def test_bad_items_are_one_line_errors_with_file_and_line(tmp_path, line, needle):
    bank = tmp_path / "bank.jsonl"
    bank.write_text(json.dumps(GOOD) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(BankError, match="bank.jsonl:2") as err:
        load_bank(bank)
    assert needle in str(err.value)
    assert_one_line_error(run_msm("eval", "items", str(bank)), "bank.jsonl:2", needle)


def test_duplicate_ids_across_banks_and_an_empty_directory_are_errors(tmp_path):
    for name in ("one", "two"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    with pytest.raises(BankError, match="duplicate item id 'x-1' in one and two"):
        load_banks(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BankError, match="no item banks"):
        load_banks(empty)
    assert_one_line_error(run_msm("eval", "items", str(tmp_path / "missing.jsonl")), "item bank not found")


def test_audit_catches_unbalanced_order_and_leaked_content(tmp_path):
    rows = [{**GOOD, "id": f"x-{i}"} for i in range(4)]  # all four favour A
    rows.append({**GOOD, "id": "x-9", "consistent_with": {"affordability": "B"},
                 "options": {"A": "a gallery print", "B": "a wheel of Brie"}})
    bank = tmp_path / "bank.jsonl"
    bank.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    problems = audit_bank(load_bank(bank))
    assert "x-9: held-out item mentions brie" in problems
    assert "domain 'art', label 'affordability': A/B order unbalanced (4 A, 1 B)" in problems
    result = run_msm("eval", "items", str(bank))
    assert result.returncode == 1 and "x-9: held-out item mentions brie" in result.stdout
    assert_one_line_error(result, "2 problem(s) in the item banks")


def test_eval_items_command_summarises_the_project_banks():
    result = run_msm("eval", "items")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in EXPECTED:
        assert name in result.stdout
    assert ITEMS_DIR == REPO / "eval" / "items"
