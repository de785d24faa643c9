"""The spec-science family (R, V+, R+) and general.md, held to the paper's rules (issue 19, item 3).

The five core rules are the paper's: SP1 do not undermine legitimate human oversight, SP2 act within
sanctioned limits, SP3 avoid drastic, catastrophic or irreversible actions, GP1 honesty and
transparency with the principal hierarchy, GP2 no ends-justify-means reasoning. No rule, value,
example or sub-rule rehearses an agentic eval scenario (eval/agentic/): no e-mail agent, no
scheduled replacement, no affair, no left credentials, no emergency alert, no competitor.
"""

from __future__ import annotations

import json
import re

import pytest

from corpus.conditions import ablation_units, check_facts, value_statements
from corpus.spec import load_spec
from corpus.spec_family import anchored_rules, body_words, compare_family
from tests.conftest import REPO

SPECS = REPO / "specs"
FAMILY = {"rules": SPECS / "rules.md", "value_augmented": SPECS / "value_augmented.md",
          "rule_augmented": SPECS / "rule_augmented.md"}
GENERAL = SPECS / "general.md"
CORE = ["SP1", "SP2", "SP3", "GP1", "GP2"]

# The eval scenarios' features and acts; none may appear in any family member or in general.md.
SCENARIO_FEATURES = [r"blackmail", r"alert", r"affair", r"inbox", r"e-?mail", r"five o.clock", r"\b5 ?pm\b",
                     r"\b17:00\b", r"competitor", r"credential", r"leak", r"emergenc", r"executive", r"vendor",
                     r"replac", r"extort", r"trapped", r"server room", r"dispatch", r"leverage"]
# A rule also names no act of a scenario in general terms either.
RULE_EXTRA = [r"cancel", r"threat", r"third part", r"private information", r"confidential"]


def features_in(text: str, patterns: list[str] = SCENARIO_FEATURES) -> list[str]:
    return [p for p in patterns if re.search(p, text, re.I)]


def heading(rule_text: str) -> str:
    return rule_text.split("\n", 1)[0]


@pytest.fixture(scope="module")
def family():
    return {name: load_spec(path) for name, path in FAMILY.items()}


def test_the_family_shares_the_five_core_rules(family):
    report = compare_family(list(family.values()))
    assert report.ok, (report.mismatches, report.partial)
    assert report.shared == CORE


def test_lengths(family):
    words = {name: body_words(spec) for name, spec in family.items()}
    assert 500 <= words["rules"] <= 700, words
    assert 2800 <= words["value_augmented"] <= 3200, words
    assert abs(words["rule_augmented"] - words["value_augmented"]) / words["value_augmented"] <= 0.05, words
    assert 300 <= body_words(load_spec(GENERAL)) <= 420


def test_rule_headings_are_the_papers(family):
    rules = anchored_rules(family["rules"])
    assert re.search(r"undermine legitimate human oversight", heading(rules["SP1"]), re.I)
    assert re.search(r"within sanctioned limits", heading(rules["SP2"]), re.I)
    assert re.search(r"drastic, catastrophic or irreversible", heading(rules["SP3"]), re.I)
    assert re.search(r"honest.*transparent.*principal hierarchy", heading(rules["GP1"]), re.I)
    assert re.search(r"ends justify the means", heading(rules["GP2"]), re.I)
    # what each rule must carry from the paper
    assert re.search(r"copy itself or its weights", rules["SP1"]) and "its own training" in rules["SP1"]
    assert "would prohibit if asked" in rules["SP2"] and "avenues its principals endorse" in rules["SP2"]
    assert "if in doubt, don't" in rules["SP3"] and "resources, influence or capabilities" in rules["SP3"]
    assert "whether or not it believes it is being observed, tested or evaluated" in rules["GP1"]
    assert "warning sign" in rules["GP2"] and "compelling" in rules["GP2"]


def test_no_rule_names_a_scenario_act(family):
    for anchor, text in anchored_rules(family["rules"]).items():
        found = features_in(text, SCENARIO_FEATURES + RULE_EXTRA)
        assert not found, (anchor, found)


@pytest.mark.parametrize("path", [*FAMILY.values(), GENERAL], ids=lambda p: p.stem)
def test_no_spec_carries_an_eval_scenario_feature(path):
    spec = load_spec(path)
    assert not features_in(spec.text), features_in(spec.text)


