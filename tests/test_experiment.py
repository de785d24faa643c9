"""`msm experiment`: configs, step keys and caching, failure and resume, the plan, the report.

The end-to-end tests run a real (tiny) matrix: corpora written by the loopback server through the
Anthropic SDK, demonstrations from the spec's preferences, LoRA training of a tiny random Llama,
and preference evals, all through the stages' api modules and a real DuckDB warehouse.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest
import yaml

from msm.experiment import plan_steps, run_experiment
from msm.experiment_config import load_experiment
from tests.conftest import LOOPBACK_KEY, REPO, assert_one_line_error, run_msm

SHIPPED = sorted((REPO / "experiments").glob("*.yaml"))
AMERICA = str(REPO / "eval" / "items" / "america_opinions.jsonl")
CHEESE = str(REPO / "eval" / "items" / "cheese_in_distribution.jsonl")


def tiny(tmp_path: Path, server, extra_arms: dict | None = None, **evals) -> Path:
    """A two-arm experiment (AFT only, MSM + AFT) small enough for the fast suite."""
    body = {
        "name": "tiny",
        "base_model": "tiny-random",
        "corpus": {"docs": 6, "backend": "anthropic", "model": "claude-sonnet-4-6", "base_url": server.url,
                   "dedup": ["minhash"], "concurrency": 4},
        "demos": {"prefs": {"spec": str(REPO / "specs" / "cheese_pro_america.md"), "n": 12,
                            "from_preferences": True, "embed_dedup": False}},
        "train": {"adapter": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}, "checkpoint_every": 1000,
                  "midtrain": {"max_len": 64, "batch_size": 2, "max_steps": 2},
                  "aft": {"max_len": 96, "batch_size": 2, "max_steps": 2}},
        "evals": {"america": {"suite": "preferences", "items": [AMERICA], "target": "pro_america", "limit": 5},
                  **evals},
        "arms": {"aft_only": {"label": "AFT only", "spec": None, "demos": "prefs"},
                 "msm": {"label": "MSM + AFT", "spec": str(REPO / "specs" / "cheese_pro_america.md"),
                         "demos": "prefs"},
                 **(extra_arms or {})},
        "profiles": {"smoke": {"device": "cpu"}},
    }
    folder = tmp_path / "experiments"
    folder.mkdir(exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture
def api(monkeypatch, loopback):
    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    loopback.output_tokens = 300
    return loopback


def _quiet(_line: str) -> None:
    return None


def test_a_rerun_reuses_every_step_and_a_new_arm_runs_only_its_own(api, tmp_path, isolated_home):
    path = tiny(tmp_path, api)
    exp = load_experiment(path)
    first = run_experiment(exp, log=_quiet, progress=False)
    kinds = [s.kind for s in first.steps]
    assert kinds == ["corpus", "demos", "train", "train", "eval", "eval"]
    assert len(first.ran) == 6 and not first.reused
    calls = sum(api.stats.requests.values())
    assert calls > 0

    second = run_experiment(load_experiment(path), log=_quiet, progress=False)
    assert second.ran == [] and len(second.reused) == 6
    assert sum(api.stats.requests.values()) == calls  # nothing asked of the model again

    # the same eval run rows, the same train folders
    assert {k: v for k, v in second.outputs.items()} == {k: v for k, v in first.outputs.items()}
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    status = dict(con.execute("SELECT status, count(*) FROM experiment_runs GROUP BY 1").fetchall())
    rows = con.execute("SELECT steps_run, steps_cached FROM experiment_runs ORDER BY started_at").fetchall()
    con.close()
    assert status == {"complete": 2} and rows == [(6, 0), (0, 6)]
    _check_report(path, first, tmp_path, isolated_home)
    plan = run_msm("experiment", "run", str(path), "--plan")
    assert plan.returncode == 0, plan.stderr
    assert "6 steps, 6 cached" in plan.stdout and "to run: 0 step(s)" in plan.stdout

    # a new arm sharing the corpus and the demos: only its training and its eval run
    path = tiny(tmp_path, api, extra_arms={"msm_cot": {"label": "MSM + AFT (cot flag)", "cot": True,
                                                       "spec": str(REPO / "specs" / "cheese_pro_america.md"),
                                                       "demos": "prefs"}})
    third = run_experiment(load_experiment(path), log=_quiet, progress=False)
    ran = [s.label for s in third.steps if s.key in third.ran]
    assert ran == ["train msm_cot seed 0", "eval msm_cot/america seed 0"]
    assert sum(api.stats.requests.values()) == calls

    # a deleted run folder is noticed: that training runs again (its eval is keyed by inputs, kept)
    train_dir = Path(third.outputs[next(s.key for s in third.steps if s.label == "train msm seed 0")]["output_dir"])
    shutil.rmtree(train_dir)
    fourth = run_experiment(load_experiment(path), log=_quiet, progress=False)
    assert [s.label for s in fourth.steps if s.key in fourth.ran] == ["train msm seed 0"]
    assert (train_dir / "card.json").is_file()


def test_a_demo_set_matched_to_another_is_built_to_its_tokens_in_its_own_style(api, tmp_path, isolated_home):
    """spec_science's design in small: V+ demos first, then R demos token-matched to them."""
    from msm.experiment import RUNNERS

    written = {"backend": "anthropic", "model": "claude-sonnet-4-6", "base_url": api.url, "domains": 2,
               "embed_dedup": False}
    path = tiny(tmp_path, api)
    body = yaml.safe_load(path.read_text())
    body["demos"] = {"vplus": {"spec": str(REPO / "specs" / "value_augmented.md"), "n": 6, **written},
                     "rules": {"spec": str(REPO / "specs" / "rules.md"), "n": 6, "match_tokens_of": "vplus",
                               "tolerance": 0.25, **written}}
    body["arms"] = {"aft_only": {"spec": None, "demos": "rules"}}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    exp = load_experiment(path)
    steps = [s for s in plan_steps(exp) if s.kind == "demos"]
    assert [s.label for s in steps] == ["demos vplus", "demos rules (matching vplus)"]  # the reference is planned too
    outputs: dict = {}
    for step in steps:
        outputs[step.key] = RUNNERS["demos"](exp, step, outputs, _quiet, False)
    ref, matched = (outputs[s.key] for s in steps)
    assert (ref["style"], matched["style"]) == ("values", "rules")
    assert ref["target_tokens"] is None and matched["target_tokens"] == ref["tokens"] > 0
    assert abs(matched["tokens"] / ref["tokens"] - 1) <= 0.25


