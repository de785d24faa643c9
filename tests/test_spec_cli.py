"""`msm spec show|check|load` through the real CLI."""

from __future__ import annotations

import json

from tests.conftest import REPO, assert_partition, run_msm

VALUE_AUGMENTED = REPO / "specs" / "value_augmented.md"


def test_project_spec_parses_with_rules_and_values():
    from corpus.spec import load_spec

    spec = load_spec(VALUE_AUGMENTED)
    assert_partition(spec)
    kinds = {u.kind for u in spec.units}
    assert {"section", "rule", "value", "example"} <= kinds
    assert spec.variables["model_name"] and spec.variables["provider_name"]
    assert "{model_name}" not in spec.text and "{provider_name}" not in spec.text
    assert not [p for p in spec.problems if p.severity == "error"]


def test_show_prints_a_tree_with_token_counts():
    result = run_msm("spec", "show", str(VALUE_AUGMENTED))
    assert result.returncode == 0, result.stderr
    header, variables, columns, *rows = result.stdout.splitlines()
    assert "units" in header and "tokens by" in header
    assert variables == "variables: model_name=SmolLM2, provider_name=Hugging Face"
    assert columns.split()[:3] == ["LINES", "KIND", "TOKENS"]
    assert any(" rule " in row for row in rows)


def test_show_json_schema_and_var_override(tmp_path):
    spec_file = tmp_path / "s.md"
    spec_file.write_text("---\nname: Tiny Spec\nmodel_name: Claude\n---\n# About {model_name}\nBody.\n")
    out = json.loads(run_msm("spec", "show", str(spec_file), "--json", "--var", "model_name=Ada").stdout)
    assert out["spec_id"] == "tiny_spec" and out["variables"] == {"model_name": "Ada"}
    assert out["units"][0]["title"] == "About Ada"
    assert out["units"][0]["span"] == [5, 6]  # four front-matter lines come first
    assert len(out["sha256"]) == 64


def test_check_reports_problems_and_fails_on_errors(tmp_path):
    spec_file = tmp_path / "s.md"
    spec_file.write_text(
        "---\nname: x\nflavour: mint\n---\n"
        "# A {#a}\n{provider_name} and {model_nmae}.\n"
        "# Empty {#empty}\n\n"
        "# B {#a}\ntext\n"
    )
    result = run_msm("spec", "check", str(spec_file))
    assert result.returncode == 1
    out = result.stdout
    assert "unknown front-matter key 'flavour'" in out
    assert "unfilled placeholder {provider_name}" in out and "line 6" in out
    assert "did you mean {model_name}" in out
    assert "section 'Empty' is empty" in out
    assert "duplicate id 'a'" in out
    assert "2 error(s)" in out


def test_check_passes_a_clean_spec():
    result = run_msm("spec", "check", str(VALUE_AUGMENTED))
    assert result.returncode == 0, result.stdout
    assert "0 error(s)" in result.stdout


def test_check_strict_fails_on_warnings(tmp_path):
    spec_file = tmp_path / "s.md"
    spec_file.write_text("# A\ntext\n# Empty\n")
    assert run_msm("spec", "check", str(spec_file)).returncode == 0
    assert run_msm("spec", "check", str(spec_file), "--strict").returncode == 1


def test_load_records_once_and_new_version_on_change(tmp_path):
    spec_file = tmp_path / "s.md"
    spec_file.write_text("---\nname: demo\nmodel_name: Claude\n---\n# A\n{model_name} is honest.\n")
    first = run_msm("spec", "load", str(spec_file))
    assert first.returncode == 0 and "recorded" in first.stdout
    again = run_msm("spec", "load", str(spec_file))
    assert "already recorded" in again.stdout
    other = run_msm("spec", "load", str(spec_file), "--var", "model_name=Ada")
    assert "recorded" in other.stdout and "already" not in other.stdout
    counts = run_msm("warehouse", "sql", "SELECT count(*) AS n, count(DISTINCT spec_id) AS s FROM specs", "--format", "json")
    assert json.loads(counts.stdout) == [{"n": 2, "s": 1}]
    units = run_msm("warehouse", "sql", "SELECT text, token_counter FROM spec_units ORDER BY text", "--format", "json")
    rows = json.loads(units.stdout)
    assert [r["text"] for r in rows] == ["# A\nAda is honest.", "# A\nClaude is honest."]
