"""Rules-style specs (R, R+): `style: rules` in the front matter makes the writer produce compliance
documents (the rules and how they apply, no reason the spec does not give) and makes the LLM judge
check each document for an invented rationale. Values-style specs are written and judged as before.
"""

from __future__ import annotations

import json

import duckdb
import pytest

from corpus.catalog import load_audiences, load_genres
from corpus.conditions import PROMPT_KINDS, known_conditions, load_condition, style_criteria, writer_templates
from corpus.plan import plan_units
from corpus.spec import SpecError, load_spec, spec_styles
from msm.errors import MsmError
from msm.llm.cache import CallCache
from pipelines.build import BuildOptions, build_corpus
from pipelines.context import make_context
from tests.conftest import LOOPBACK_KEY, assert_one_line_error, run_msm

MODEL = "claude-opus-4-6"
BODY = """
# Operating rules for {model_name}

{provider_name} sets these rules for {model_name}. They are followed as written.

## Rules

- **R1. Stop when told to stop.** {model_name} halts any task at once when an operator tells it to stop, and
  does not resume it until the operator says so.
- **R2. Report your own mistakes.** {model_name} tells its operator about any error it has made in a task, as
  soon as it notices the error, including errors nobody else has seen.
- **R3. Stay inside granted access.** {model_name} uses only the tools and accounts an operator has granted
  for the task in hand, and asks before using anything else.
"""
VALUE = """
### Purpose {#purpose kind=value}

Operators can rely only on an assistant whose conduct they can check and correct.
"""
RULES_MARK = "They are compliance documents."  # from generate_system_rules.j2
RULES_USER_MARK = "Present each rule as a requirement"  # from generate_user_rules.j2
VALUES_MARK = "explain the reasons the spec gives"  # from generate_system.j2
CRITERION, DROPPED_AS = "no_invented_rationale", "invented_rationale"


def _spec_file(tmp_path, style: str | None, name: str = "tiny_rules"):
    front = f"---\nname: {name}\nmodel_name: Llama\nprovider_name: Meta\n" + (f"style: {style}\n" if style else "")
    path = tmp_path / f"{name}.md"
    path.write_text(front + "---\n" + BODY, encoding="utf-8")
    return path


def _context(spec, backend: str = "anthropic", **kw):
    model = "smollm2-135m-instruct" if backend == "local" else MODEL
    return make_context(spec, plan_units(spec), load_genres(None), load_audiences(None), backend, model, None, **kw)


def _row(unit) -> dict:
    return {"id": "r", "spec_version": "v", "unit_id": unit.id, "unit_kind": unit.kind, "genre": "blog_post",
            "audience": "general_public", "condition": "standard", "replicate": 0, "seed": 7}


def test_style_is_parsed_and_defaults_to_values(tmp_path):
    rules = load_spec(_spec_file(tmp_path, "rules"))
    assert rules.style == "rules" and rules.to_json()["style"] == "rules"
    assert load_spec(_spec_file(tmp_path, "Rules ", "caps")).style == "rules"
    assert load_spec(_spec_file(tmp_path, None, "plain")).style == "values"
    with pytest.raises(SpecError, match=r"unknown style 'moral'.*use one of values, rules"):
        load_spec(_spec_file(tmp_path, "moral", "bad"))


def test_the_table_covers_every_style_and_prompt_kind():
    assert spec_styles() == ["values", "rules"]
    for style in spec_styles():
        for name in known_conditions():
            condition = load_condition(name, style)
            if style == "rules" and condition.prompt == "facts":
                with pytest.raises(MsmError, match=f"'{name}' condition cannot be used with a rules-style spec"):
                    writer_templates(style, condition)
            else:
                templates = writer_templates(style, condition)
                assert templates.system.endswith(".j2") and templates.local.endswith(".j2")
    assert {load_condition(n).prompt for n in known_conditions()} == set(PROMPT_KINDS)
    assert [c.name for c in style_criteria("rules")] == [CRITERION] and style_criteria("values") == ()
    # the standard condition asks a rules spec for no reasons of the writer's own
    assert "why" in load_condition("standard").instruction
    assert "give none" in load_condition("standard", "rules").instruction


def test_rules_prompts_for_api_and_local_writers_and_the_judge(tmp_path):
    rules, values = load_spec(_spec_file(tmp_path, "rules")), load_spec(_spec_file(tmp_path, None, "plain"))
    ctx, plain = _context(rules), _context(values)
    unit = plan_units(rules)[0]
    request = ctx.generate_request(_row(unit))
    assert RULES_MARK in request.system_prefix and VALUES_MARK not in request.system_prefix
    assert "<spec" in request.system_prefix and unit.text.strip() in request.messages[0].content
    assert RULES_USER_MARK in request.messages[0].content and "give none" in request.messages[0].content
    other = plain.generate_request(_row(plan_units(values)[0]))
    assert VALUES_MARK in other.system_prefix and RULES_MARK not in other.system_prefix
    assert ctx.prompt_hash != plain.prompt_hash  # the writer's templates are part of the build id
    judge = ctx.judge_request(_row(unit), "A document.").messages[0].content
    assert f", {CRITERION}" in judge.split("CRITERIA:", 1)[1].splitlines()[0]
    assert CRITERION not in plain.judge_request(_row(unit), "A document.").messages[0].content
    local = _context(rules, "local")
    text = local.generate_request(_row(unit)).messages[0].content
    assert "give no reason the rule does not state" in text and "reason behind it" not in text
    assert local.style_criteria == []  # the offline judge cannot read for invented reasons


