"""The expected cost beside the upper bound, and budgets refused before anything is spent."""

from __future__ import annotations

import builtins
import math
import pathlib
import re

import pytest
import yaml

from msm.errors import MsmError
from tests.conftest import LOOPBACK_KEY, REPO, assert_one_line_error, run_msm

SPEC = REPO / "specs" / "value_augmented.md"
MODEL = "claude-sonnet-4-6"


@pytest.fixture
def api(monkeypatch, loopback):
    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    loopback.output_tokens = 400
    return loopback


def _estimate(**kw):
    from corpus.api import estimate

    return estimate(str(SPEC), backend="anthropic", model=MODEL, **kw)


def test_the_expected_cost_sits_below_the_upper_bound_and_follows_the_target():
    from corpus.cost import cost_model
    from pipelines.target import HEADROOM

    small, large = _estimate(tokens="1M"), _estimate(tokens="4M")
    assert 0 < small["expected_usd"] < small["cost_usd"]
    assert large["expected_usd"] == pytest.approx(4 * small["expected_usd"], rel=0.01)
    m = cost_model()
    per_doc = _mean_midpoint() * m["tokens_per_word"] * m["survival"]
    assert small["docs"] == math.ceil(1_000_000 / per_doc * HEADROOM)  # what the first round plans
    assert small["kept_docs"] == round(1_000_000 / (per_doc / m["survival"]))
    batch = _estimate(tokens="1M", batch=True)
    assert batch["expected_usd"] == pytest.approx(small["expected_usd"] * 0.5, rel=0.01)


def _mean_midpoint():
    from corpus.catalog import load_genres, mean_words

    return mean_words(load_genres())


def test_brainstorm_counts_an_assertions_call_and_chunked_idea_calls_per_unit():
    from corpus.cost import brainstorm_limits, brainstorm_usage, cost_model

    per_call, _ = brainstorm_limits()
    top_up = cost_model()["brainstorm"]["top_up_share"]
    calls, usage = brainstorm_usage(["unit one text", "unit two text"], 2 * (per_call * 3 + 1))
    assert calls == round(2 + 2 * 4 * (1 + top_up))  # ceil(3 lists + 1 slot) = 4 idea calls a unit
    assert usage.output_tokens > 0
    cells, brainstormed = _estimate(tokens="1M"), _estimate(tokens="1M", plan_mode="brainstorm")
    assert brainstormed["expected_usd"] > cells["expected_usd"] and brainstormed["calls"] > cells["calls"]


def test_the_estimate_is_an_independent_prediction(monkeypatch):
    """It reads the cost model and the price table, never the simulator's behaviour file."""
    opened = []
    real_open, real_read = builtins.open, pathlib.Path.read_text
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    monkeypatch.setattr(pathlib.Path, "read_text", lambda self, *a, **k: (opened.append(str(self)),
                                                                          real_read(self, *a, **k))[1])
    from corpus.cost import cost_model

    cost_model.cache_clear()
    _estimate(tokens="1M", plan_mode="brainstorm", doc_words=2000)
    assert any(p.endswith("cost_model.yaml") for p in opened)
    assert not any("simulator" in p for p in opened)


def test_a_token_target_over_budget_is_refused_before_any_call(api, tmp_path):
    expected = _estimate(tokens="1M")["expected_usd"]
    result = run_msm("corpus", "build", str(SPEC), "--tokens", "1M", "--max-cost", "1", "--backend", "anthropic",
                     "--model", MODEL, "--base-url", api.url)
    line = assert_one_line_error(result, "max_cost $1.00 is below the expected cost of reaching 1,000,000 kept tokens",
                                 "expected", "upper bound", f"at least ${math.ceil(expected):,}", "--tokens")
    assert "\n" not in line
    assert sum(api.stats.requests.values()) == 0
    assert not (tmp_path / "msm_home" / "msm.duckdb").exists() and not (tmp_path / "msm_home" / "builds").exists()


