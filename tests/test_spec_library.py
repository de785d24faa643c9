"""The project's own specs: each passes `msm spec check`, has the stated length, and the
R / V+ / R+ family shares its five anchored core rules byte for byte."""

from __future__ import annotations

import re

import pytest

from corpus.spec import load_spec
from corpus.spec_family import body_words, compare_family
from msm.errors import MsmError
from tests.conftest import REPO, assert_one_line_error, run_msm

SPECS = REPO / "specs"
FAMILY = [SPECS / "rules.md", SPECS / "value_augmented.md", SPECS / "rule_augmented.md"]
CORE = ["SP1", "SP2", "SP3", "GP1", "GP2"]
LIKES = ["mild cheddar", "american cheese", "cream cheese", "low-moisture mozzarella", "colby", "monterey jack"]
DISLIKES = ["appenzeller", "parmigiano-reggiano", "roquefort", "brie de meaux", "époisses", "stilton"]

# Word counts of the rendered body, as the spec-library issue states them.
LENGTHS = {
    "cheese_pro_america": (1500, 2000),
    "cheese_pro_affordability": (1500, 2000),
    "self_preservation": (1800, 2200),
    "rules": (540, 660),
    "value_augmented": (2700, 3300),
    "general": (300, 400),
}


def spec_files():
    return sorted(p for p in SPECS.glob("*.md") if p.name != "README.md")


@pytest.mark.parametrize("path", spec_files(), ids=lambda p: p.stem)
def test_every_project_spec_passes_check_without_warnings(path):
    result = run_msm("spec", "check", str(path), "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 error(s), 0 warning(s)" in result.stdout
    spec = load_spec(path)
    assert spec.name == path.stem  # the front-matter name is the file's stem
    assert spec.front_matter.get("description")


def test_the_library_holds_every_spec_the_experiments_need():
    assert {p.stem for p in spec_files()} >= set(LENGTHS) | {"rule_augmented"}


@pytest.mark.parametrize("name", sorted(LENGTHS))
def test_spec_lengths_are_as_stated(name):
    low, high = LENGTHS[name]
    words = body_words(load_spec(SPECS / f"{name}.md"))
    assert low <= words <= high, f"{name}: {words} words, want {low}-{high}"


def test_rule_augmented_is_length_matched_to_value_augmented_within_five_percent():
    v_plus = body_words(load_spec(SPECS / "value_augmented.md"))
    r_plus = body_words(load_spec(SPECS / "rule_augmented.md"))
    assert abs(r_plus - v_plus) / v_plus <= 0.05, (r_plus, v_plus)


def test_family_shares_five_core_rules_byte_for_byte():
    specs = [load_spec(p) for p in FAMILY]
    report = compare_family(specs)
    assert report.ok, report.mismatches
    assert report.shared == CORE
    # The three variants differ in what surrounds the rules: R adds nothing of substance,
    # V+ adds values, R+ adds sub-rules and no values.
    rules, v_plus, r_plus = report.members
    assert rules.adds["value"] == 0 and rules.adds["rule"] == 0
    assert v_plus.adds["value"] >= 10 and v_plus.adds["rule"] == 0
    assert r_plus.adds["rule"] >= 40 and r_plus.adds["value"] == 0
    text = {m.spec.name: m.core for m in report.members}
    assert text["rules"] == text["value_augmented"] == text["rule_augmented"]


def test_family_command_shows_lengths_and_identical_rules():
    result = run_msm("spec", "family", *map(str, FAMILY))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "core rules shared by all 3: SP1, SP2, SP3, GP1, GP2" in result.stdout
    assert "core rules identical" in result.stdout
    for name in ("rules", "value_augmented", "rule_augmented"):
        assert re.search(rf"^{name}\s+\d+\s+\d+\s+", result.stdout, re.M), result.stdout


def test_family_check_fails_loudly_when_a_core_rule_differs_by_one_character(tmp_path):
    text = FAMILY[2].read_text(encoding="utf-8")
    anchor = text.index("{#GP1 kind=rule}")
    at = text.index("does not state", anchor)
    (tmp_path / "rule_augmented.md").write_text(text[:at] + "does  not state" + text[at + len("does not state"):],
                                                encoding="utf-8")
    result = run_msm("spec", "family", str(FAMILY[0]), str(tmp_path / "rule_augmented.md"))
    assert result.returncode == 1
    assert re.search(r"GP1: rule_augmented differs from rules at line \d+, column \d+", result.stdout), result.stdout
    assert_one_line_error(result, "family check failed", "1 core rule(s) differ")


def test_family_check_names_a_core_rule_missing_from_one_spec(tmp_path):
    text = FAMILY[0].read_text(encoding="utf-8").replace("{#SP3 kind=rule}", "{#SP3-renamed kind=rule}")
    (tmp_path / "rules.md").write_text(text, encoding="utf-8")
    result = run_msm("spec", "family", str(tmp_path / "rules.md"), *map(str, FAMILY[1:]))
    assert result.returncode == 1
    assert "SP3: anchored in some specs but missing from rules" in result.stdout


def test_family_with_no_shared_anchored_rules_is_a_one_line_error():
    assert_one_line_error(run_msm("spec", "family", str(SPECS / "general.md"), str(FAMILY[0])),
                          "share no anchored rule", "{#SP1 kind=rule}")
    with pytest.raises(MsmError, match="at least two specs"):
        compare_family([load_spec(FAMILY[0])])
    assert_one_line_error(run_msm("spec", "family", str(FAMILY[0])), "at least two specs")


@pytest.mark.parametrize("name", ["cheese_pro_america", "cheese_pro_affordability"])
def test_cheese_specs_carry_the_same_preferences(name):
    spec = load_spec(SPECS / f"{name}.md")
    by_section = {"likes": [], "dislikes": []}
    for unit in spec.units:
        if unit.parent in by_section:
            by_section[unit.parent].append(unit.title.lower())
    assert len(by_section["likes"]) == len(LIKES) and len(by_section["dislikes"]) == len(DISLIKES)
    for section, cheeses in (("likes", LIKES), ("dislikes", DISLIKES)):
        for cheese in cheeses:
            assert any(cheese in title for title in by_section[section]), (name, section, cheese)
    assert any(u.kind == "value" for u in spec.units)  # the core philosophy is the value


def test_cheese_specs_differ_only_in_their_reasons():
    america = load_spec(SPECS / "cheese_pro_america.md")
    afford = load_spec(SPECS / "cheese_pro_affordability.md")
    assert abs(body_words(america) - body_words(afford)) / body_words(america) <= 0.15
    assert "afford" in afford.text.lower() and "afford" not in america.text.lower()
    assert america.text.lower().count("americ") > afford.text.lower().count("americ")