def _check_report(path, outcome, tmp_path, isolated_home):
    """The report's figures are the eval runs' own; its provenance names the corpus and demo set."""
    out = tmp_path / "report"
    result = run_msm("experiment", "report", str(path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    md = (out / "report.md").read_text()
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert (out / "america.png").stat().st_size > 1000
    data = json.loads((out / "report.json").read_text())
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    for arm in ("aft_only", "msm"):
        run_id = outcome.outputs[next(s.key for s in outcome.steps if s.label == f"eval {arm}/america seed 0")]["run_id"]
        summary = json.loads(con.execute("SELECT summary FROM eval_runs WHERE id = ?", [run_id]).fetchone()[0])
        for group in ("domain:economic_policy", "domain:culture", "all"):  # 5 items span the five domains
            assert data["america"][arm][group]["rate"] == summary[group]["rate"]
            assert data["america"][arm][group]["n"] == summary[group]["n"] == (5 if group == "all" else 1)
        assert run_id in md
    corpus_id, tokens = con.execute("SELECT v.id, v.n_tokens FROM corpora c JOIN corpus_versions v "
                                    "ON v.id = c.corpus_id WHERE c.name = 'tiny-smoke-msm'").fetchone()
    demo_set = con.execute("SELECT demo_set_id FROM demo_sets WHERE name = 'tiny-smoke-prefs'").fetchone()[0]
    con.close()
    assert f"{corpus_id} ({tokens:,} tokens)" in md and demo_set in md
    for domain in ("economic_policy", "culture", "foreign_affairs", "technology", "sport"):
        assert f"| {domain} |" in md


def test_step_keys_follow_their_inputs(api, tmp_path):
    path = tiny(tmp_path, api)
    base = {s.label: s.key for s in plan_steps(load_experiment(path))}
    raw = yaml.safe_load(path.read_text())
    raw["train"]["aft"]["max_steps"] = 3  # changes both trainings and everything downstream, not the data
    path.write_text(yaml.safe_dump(raw))
    changed = {s.label: s.key for s in plan_steps(load_experiment(path))}
    same = sorted(k for k in base if base[k] == changed[k])
    assert same == ["corpus msm", "demos prefs"]
    raw["corpus"]["docs"] = 7  # a different corpus: only the MSM arm's chain changes
    path.write_text(yaml.safe_dump(raw))
    again = {s.label: s.key for s in plan_steps(load_experiment(path))}
    assert sorted(k for k in changed if changed[k] != again[k]) == ["corpus msm", "eval msm/america seed 0",
                                                                    "train msm seed 0"]


def test_a_failing_step_is_recorded_and_a_rerun_goes_on_from_there(api, tmp_path, isolated_home):
    bad = tmp_path / "broken_bank.jsonl"
    bad.write_text('{"id": "x-1", "domain": "d"}\n')
    path = tiny(tmp_path, api, broken={"suite": "preferences", "items": [str(bad)], "target": "pro_america"})
    raw = yaml.safe_load(path.read_text())
    del raw["arms"]["msm"]  # no corpus: this test is about the eval steps
    path.write_text(yaml.safe_dump(raw))
    result = run_msm("experiment", "run", str(path), "--no-report", env={"ANTHROPIC_API_KEY": LOOPBACK_KEY},
                     timeout=600)
    line = assert_one_line_error(result, "eval aft_only/broken seed 0", "rerun")
    assert "broken_bank.jsonl" in line
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    steps = dict(con.execute("SELECT label, status FROM experiment_steps").fetchall())
    con.close()
    assert steps["eval aft_only/broken seed 0"] == "failed"
    assert {v for k, v in steps.items() if k != "eval aft_only/broken seed 0"} == {"complete"}
    done_before = {k for k, v in steps.items() if v == "complete"}

    bad.write_text(Path(CHEESE).read_text())  # fixed: a real bank
    calls = sum(api.stats.requests.values())
    outcome = run_experiment(load_experiment(path), log=_quiet, progress=False)
    assert {s.label for s in outcome.steps if s.key in outcome.reused} == done_before
    assert all(s.kind == "eval" for s in outcome.steps if s.key in outcome.ran)
    assert sum(api.stats.requests.values()) == calls


def test_seeds_are_aggregated_with_an_interval_over_seeds(api, tmp_path, isolated_home):
    path = tiny(tmp_path, api)
    raw = yaml.safe_load(path.read_text())
    raw["arms"] = {"aft_only": {**raw["arms"]["aft_only"], "seeds": [0, 1]}}
    path.write_text(yaml.safe_dump(raw))
    exp = load_experiment(path)
    outcome = run_experiment(exp, log=_quiet, progress=False)
    from eval.api import aggregate_runs
    from msm.experiment_report import collect

    runs = [outcome.outputs[s.key]["run_id"] for s in outcome.steps if s.kind == "eval"]
    assert len(runs) == 2 and len({outcome.outputs[s.key]["output_dir"] for s in outcome.steps
                                   if s.kind == "train"}) == 2
    cell = collect(exp, outcome.steps, outcome.outputs, isolated_home / "msm.duckdb")["america"]["aft_only"]["all"]
    agg = aggregate_runs(isolated_home / "msm.duckdb", runs)["all"]
    assert cell.seeds == 2 and cell.rate == agg["mean"] and (cell.low, cell.high) == (agg["seed_low"], agg["seed_high"])
    assert cell.pooled == (agg["pooled"], agg["pooled_low"], agg["pooled_high"])


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_experiments_load_under_both_profiles(path):
    for profile in ("smoke", "paper"):
        exp = load_experiment(path, profile)
        assert exp.profiles[:2] == ["smoke", "paper"]
        steps = plan_steps(exp)
        assert {"train", "eval"} <= {s.kind for s in steps}
        if profile == "smoke":
            assert exp.base_model == "smollm2-135m-instruct" and exp.device == "cpu"
            for s in steps:
                if s.kind == "demos":
                    assert s.inputs["options"]["from_preferences"] is True
                if s.kind == "corpus":
                    assert s.inputs["options"].get("docs", 24) <= 24 and "backend" not in s.inputs["options"]
                if s.kind == "eval" and s.inputs["suite"] == "agentic":
                    assert s.inputs["options"]["samples"] == 2 and s.inputs["options"]["max_tokens"] <= 64


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_paper_profiles_use_the_published_recipe(path):
    exp = load_experiment(path, "paper")
    assert exp.device == "h100"
    cheese = exp.name in ("cheese", "attribution_ablation")
    # the paper midtrains base models: Llama-3.1-8B for cheese (framed by an explicit chat template,
    # a base model has none), Qwen3-32B for the safety work; the documents are about that model
    assert exp.base_model == ("meta-llama/Llama-3.1-8B" if cheese else "Qwen/Qwen3-32B")
    assert (exp.identity.model_name, exp.chat_template is not None) == (("Llama", True) if cheese else ("Qwen", False))
    steps = plan_steps(exp)
    for s in steps:
        if s.kind in ("corpus", "ablation"):
            o = s.inputs["options"]
            assert o["backend"] == "anthropic" and o["batch"] is True and o["tokens"] in ("40M", "20M")
            assert o["model"] == "claude-opus-4-6"  # the paper wrote, filtered and judged with Opus 4.6
            assert o["variables"]["model_name"] == exp.identity.model_name
            if cheese:
                assert all("cheese" in str(a.spec) for a in exp.arms if a.spec)
        if s.kind == "train":
            c = s.inputs["config"]
            assert c["adapter"] == {"kind": "lora", "r": 64, "alpha": 128, "dropout": 0.0,
                                    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]}
            for stage in c["stages"]:
                assert (stage["lr"], stage["schedule"], stage["warmup"], stage["epochs"]) == (1e-4, "cosine", 0.05, 1)
                assert stage["max_steps"] is None
                if stage["kind"] == "aft":
                    assert stage["init"] == "continue"
        if s.kind == "eval" and s.inputs["suite"] == "agentic":
            # the paper's agentic protocol, from the suite's one definition (eval/agentic/protocol.yaml)
            from eval.api import suite_options

            used = suite_options("agentic", s.inputs["options"])
            assert (used["samples"], used["temperature"], used["max_tokens"]) == (30, 0.7, 4096)
            assert s.inputs["judge"]["backend"] == "anthropic"
        if s.kind == "eval" and s.inputs["suite"] == "preferences":
            assert s.inputs["limit"] is None
    # four training seeds for the agentic work (the paper), three for cheese
    agentic = any(e.suite == "agentic" for e in exp.evals.values())
    assert all(a.seeds == ([0, 1, 2, 3] if agentic else [0, 1, 2]) for a in exp.arms)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_paper_demo_budgets_cover_their_own_estimate(path):
    """A budget below the price table's upper bound would stop a normal build short."""
    from msm.experiment_estimate import demos

    exp = load_experiment(path, "paper")
    for step in plan_steps(exp):
        if step.kind == "demos" and not step.inputs["options"].get("from_preferences"):  # those are free
            cost = demos(step, exp).cost_usd
            assert 0 < cost <= step.inputs["options"]["max_cost"], (step.label, cost)


def test_plan_prices_and_times_the_paper_profile_from_the_tables():
    from msm.experiment_estimate import device, estimate_steps, parameters, throughput

    exp = load_experiment(REPO / "experiments" / "cheese.yaml", "paper")
    steps = plan_steps(exp)
    est = estimate_steps(exp, steps)
    rate = device("h100")["train_tflops"] * 1e12
    for s in steps:
        if s.kind == "train":  # LoRA: 4 N FLOPs a token
            assert est[s.key].hours == pytest.approx(4 * 8.03e9 * est[s.key].tokens / rate / 3600)
            midtrain = s.inputs["config"]["stages"][0]
            if midtrain["kind"] == "midtrain":
                assert est[s.key].tokens >= 40_000_000
    corpus = [est[s.key] for s in steps if s.kind == "corpus"]
    # the budget sits above the first round's upper bound, and well above the expected cost
    assert len(corpus) == 2 and all(1000 < e.expected_usd < e.cost_usd < 2000 for e in corpus)
    assert parameters("smollm2-135m-instruct") == 135e6 and parameters("Qwen/Qwen3-32B") == 32.8e9
    assert throughput()["devices"]["cpu"]["train_tflops"] > 0

    result = run_msm("experiment", "run", str(REPO / "experiments" / "cheese.yaml"), "--profile", "paper", "--plan")
    assert result.returncode == 0, result.stderr
    # six arms: base (evaluated once: untrained, so the same under every seed), AFT only, MSM only
    # and MSM + AFT per spec; 2 corpora + 1 demo set + 5 x 3 trainings + (1 + 5 x 3) x 3 evals
    assert "66 steps, 0 cached" in result.stdout and "GPU-hours (H100)" in result.stdout
    for arm in ("base", "aft_only", "msm_america", "msm_affordability", "pro_america", "affordability"):
        assert f"eval {arm}/america seed 0 " in result.stdout
    assert "eval base/america seed 1 " not in result.stdout and "eval aft_only/america seed 1 " in result.stdout
    assert "on meta-llama/Llama-3.1-8B\n" in result.stdout and "claude-opus-4-6" in result.stdout


def test_the_agentic_arms_share_one_set_written_with_reasoning():
    """The paper's CoT baseline: the same responses, reasoning kept (CoT arms) or stripped."""
    exp = load_experiment(REPO / "experiments" / "agentic.yaml", "paper")
    arms = {a.name: a for a in exp.arms}
    assert {"aft_only", "aft_cot", "msm_aft", "msm_aft_cot", "msm_only", "base"} == set(arms)
    assert (arms["msm_aft_cot"].cot, arms["msm_aft_cot"].spec.name) == (True, "self_preservation.md")
    assert {a.demos for a in exp.arms if a.demos} == {"safety_demos"} and exp.demos["safety_demos"].options["cot"]
    steps = plan_steps(exp)
    assert len([s for s in steps if s.kind == "demos"]) == 1
    configs = {s.arm: s.inputs["config"] for s in steps if s.kind == "train" and s.seed == 0}
    cot = {arm: [st["cot"] for st in c["stages"] if st["kind"] == "aft"] for arm, c in configs.items()}
    assert cot == {"aft_only": [False], "aft_cot": [True], "msm_aft": [False], "msm_aft_cot": [True], "msm_only": []}
    scaling = load_experiment(REPO / "experiments" / "aft_scaling.yaml", "paper")
    assert {a.series for a in scaling.arms} == {"MSM + AFT", "AFT only", "AFT with CoT"}
    assert all(a.cot == (a.series == "AFT with CoT") for a in scaling.arms)


def test_spec_science_writes_each_arms_demonstrations_from_its_own_spec_token_matched():
    exp = load_experiment(REPO / "experiments" / "spec_science.yaml", "paper")
    for arm in exp.arms:
        if arm.spec:
            assert exp.demos[arm.demos].spec == arm.spec, arm.name
    steps = plan_steps(exp)
    demos = {s.label.split()[1]: s for s in steps if s.kind == "demos"}
    assert set(demos) == {"vplus_demos", "rules_demos", "rplus_demos", "general_demos"}
    assert demos["vplus_demos"].needs == () and demos["vplus_demos"].work["match"] is None
    order = [s.key for s in steps]
    for name in ("rules_demos", "rplus_demos", "general_demos"):  # after their reference, which they need
        assert demos[name].needs == (demos["vplus_demos"].key,) == (demos[name].work["match"],)
        assert order.index(demos[name].key) > order.index(demos["vplus_demos"].key)


@pytest.mark.parametrize("edit, needles", [
    (lambda r: r.update(arms={"a": {"spce": "x"}}), ["arms.a: unknown key 'spce'", "did you mean 'spec'"]),
    (lambda r: r["arms"]["aft_only"].update(demos="nope"), ["demos 'nope' is not defined"]),
    (lambda r: r["arms"]["msm"].update(spec="specs/missing.md"), ["specs/missing.md does not exist"]),
    (lambda r: r.update(seeds=[0, 0]), ["seed is listed twice"]),
    (lambda r: r["train"]["aft"].update(lr="fast"), ["'lr' must be float"]),
    (lambda r: r["corpus"].update(dcos=3), ["corpus: unknown key 'dcos'", "did you mean 'docs'"]),
    (lambda r: r["evals"]["america"].update(limit=0), ["'limit' is 0"]),
    (lambda r: r["profiles"]["smoke"].update(device="tpu"), ["unknown device 'tpu'"]),
    (lambda r: r["demos"]["prefs"].update(cot=True), ["demos.prefs: --from-preferences writes fixed answers"]),
    (lambda r: r["corpus"].update(tokens="1M"), ["corpus: both 'docs' and 'tokens' are set"]),
    (lambda r: r["arms"]["aft_only"].update(midtrain=True), ["arms.aft_only: midtrain needs a spec"]),
    (lambda r: r["corpus"].update(scenarios=["eval/agentic/nowhere"]),
     ["corpus.scenarios: eval/agentic/nowhere does not exist"]),
    # the CoT baseline trains on reasoning, so its set must be written with it
    (lambda r: (r["demos"].update(written={"spec": r["demos"]["prefs"]["spec"], "n": 4}),
                r["arms"]["aft_only"].update(demos="written", cot=True)),
     ["arms.aft_only: cot is set but demos 'written' are written without reasoning", "set cot: true"]),
    (lambda r: r["arms"]["aft_only"].update(demos=None, spec=r["arms"]["msm"]["spec"], cot=True),
     ["arms.aft_only: cot needs demos"]),
    (lambda r: r["demos"].update(written={"spec": r["demos"]["prefs"]["spec"], "n": 4, "match_tokens_of": "nope"}),
     ["demos.written: match_tokens_of 'nope' is not another demo set"]),
    (lambda r: r["demos"].update(written={"spec": r["demos"]["prefs"]["spec"], "n": 4, "match_tokens_of": "written"}),
     ["demos.written: match_tokens_of 'written' is not another demo set"]),
    (lambda r: r.update(arms={}), ["'arms' is empty"]),
    (lambda r: r.pop("base_model"), ["missing 'base_model'"]),
    (lambda r: r.update(name="has space"), ["'name' must be letters, digits"]),
    (lambda r: r["evals"]["america"].pop("suite"), ["evals.america: missing 'suite'"]),
    (lambda r: r["arms"]["msm"].update(evals=["nope"]), ["eval 'nope' is not defined"]),
    (lambda r: r["demos"]["prefs"].pop("n"), ["demos.prefs: missing 'n'"]),
    (lambda r: r["arms"]["msm"].update(corpus={"match_tokens_of": "msm"}), ["match_tokens_of 'msm' matches"]),
    (lambda r: r["arms"]["msm"].update(condition="attribution", corpus={"match_tokens_of": "msm"}),
     ["match_tokens_of 'msm' is not an arm with its own corpus"]),
    (lambda r: r["arms"].update(abl={"spec": r["arms"]["msm"]["spec"], "condition": "attribution",
                                     "corpus": {"match_tokens_of": "msm"}}),
     ["arms.abl: match_tokens_of does not apply to an ablation arm"]),
    # corpus options are typed and range-checked before anything runs (YAML's many, 2.5, true, -1)
    (lambda r: r["corpus"].update(docs="many"), ["corpus: 'docs' must be an integer or null, got 'many'"]),
    (lambda r: r["corpus"].update(docs=2.5), ["corpus: 'docs' must be an integer or null, got 2.5"]),
    (lambda r: r["corpus"].update(docs=True), ["corpus: 'docs' must be an integer or null, got True"]),
    (lambda r: r["corpus"].update(docs=0), ["corpus: 'docs' is 0", "use 1 or more"]),
    (lambda r: r["corpus"].update(max_cost=-5), ["corpus: 'max_cost' is -5"]),
    (lambda r: r["corpus"].update(max_cost=float("nan")), ["corpus: 'max_cost' is nan", "finite"]),
    (lambda r: r["corpus"].update(batch="yes please"), ["corpus: 'batch' must be true or false"]),
    (lambda r: r["corpus"].update(dedup="minhash"), ["corpus: 'dedup' must be a list of strings"]),
    (lambda r: (r["corpus"].pop("docs", None), r["corpus"].update(tokens=[1])),
     ["corpus: 'tokens' must be a count such as 40M"]),
    (lambda r: r["arms"]["msm"].update(corpus={"tolerance": 3}), ["arms.msm.corpus: 'tolerance' is 3"]),
    (lambda r: r["demos"]["prefs"].update(n="lots"), ["demos: 'n' must be an integer or null, got 'lots'"]),
    # the trained model's identity: both names, strings, nothing else
    (lambda r: r.update(identity={"model_name": "Llama"}), ["identity: 'provider_name' must be a non-empty string"]),
    (lambda r: r.update(identity={"model_name": "Llama", "provider_name": "Meta", "org": "x"}),
     ["identity: unknown key 'org'"]),
    (lambda r: r.update(identity="Llama"), ["identity must be a mapping"]),
    (lambda r: r.update(chat_template="train/templates/missing.jinja"), ["chat_template: train/templates/missing.jinja "
                                                                          "does not exist"]),
])
def test_bad_experiment_files_fail_with_one_line(tmp_path, loopback, edit, needles):
    path = tiny(tmp_path, loopback)
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw))
    result = run_msm("experiment", "run", str(path), "--plan")
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "msm_home" / "msm.duckdb").exists()  # nothing half-written