def test_a_budget_above_the_expected_cost_is_accepted_and_both_figures_shown(api):
    result = run_msm("corpus", "build", str(SPEC), "--tokens", "4000", "--max-cost", "5", "--backend", "anthropic",
                     "--model", MODEL, "--base-url", api.url, "--dedup", "none", "--no-progress")
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("4,000 kept tokens (") and "expected" in first and "upper bound" in first
    assert "budget $5.00" in first and "token target 4,000" in result.stdout
    assert re.search(r"token target 4,000: .* tokens \(counted by [^)]+\)", result.stdout)


def test_a_fixed_document_count_shows_its_figures_and_a_short_budget_stops_with_rows_pending(api):
    result = run_msm("corpus", "build", str(SPEC), "--docs", "3", "--max-cost", "0.0001", "--backend", "anthropic",
                     "--model", MODEL, "--base-url", api.url, "--dedup", "none", "--no-progress",
                     "--concurrency", "1")
    first = result.stdout.splitlines()[0]
    assert "3 documents:" in first and "expected" in first and "upper bound" in first
    assert "below the expected cost, so the build will stop with rows pending" in first


def test_an_ablation_over_budget_is_refused_before_any_call(api, isolated_home):
    from corpus.api import ablate

    with pytest.raises(MsmError) as err:
        ablate(str(SPEC), ("attribution", "cooccurrence"), tokens="1M", backend="anthropic", model=MODEL,
               base_url=api.url, max_cost=1.0, progress=False)
    assert "per condition (2 conditions)" in err.value.problem and "upper bound" in err.value.problem
    assert sum(api.stats.requests.values()) == 0 and not (isolated_home / "msm.duckdb").exists()


def _experiment(tmp_path, server, **corpus):
    from tests.test_experiment import tiny

    path = tiny(tmp_path, server)
    raw = yaml.safe_load(path.read_text())
    raw["corpus"].update(corpus)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_an_experiment_corpus_over_budget_is_flagged_by_plan_and_refused_by_run(api, tmp_path):
    path = _experiment(tmp_path, api, docs=None, tokens="1M", max_cost=1)
    plan = run_msm("experiment", "run", str(path), "--plan")
    assert plan.returncode == 0, plan.stderr
    corpus_line = next(ln for ln in plan.stdout.splitlines() if ln.startswith("corpus msm"))
    assert "expected" in corpus_line and "upper bound" in corpus_line and "BELOW THE EXPECTED COST" in corpus_line
    result = run_msm("experiment", "run", str(path))
    assert_one_line_error(result, "max_cost $1.00 is below the expected cost", "upper bound", "raise max_cost")
    assert api.stats.requests.get("messages", 0) == 0  # the corpus is the first step: nothing was called


def test_an_experiment_budget_above_the_expected_cost_passes_the_check(api, tmp_path):
    from msm.experiment import plan_steps
    from msm.experiment_config import load_experiment
    from msm.experiment_estimate import estimate_steps
    from pipelines.build import BuildOptions
    from pipelines.target import parse_tokens, refuse_short_budget

    path = _experiment(tmp_path, api, docs=None, tokens="1M", max_cost=500)
    exp = load_experiment(path)
    step = next(s for s in plan_steps(exp) if s.kind == "corpus")
    est = estimate_steps(exp, [step])[step.key]
    assert est.expected_usd < 500 and "BELOW" not in est.note
    options = {k: v for k, v in step.inputs["options"].items() if k not in ("tokens", "dedup")}
    refuse_short_budget(str(step.work["spec"]), BuildOptions(**options), parse_tokens("1M"))  # no error


SHIPPED = sorted((REPO / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_paper_corpus_budgets_cover_the_expected_cost_and_the_first_rounds_upper_bound(path):
    from msm.experiment import plan_steps
    from msm.experiment_config import load_experiment
    from msm.experiment_estimate import corpus

    exp = load_experiment(path, "paper")
    for step in plan_steps(exp):
        if step.kind in ("corpus", "ablation") and not step.work.get("match"):
            e = corpus(step, exp)
            budget = step.inputs["options"]["max_cost"]
            assert 0 < e.expected_usd < e.cost_usd <= budget and "BELOW" not in e.note, (step.label, e.note)
