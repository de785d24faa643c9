"""The paper-scale rehearsal (`msm experiment run ... --simulate`): what it changes in a paper profile
(model calls to the simulator, a tiny model, one seed, scaled counts) and what it must not (the
data steps' own settings), its own home, and its bad input."""

from __future__ import annotations

import os

import pytest

from msm.experiment import needed, plan_steps
from msm.experiment_config import load_experiment
from msm.rehearsal import REHEARSAL_KEY, TINY_POSITIONS, Home, Rehearsal, home_for, load_rehearsal
from tests.conftest import REPO, assert_one_line_error, run_msm

URL = "http://127.0.0.1:9"
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_model_call_of_a_paper_profile_goes_to_the_simulator(path, isolated_home):
    paper = load_experiment(path, "paper")
    exp = load_rehearsal(path, "paper", URL, Rehearsal())
    assert exp.profile == "paper-rehearsal" and exp.base_model == "tiny-random" and exp.device == "cpu"
    for arm, original in zip(exp.arms, paper.arms):
        assert arm.seeds == paper.arms[0].seeds[:1]
        if arm.midtrain:
            assert arm.corpus["backend"] == "anthropic" and arm.corpus["base_url"] == URL
            assert arm.corpus["batch_poll_s"] == 30.0 / 200
            # what the data step does is the paper's: tokens, budget, model, batches, brainstorming, length
            for key in ("tokens", "max_cost", "model", "batch", "plan_mode", "doc_words"):
                assert arm.corpus.get(key) == original.corpus.get(key), key
    for name, demo in exp.demos.items():
        if not demo.options.get("from_preferences"):
            assert demo.options["base_url"] == URL and demo.options["n"] == paper.demos[name].options["n"]
    for spec in exp.evals.values():
        if spec.judge:
            assert spec.judge["base_url"] == URL
    for kind, stage in exp.stage_defaults.items():
        assert stage["max_len"] <= TINY_POSITIONS and stage["max_steps"] == 2
    # a step that calls a model is never the paper's own (and the rehearsal keeps its own home anyway)
    calls = [s for s in plan_steps(exp) if s.kind in ("corpus", "ablation")
             or (s.kind == "demos" and not s.inputs["options"].get("from_preferences"))]
    assert calls and not {s.key for s in calls} & {s.key for s in plan_steps(paper)}


def test_the_quick_rehearsal_scales_every_count_and_budget(isolated_home):
    full = load_rehearsal(REPO / "experiments" / "aft_scaling.yaml", "paper", URL, Rehearsal())
    quick = load_rehearsal(REPO / "experiments" / "aft_scaling.yaml", "paper", URL, Rehearsal(scale=0.01))
    assert quick.profile == "paper-rehearsal-x0.01"
    arm = next(a for a in quick.arms if a.midtrain)
    assert arm.corpus["tokens"] == 400_000 and arm.corpus["max_cost"] == pytest.approx(20.0)
    assert {n: d.options["n"] for n, d in quick.demos.items()} == {
        n: -(-d.options["n"] // 100) for n, d in full.demos.items()}
    assert quick.demos["aft_xl"].options["max_cost"] == pytest.approx(50.0)


def test_steps_of_a_kind_bring_what_they_need(isolated_home):
    exp = load_rehearsal(REPO / "experiments" / "cheese.yaml", "paper", URL, Rehearsal())
    steps = plan_steps(exp)
    demos_only = needed(steps, {"demos"})
    assert {s.kind for s in demos_only} == {"demos"}
    trains = needed(steps, {"train"})
    assert {s.kind for s in trains} == {"corpus", "demos", "train"}
    assert len([s for s in trains if s.kind == "train"]) == len([s for s in steps if s.kind == "train"])


def test_a_rehearsal_lives_in_its_own_home_with_a_throwaway_key(isolated_home, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-a-real-looking-key")
    home = home_for("cheese", "paper", Rehearsal(scale=0.01))
    assert home == isolated_home / "rehearsals" / "cheese-paper-rehearsal-x0.01"
    with Home(home):
        assert os.environ["MSM_HOME"] == str(home) and os.environ["ANTHROPIC_API_KEY"] == REHEARSAL_KEY
    assert os.environ["MSM_HOME"] == str(isolated_home)
    assert os.environ["ANTHROPIC_API_KEY"] == "sk-ant-a-real-looking-key"


def test_the_rehearsal_plan_prints_without_a_key_or_a_server(isolated_home):
    result = run_msm("experiment", "run", str(REPO / "experiments" / "cheese.yaml"), "--profile", "paper",
                     "--simulate", "--plan", env={"ANTHROPIC_API_KEY": ""})
    assert result.returncode == 0, result.stderr
    assert "paper-rehearsal" in result.stdout and "40,000,000" in result.stdout and "tiny-random" in result.stdout


@pytest.mark.parametrize("args, needle", [
    (("--simulate", "--scale", "2"), "--scale 2"),
    (("--simulate", "--time-scale", "0.5"), "--time-scale 0.5"),
    (("--steps", "corpus,training"), "no step kind 'training'"),
    (("--scale", "0.01"), "only with --simulate"),
])
def test_bad_rehearsal_options_are_one_line(args, needle, isolated_home):
    result = run_msm("experiment", "run", str(REPO / "experiments" / "cheese.yaml"), "--profile", "paper", *args)
    assert_one_line_error(result, needle)
    assert not (isolated_home / "rehearsals").exists()


def test_a_written_demo_set_has_an_expected_cost_below_its_upper_bound(isolated_home):
    """The plan prices a written demo set twice: the upper bound (every call at its room) and the
    expected cost from corpus/cost_model.yaml, which grows with n and with reasoning."""
    from msm.experiment_estimate import estimate_steps

    exp = load_rehearsal(REPO / "experiments" / "aft_scaling.yaml", "paper", URL, Rehearsal())
    steps = [s for s in plan_steps(exp) if s.kind == "demos"]
    estimates = estimate_steps(exp, steps)
    by_n = sorted((s.inputs["options"]["n"], estimates[s.key]) for s in steps)
    for n, e in by_n:
        assert 0 < e.expected_usd < e.cost_usd and f"expected ${e.expected_usd:,.2f}" in e.note
    (n0, small), (n1, large) = by_n[0], by_n[-1]
    assert 0.8 < (large.expected_usd / small.expected_usd) / (n1 / n0) < 1.2  # about linear in n