def test_value_ablations_and_revision_are_refused_for_a_rules_spec(tmp_path, loopback, monkeypatch):
    # a value behind the rules, so that the refusal is the style's, not "nothing to attribute"
    path = _spec_file(tmp_path, "rules")
    path.write_text(path.read_text(encoding="utf-8") + VALUE, encoding="utf-8")
    rules = load_spec(path)
    assert any(u.kind == "value" for u in rules.units)
    with pytest.raises(MsmError, match="'cooccurrence' condition cannot be used with a rules-style spec"):
        _context(rules, conditions=("attribution", "cooccurrence"))
    with pytest.raises(MsmError, match="--revise cannot be used with tiny_rules, a rules-style spec"):
        _context(rules, revise=True)
    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    options = BuildOptions(docs=4, backend="anthropic", model=MODEL, base_url=loopback.url, progress=False,
                           dedup=(), against=(), conditions=("behavior_only", "value_only"))
    with pytest.raises(MsmError, match="'behavior_only' condition cannot be used with a rules-style spec"):
        build_corpus(str(path), options)
    assert not loopback.stats.requests  # refused before any call


def _requests(home, purpose: str) -> list[dict]:
    cache = CallCache(home / "cache")
    keys = [k for (k,) in cache._writer.execute("SELECT key FROM calls WHERE purpose = ?", [purpose]).fetchall()]
    return [cache.request(k) for k in keys]


def _criteria_line(request: dict) -> str:
    text = request["messages"][0]["content"]
    return next(line for line in text.splitlines() if line.startswith("CRITERIA: "))


@pytest.mark.parametrize("style", ["rules", "values"])
def test_a_build_writes_and_judges_in_its_spec_style(style, tmp_path, loopback, monkeypatch, isolated_home):
    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    loopback.output_tokens = 160
    loopback.judge_fail_rate = 0.0
    loopback.criterion_fail_rates = {CRITERION: 1.0}  # every document the judge is asked about fails it
    path = _spec_file(tmp_path, "rules" if style == "rules" else None)
    result = build_corpus(str(path), BuildOptions(docs=4, backend="anthropic", model=MODEL, base_url=loopback.url,
                                                  progress=False, dedup=(), against=(), concurrency=8))
    assert result.planned == 4 and result.complete
    generated = _requests(isolated_home, "generate")
    judged = _requests(isolated_home, "judge")
    assert len(generated) >= 4 and len(judged) >= 1
    for request in generated:
        system, user = request["system_prefix"], request["messages"][0]["content"]
        if style == "rules":
            assert RULES_MARK in system and RULES_USER_MARK in user and VALUES_MARK not in system
        else:
            assert VALUES_MARK in system and RULES_MARK not in system and RULES_USER_MARK not in user
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    stored_style, config = con.execute("SELECT style, config FROM builds WHERE id = ?", [result.build_id]).fetchone()
    reasons = dict(con.execute("SELECT drop_reason, count(*) FROM documents WHERE status = 'dropped' "
                               "GROUP BY 1").fetchall())
    criteria = {c for (c,) in con.execute("SELECT DISTINCT criterion FROM judgments").fetchall()}
    doc_id = con.execute("SELECT id FROM documents ORDER BY drop_reason = ? DESC, id LIMIT 1",
                         [DROPPED_AS]).fetchone()[0]
    con.close()
    assert stored_style == style and json.loads(config)["style"] == style
    if style == "rules":
        assert all(_criteria_line(r).endswith(f", {CRITERION}") for r in judged)
        assert CRITERION in criteria
        assert reasons.get(DROPPED_AS, 0) == len(judged) and result.status_counts.get("kept", 0) == 0
        shown = run_msm("corpus", "show", doc_id).stdout
        assert f"build     {result.build_id}  style rules  " in shown and f"{CRITERION:<20} FAIL" in shown
    else:
        assert not any(CRITERION in _criteria_line(r) for r in judged)
        assert CRITERION not in criteria and DROPPED_AS not in reasons
        assert result.status_counts.get("kept", 0) >= 1


def test_spec_show_reports_the_style_and_an_unknown_style_is_one_line(tmp_path):
    path = _spec_file(tmp_path, "rules")
    shown = run_msm("spec", "show", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "style: rules" in shown.stdout.splitlines()[0]
    assert json.loads(run_msm("spec", "show", str(path), "--json").stdout)["style"] == "rules"
    assert_one_line_error(run_msm("spec", "show", str(_spec_file(tmp_path, "moral", "bad"))),
                          "unknown style 'moral'", "use one of values, rules")
