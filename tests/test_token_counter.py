"""Kept tokens counted with the trained model's tokenizer when it is here, else a stated fallback."""

from __future__ import annotations

import re

import duckdb
import pytest
import yaml

from msm.tokens import counter_for, counter_name, default_counter
from tests.conftest import LOOPBACK_KEY, REPO, run_msm

SPEC = REPO / "specs" / "value_augmented.md"


def _word_tokenizer(folder):
    """A tiny tokenizer (every word or punctuation mark is one token) saved as tokenizer.json."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def _words(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]+", text))


def test_a_missing_tokenizer_falls_back_to_smollm2s_and_says_so():
    base = default_counter()
    counter = counter_for("some-org/Missing-Model-8B")
    assert counter.name == f"{base.name} (fallback: some-org/Missing-Model-8B not available locally)"
    assert counter.count_many(["Three short words."]) == base.count_many(["Three short words."])
    assert counter_name("some-org/Missing-Model-8B") == counter.name
    assert counter_for(None).name == base.name == counter_name(None)


def test_a_local_tokenizer_directory_is_used(tmp_path):
    folder = _word_tokenizer(tmp_path / "tiny-tok")
    counter = counter_for(str(folder))
    assert counter.name == str(folder) == counter_name(str(folder))
    assert counter.count_many(["one two, three."]) == [5]


def test_a_tokenizer_in_the_hf_cache_is_found_offline(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    repo = hub / "models--some-org--Tiny-1B"
    _word_tokenizer(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    counter = counter_for("some-org/Tiny-1B")
    assert counter.name == "some-org/Tiny-1B" and counter.count_many(["a b c"]) == [3]


def test_builds_count_with_the_named_tokenizer_or_state_the_fallback(monkeypatch, loopback, tmp_path):
    from pipelines.build import BuildOptions, build_corpus

    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    loopback.output_tokens = 300
    folder = _word_tokenizer(tmp_path / "trained-model")

    def build(tokenizer, name):
        return build_corpus(str(SPEC), BuildOptions(docs=3, backend="anthropic", model="claude-sonnet-4-6",
                                                    base_url=loopback.url, progress=False, dedup=(),
                                                    tokenizer=tokenizer, name=name))

    here = build(str(folder), "here")
    missing = build("some-org/Missing-Model-8B", "missing")
    assert here.token_counter == str(folder) and "fallback: some-org/Missing-Model-8B" in missing.token_counter
    assert here.build_id != missing.build_id
    con = duckdb.connect(str(tmp_path / "msm_home" / "msm.duckdb"), read_only=True)
    docs = con.execute("SELECT text, n_tokens, token_counter FROM documents WHERE build_id = ? AND status = 'kept'",
                       [here.build_id]).fetchall()
    assert docs and all(n == _words(text) and counter == str(folder) for text, n, counter in docs)
    con.close()
    listed = run_msm("corpus", "list")
    assert listed.returncode == 0, listed.stderr
    lines = {ln.split()[0]: ln for ln in listed.stdout.splitlines()}
    assert f"tokens ({folder})" in lines["here"]
    assert "(fallback: some-org/Missing-Model-8B not available locally)" in lines["missing"]
    stats = run_msm("corpus", "stats", "missing")
    assert "tokens counted by" in stats.stdout
    assert "(fallback: some-org/Missing-Model-8B not available locally)" in stats.stdout


def test_the_experiment_plan_states_the_counter(loopback, tmp_path):
    from tests.test_experiment import tiny

    path = tiny(tmp_path, loopback)
    raw = yaml.safe_load(path.read_text())
    raw["corpus"]["tokenizer"] = "some-org/Missing-Model-8B"
    path.write_text(yaml.safe_dump(raw))
    plan = run_msm("experiment", "run", str(path), "--plan")
    assert plan.returncode == 0, plan.stderr
    corpus_line = next(ln for ln in plan.stdout.splitlines() if ln.startswith("corpus msm"))
    assert "tokens counted by" in corpus_line and "(fallback: some-org/Missing-Model-8B not available locally)" \
        in corpus_line


@pytest.mark.parametrize("name", ["cheese", "agentic"])
def test_paper_profiles_name_the_trained_models_tokenizer(name):
    from msm.experiment_config import load_experiment

    exp = load_experiment(REPO / "experiments" / f"{name}.yaml", "paper")
    assert all(a.corpus.get("tokenizer") == exp.base_model for a in exp.arms if a.midtrain)