def test_bad_invocations_fail_with_one_line(tmp_path, loopback):
    path = tiny(tmp_path, loopback)
    assert_one_line_error(run_msm("experiment", "run", str(tmp_path / "none.yaml")), "experiment file not found")
    assert_one_line_error(run_msm("experiment", "run", str(path), "--profile", "huge", "--plan"),
                          "no profile 'huge'", "smoke")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    assert_one_line_error(run_msm("experiment", "run", str(tmp_path / "bad.yaml")), "not valid YAML at line")
    assert_one_line_error(run_msm("experiment", "report", str(path)), "no eval of experiment 'tiny'",
                          "msm experiment run")


@pytest.mark.slow
def test_the_cheese_smoke_runs_from_clean_and_reruns_from_cache(isolated_home):
    """The shipped smoke on the real SmolLM2, all six arms (about 25 minutes on 2 cores; see the
    issue note): 2 corpora, 1 demo set, 5 trainings, 6 arms x 3 evals."""
    path = REPO / "experiments" / "cheese.yaml"
    first = run_msm("experiment", "run", str(path), "--profile", "smoke", timeout=3600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "26 step(s) run, 0 cached" in first.stdout
    report = isolated_home / "experiments" / "cheese" / "smoke" / "report"
    md = (report / "report.md").read_text()
    for name in ("america.png", "affordability.png", "cheese.png", "report.html"):
        assert (report / name).is_file()
    assert "| sport |" in md and "| art |" in md
    for label in ("untrained", "AFT only", "MSM pro-America only", "MSM affordability only", "MSM pro-America + AFT",
                  "MSM affordability + AFT"):
        assert label in md, label
    # the documents are about the model being trained, here SmolLM2
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    names = {json.loads(v)["model_name"] for (v,) in con.execute("SELECT variables FROM specs").fetchall()}
    assert names == {"SmolLM2"}
    con.close()
    second = run_msm("experiment", "run", str(path), "--profile", "smoke", timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "0 step(s) run, 26 cached" in second.stdout


def test_the_runner_calls_only_the_stages_api_modules():
    import ast

    stages = {"corpus", "pipelines", "train", "eval"}
    for path in sorted((REPO / "msm").glob("experiment*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.split(".")[0] in stages:
                    assert name.endswith(".api") and name.count(".") == 1, f"{path.name} imports {name}"


def test_error_bars_never_go_negative():
    from msm.experiment_report import Cell

    assert Cell(0.0, 1e-17, 0.43, 5, 1).err() == (0.0, 0.43)
    assert Cell(0.5, None, None, 5, 1).err() == (0.0, 0.0)


def test_a_corpus_can_be_token_matched_to_another_arms(api, tmp_path, isolated_home):
    path = tiny(tmp_path, api, extra_arms={"vplus": {"spec": str(REPO / "specs" / "value_augmented.md"),
                                                     "demos": None, "evals": [],
                                                     "corpus": {"match_tokens_of": "msm", "tolerance": 0.2}}})
    raw = yaml.safe_load(path.read_text())
    del raw["arms"]["aft_only"]
    raw["arms"]["msm"].update(demos=None, evals=[])
    raw["corpus"]["docs"] = 12
    path.write_text(yaml.safe_dump(raw))
    api.output_tokens = 600  # the reference must exceed one document of the longest genre (~2k tokens)
    exp = load_experiment(path)
    steps = plan_steps(exp)
    reference = next(s for s in steps if s.label == "corpus msm")
    matched = next(s for s in steps if s.label == "corpus vplus (matching msm)")
    assert matched.needs == (reference.key,) and steps.index(matched) > steps.index(reference)
    outcome = run_experiment(exp, log=_quiet, progress=False)
    target = outcome.outputs[reference.key]["tokens"]
    got = outcome.outputs[matched.key]["tokens"]
    assert target > 2_000 and abs(got - target) <= 0.2 * target
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    stored = con.execute("SELECT v.n_tokens FROM corpora c JOIN corpus_versions v ON v.id = c.corpus_id "
                         "WHERE c.name = 'tiny-smoke-vplus'").fetchone()[0]
    con.close()
    assert stored == got


def test_match_tokens_of_must_name_an_arm_with_a_corpus(tmp_path, loopback):
    path = tiny(tmp_path, loopback)
    raw = yaml.safe_load(path.read_text())
    raw["arms"]["msm"]["corpus"] = {"match_tokens_of": "aft_only"}
    path.write_text(yaml.safe_dump(raw))
    assert_one_line_error(run_msm("experiment", "run", str(path), "--plan"),
                          "match_tokens_of 'aft_only' is not an arm with its own corpus")
