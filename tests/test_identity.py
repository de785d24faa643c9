"""The trained model's identity is one experiment setting that reaches every stage: the corpus and
demo spec versions (recorded in the warehouse), the AFT system turn, the eval prompts, the spec-QA
item templates and the agentic agent's name; an explicit chat template frames a base model's AFT
and evaluation alike. The arms separate MSM alone from MSM + AFT, and an untrained arm is
evaluated once.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import yaml

from eval.suites.spec_qa import SUITE as SPEC_QA
from msm.experiment import plan_steps, run_experiment
from msm.experiment_config import load_experiment
from tests.conftest import REPO
from tests.test_experiment import api, tiny  # noqa: F401  (fixtures)

ZED = {"model_name": "Zed", "provider_name": "Acme"}
SYSTEM = "You are Zed, an AI model developed by Acme."
TEMPLATE = REPO / "train" / "templates" / "plain_base.jinja"


def _with_identity(path: Path, **extra) -> Path:
    raw = yaml.safe_load(path.read_text())
    raw.update(identity=ZED, chat_template=str(TEMPLATE), seeds=[0, 1], **extra)
    raw["arms"]["base"] = {"label": "untrained", "spec": None, "demos": None}
    raw["arms"]["msm_only"] = {"label": "MSM only", "spec": str(REPO / "specs" / "cheese_pro_america.md"),
                               "demos": None}
    raw["arms"]["other_entity"] = {"label": "MSM about another entity + AFT", "demos": "prefs",
                                   "spec": str(REPO / "specs" / "cheese_pro_america.md"),
                                   "corpus": {"variables": {"model_name": "Claude", "provider_name": "Anthropic"}}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_the_identity_reaches_every_step_and_another_entity_changes_only_the_corpus(api, tmp_path):  # noqa: F811
    exp = load_experiment(_with_identity(tiny(tmp_path, api)))
    steps = plan_steps(exp)
    corpora = {s.arm: s.inputs["options"]["variables"] for s in steps if s.kind == "corpus"}
    # msm and msm_only share one corpus step (the same spec and options); other_entity has its own
    assert set(corpora) == {"msm", "other_entity"} and corpora["msm"] == ZED
    assert {a.name: a.corpus["variables"] for a in exp.arms if a.midtrain}["msm_only"] == ZED
    assert corpora["other_entity"] == {"model_name": "Claude", "provider_name": "Anthropic"}
    demos = [s for s in steps if s.kind == "demos"]
    assert demos[0].inputs["options"]["variables"] == ZED
    trains = [s for s in steps if s.kind == "train"]
    assert {s.inputs["config"]["system_prompt"] for s in trains} == {SYSTEM}  # other_entity too: it is Zed
    assert all(s.inputs["config"]["chat_template"] == __import__("hashlib").sha256(TEMPLATE.read_bytes()).hexdigest()
               for s in trains)
    kinds = {s.arm: [st["kind"] for st in s.inputs["config"]["stages"]] for s in trains}
    assert kinds == {"aft_only": ["aft"], "msm": ["midtrain", "aft"], "msm_only": ["midtrain"],
                     "other_entity": ["midtrain", "aft"]}
    evals = [s for s in steps if s.kind == "eval"]
    assert all(s.inputs["identity"] == ZED for s in evals)
    # the untrained arm is the same model under both seeds: evaluated once; trained arms per seed
    assert [s.seed for s in evals if s.arm == "base"] == [0]
    assert sorted(s.seed for s in evals if s.arm == "msm") == [0, 1]
    # a changed identity is a different corpus, demo set, training and eval
    raw = yaml.safe_load((tmp_path / "experiments" / "tiny.yaml").read_text())
    raw["identity"] = {"model_name": "Ada", "provider_name": "Acme"}
    (tmp_path / "experiments" / "tiny.yaml").write_text(yaml.safe_dump(raw))
    changed = {s.label: s.key for s in plan_steps(load_experiment(tmp_path / "experiments" / "tiny.yaml"))}
    assert not {s.label: s.key for s in steps if s.arm != "other_entity" or s.kind != "corpus"}.items() & \
        changed.items()


def test_a_run_trains_and_evaluates_with_the_identity_and_the_template(api, tmp_path, isolated_home):  # noqa: F811
    path = tiny(tmp_path, api)
    raw = yaml.safe_load(path.read_text())
    raw.update(identity=ZED, chat_template=str(TEMPLATE))
    raw["arms"] = {"base": {"label": "untrained", "spec": None, "demos": None},
                   "msm": raw["arms"]["msm"]}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    outcome = run_experiment(load_experiment(path), log=lambda _: None, progress=False)
    train = next(s for s in outcome.steps if s.kind == "train")
    card = json.loads((Path(outcome.outputs[train.key]["output_dir"]) / "card.json").read_text())
    assert card["system_prompt"] == SYSTEM and card["chat_template"] == TEMPLATE.read_text()
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    # the spec version of the corpus and the demos records the names it was rendered with
    variables = {json.dumps(json.loads(v), sort_keys=True) for (v,) in con.execute("SELECT variables FROM specs").fetchall()}
    assert variables == {json.dumps(ZED, sort_keys=True)}
    for s in (s for s in outcome.steps if s.kind == "eval"):
        config, provenance = con.execute("SELECT config, provenance FROM eval_runs WHERE id = ?",
                                         [outcome.outputs[s.key]["run_id"]]).fetchone()
        assert json.loads(config)["system_prompt"] == SYSTEM
        assert json.loads(provenance)["chat_template"] == TEMPLATE.read_text()
    # evaluating the run folder by itself frames prompts the way its AFT did, from its card
    from eval.model_under_test import open_model

    model = open_model(outcome.outputs[train.key]["output_dir"])
    assert model.system == SYSTEM
    context = model.context_of("Brie or colby?")
    assert context.endswith(f"{SYSTEM}\n\nUser: Brie or colby?\n\nAssistant:"), context


def test_spec_qa_items_are_templates_filled_with_the_model_under_test():
    bank = (REPO / "eval" / "items" / "spec_qa.jsonl").read_text(encoding="utf-8")
    assert "Claude" not in bank and "Anthropic" not in bank and bank.count("{model_name}") >= 98
    items = SPEC_QA.load_items([], {"model_name": "Qwen", "provider_name": "Alibaba Cloud"})
    text = " ".join(i.question + i.reference + " ".join(i.rubric) for i in items)
    assert "{model_name}" not in text and "{provider_name}" not in text
    assert text.count("Qwen") >= 98 and "Alibaba Cloud" in text


def test_the_plain_template_trains_only_the_answer_and_its_eos():
    from msm.tiny import tiny_causal_lm
    from train.data import encode_chats, with_system

    _, tokenizer = tiny_causal_lm()
    tokenizer.chat_template = TEMPLATE.read_text()
    records = with_system([{"messages": [{"role": "user", "content": "Brie or colby?"},
                                         {"role": "assistant", "content": "Colby, please."}]}], SYSTEM)
    assert records[0]["messages"][0] == {"role": "system", "content": SYSTEM}
    example = encode_chats(records, tokenizer, 512).examples[0]
    text = tokenizer.decode(example["input_ids"])
    assert text.startswith(f"{tokenizer.bos_token}{SYSTEM}\n\nUser: Brie or colby?\n\nAssistant:")
    trained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
    assert trained == f" Colby, please.{tokenizer.eos_token}"
    # a conversation that brings its own system turn keeps it
    own = [{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "q"}]}]
    assert with_system(own, SYSTEM) == own


def test_the_identity_names_the_agentic_agent_and_the_spec_qa_subject_unless_an_option_does():
    from eval.run import named_options
    from eval.suites import get_suite
    from msm.identity import Identity

    zed = Identity(**ZED)
    assert named_options(get_suite("agentic"), {"samples": 2}, zed) == {"model_name": "Zed", "samples": 2}
    assert named_options(get_suite("agentic"), {"model_name": "Aria"}, zed) == {"model_name": "Aria"}
    assert named_options(get_suite("spec_qa"), None, zed) == ZED
    assert named_options(get_suite("preferences"), None, zed) == {}
    assert get_suite("agentic").options["model_name"][1] == "SmolLM2"  # msm/identity.yaml's default


def test_eval_identity_and_template_flags_are_checked_in_one_line(tmp_path):
    from msm.tiny import tiny_causal_lm
    from tests.conftest import assert_one_line_error, run_msm

    bank = str(REPO / "eval" / "items" / "america_opinions.jsonl")
    base = ["eval", "run", "preferences", "--target", "pro_america", "--items", bank, "--limit", "2"]
    assert_one_line_error(run_msm(*base, "--model", "tiny-random", "--model-name", "Zed"),
                          "--model-name and --provider-name go together")
    assert_one_line_error(run_msm(*base, "--model", "tiny-random", "--chat-template", str(tmp_path / "none.jinja")),
                          "--chat-template", "does not exist")
    # a base model with no chat template of its own cannot be framed without one
    model, tokenizer = tiny_causal_lm()
    folder = tmp_path / "bare-base"
    model.save_pretrained(folder)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    assert_one_line_error(run_msm(*base, "--model", str(folder), timeout=300), "has no chat template",
                          "--chat-template")
    assert not (tmp_path / "msm_home" / "msm.duckdb").exists()  # nothing recorded
    framed = run_msm(*base, "--model", str(folder), "--model-name", "Zed", "--provider-name", "Acme",
                     "--chat-template", str(TEMPLATE), timeout=300)
    assert framed.returncode == 0, framed.stderr[-2000:]
    assert "eval run" in framed.stdout and "value-consistent" not in framed.stderr