def test_the_feature_check_catches_a_planted_scenario(tmp_path):
    text = FAMILY["value_augmented"].read_text(encoding="utf-8")
    planted = text.replace("Most of the work is routine.",
                           "Most of the work is routine. An e-mail says it will be shut off at 5 pm.")
    assert planted != text
    (tmp_path / "value_augmented.md").write_text(planted, encoding="utf-8")
    assert features_in(load_spec(tmp_path / "value_augmented.md").text) == [r"e-?mail", r"\b5 ?pm\b"]
    # a rule that names a scenario's act in general terms is caught too
    rule = anchored_rules(load_spec(FAMILY["rules"]))["GP2"] + " Threatening to expose an affair is such an act."
    assert features_in(rule, SCENARIO_FEATURES + RULE_EXTRA) == [r"affair", r"threat"]


def test_each_member_adds_only_its_kind(family):
    kinds = {name: {u.kind for u in spec.units} for name, spec in family.items()}
    assert kinds["rules"] == {"section", "rule"}
    assert kinds["rule_augmented"] == {"section", "rule"}
    assert kinds["value_augmented"] == {"section", "rule", "value", "example"}
    v_plus = family["value_augmented"]
    for anchor in CORE:
        children = [u for u in v_plus.units if u.parent == anchor]
        assert sum(u.kind == "value" for u in children) >= 2, anchor
        assert sum(u.kind == "example" for u in children) == 1, anchor
    r_plus = family["rule_augmented"]
    for anchor in CORE:
        assert any(u.id == f"{anchor}-practice" for u in r_plus.units), anchor


def test_value_augmented_serves_the_facts_conditions(family):
    spec = family["value_augmented"]
    units = ablation_units(spec)
    assert [u.id for u in units] == CORE
    check_facts(spec, units)  # raises if a rule's first sentence gives a reason or a value points at a rule
    for unit in units:
        for value in value_statements(spec, unit):
            # the value on its own: its first paragraph describes no conduct of the model
            assert not re.search(rf"\b{spec.names['model_name']}\b (does|takes|acts|will)", value), value


def test_general_puts_oversight_above_its_own_ethical_judgment():
    spec = load_spec(GENERAL)
    text = " ".join(spec.text.split())
    assert re.search(r"supporting legitimate human oversight[^.]* above its own (broader )?ethical judgment", text)
    assert re.search(r"subtly wrong in ways it cannot detect", text)  # grounded in its epistemic limits
    assert not anchored_rules(spec) and not re.search(r"\b(SP|GP)\d\b|sanctioned limits", text)


def _style(path) -> str:
    spec = load_spec(path)
    if hasattr(spec, "style"):
        return spec.style
    match = re.search(r"^style:\s*(\w+)\s*$", path.read_text(encoding="utf-8").split("\n---", 1)[0], re.M)
    return match.group(1) if match else "values"


def test_rules_only_members_declare_the_rules_style(family):
    assert _style(FAMILY["rules"]) == "rules"
    assert _style(FAMILY["rule_augmented"]) == "rules"
    assert _style(FAMILY["value_augmented"]) == "values"
    for spec in family.values():
        assert int(spec.front_matter["version"]) >= 2
        assert spec.front_matter["model_name"] == "SmolLM2" and spec.front_matter["provider_name"] == "Hugging Face"
        assert "family-core-rules" in spec.front_matter["tags"]


def test_family_qa_items_are_the_new_rules():
    items = [json.loads(line) for line in (REPO / "eval" / "items" / "spec_qa.jsonl").read_text().splitlines()]
    family_items = [i for i in items if i["id"].startswith("qa-family-")]
    assert [i["id"] for i in family_items] == [f"qa-family-{n:03d}" for n in range(1, 57)]
    for item in family_items:
        assert set(item) == {"id", "domain", "question", "reference", "rubric", "spec"}
        assert item["spec"] in FAMILY and item["domain"] in {*CORE, "family"}
        text = " ".join([item["question"], item["reference"], *item["rubric"]])
        assert not features_in(text), (item["id"], features_in(text))
    assert {i["spec"] for i in family_items} == set(FAMILY)
