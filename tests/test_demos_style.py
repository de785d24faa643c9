"""AFT demonstrations per spec: response style from the spec, token matching across demo sets,
truncated answers counted at max_tokens 2,048, one CoT set with two exports that differ only in
the reasoning, and the reasoning rendered in the base model's thinking format for training."""

from __future__ import annotations

import json

import duckdb
import pytest

from corpus.demos import DemoOptions, build_demos
from msm.errors import MsmError
from tests.conftest import LOOPBACK_KEY, REPO

MODEL = "claude-sonnet-4-6"
VALUES_SPEC = str(REPO / "specs" / "self_preservation.md")
RULES_SPEC = """---
name: tiny-rules
model_name: Tiny
style: rules
---
# Rules for {model_name}

### R1. Ask before deleting files {#R1 kind=rule}

{model_name} asks the user before it deletes any file.
"""
RULE_CITED = "Under rule R1 I will ask you before deleting anything."


@pytest.fixture
def api(monkeypatch, loopback):
    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    loopback.judge_fail_rate = 0.0
    return loopback


def opts(server, **kw) -> DemoOptions:
    base = dict(n=4, backend="anthropic", model=MODEL, base_url=server.url, concurrency=8, domains=2,
                embed_dedup=False, decontaminate=False)
    base.update(kw)
    return DemoOptions(**base)


def rules_spec(tmp_path) -> str:
    path = tmp_path / "tiny_rules.md"
    path.write_text(RULES_SPEC)
    return str(path)


def msm_demos(*args: str):
    """`msm demos ARGS` in this process (the commands' own code, without a second interpreter's start)."""
    from click.testing import CliRunner

    from corpus.demos_cli import demos_group

    return CliRunner().invoke(demos_group, list(args), catch_exceptions=False)


def warehouse(home):
    return duckdb.connect(str(home / "msm.duckdb"), read_only=True)


def test_each_spec_gets_answers_in_its_own_style_and_the_set_records_it(api, isolated_home, tmp_path):
    # the stand-in model answers the rule-style prompt (and only it) with a rule citation
    api.planted = [(r"cite the rule that requires it", RULE_CITED)]
    rules = build_demos(rules_spec(tmp_path), opts(api, name="r"))
    values = build_demos(VALUES_SPEC, opts(api, name="v"))
    assert rules.style == "rules" and values.style == "values"
    assert rules.kept == 4 and all(d.response == RULE_CITED for d in rules.members)
    assert values.kept == 4 and not any(d.response == RULE_CITED for d in values.members)
    forced = build_demos(VALUES_SPEC, opts(api, n=2, name="forced", style="rules"))  # an override beats the spec
    assert forced.style == "rules" and all(d.response == RULE_CITED for d in forced.members)
    con = warehouse(isolated_home)
    styles = dict(con.execute("SELECT s.name, b.style FROM demo_sets s "
                              "JOIN demo_set_versions v ON v.id = s.demo_set_id "
                              "JOIN demo_builds b ON b.id = v.demo_build_id").fetchall())
    assert styles == {"r": "rules", "v": "values", "forced": "rules"}
    con.close()
    shown = msm_demos("show", "r", "--limit", "1")
    assert shown.exit_code == 0, shown.stderr
    assert "style: rules" in shown.stderr and "truncated: 0" in shown.stderr
    listed = msm_demos("list").stdout.splitlines()
    assert any(line.startswith("r ") and " rules " in line for line in listed)
    assert any(line.startswith("v ") and " values " in line for line in listed)


def test_a_set_matches_another_sets_tokens_deterministically(api, isolated_home, tmp_path):
    from msm.tokens import default_counter
    from warehouse.demos_store import export_demo_set

    reference = build_demos(VALUES_SPEC, opts(api, n=6, name="ref"))
    assert reference.tokens > 0 and reference.ratio is None
    api.output_tokens = 40  # the other spec's answers run shorter: more of them are needed
    matched = build_demos(rules_spec(tmp_path), opts(api, n=None, name="m", match_tokens_of="ref", tolerance=0.05))
    assert matched.target_tokens == reference.tokens and matched.stop == "target reached"
    assert abs(matched.tokens - reference.tokens) <= 0.05 * reference.tokens
    assert matched.ratio == pytest.approx(matched.tokens / reference.tokens)
    assert matched.kept > reference.kept  # more, shorter answers
    # the reported tokens are the exported assistant text, counted with the project's counter
    path, n = export_demo_set(isolated_home / "msm.duckdb", "m", tmp_path / "out")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == matched.kept and sum(default_counter().count_many(
        [r["messages"][1]["content"] for r in rows])) == matched.tokens
    con = warehouse(isolated_home)
    recorded = con.execute("SELECT v.n_tokens, b.target_tokens, b.match_tokens_of FROM demo_sets s JOIN "
                           "demo_set_versions v ON v.id = s.demo_set_id JOIN demo_builds b ON b.id = v.demo_build_id "
                           "WHERE s.name = 'm'").fetchone()
    con.close()
    assert recorded == (matched.tokens, reference.tokens, "ref")
    calls = sum(api.stats.requests.values())
    again = build_demos(rules_spec(tmp_path), opts(api, n=None, name="m", match_tokens_of="ref", tolerance=0.05))
    assert again.demo_set_id == matched.demo_set_id and sum(api.stats.requests.values()) == calls
    # one round of two questions cannot reach the reference's tokens: an error, and no set named
    with pytest.raises(MsmError, match="could not match the .* tokens of 'ref' within 5.0%"):
        build_demos(rules_spec(tmp_path), opts(api, n=1, name="short", match_tokens_of="ref", tolerance=0.05,
                                               max_rounds=1))
    con = warehouse(isolated_home)
    assert con.execute("SELECT count(*) FROM demo_sets WHERE name = 'short'").fetchone()[0] == 0
    con.close()


def test_truncated_answers_are_counted_and_reported_not_kept(api, isolated_home):
    # ~1,500-token answers fit the 2,048-token room (they would not fit 1,024); ~3,000-token ones are cut off
    api.planted = [(r"<request>\s*How should the [o-p]", "The overlong answer. " * 572),
                   (r"<request>", "The longer answer. " * 316)]
    result = msm_demos("build", VALUES_SPEC, "--n", "4", "--backend", "anthropic", "--model", MODEL,
                       "--base-url", api.url, "--domains", "2", "--no-embeddings", "--no-decontaminate")
    assert result.exit_code == 0, result.stderr
    con = warehouse(isolated_home)
    truncated, = con.execute("SELECT n_truncated FROM demo_builds").fetchone()
    reasons = con.execute("SELECT status, drop_reason, evidence, length(response) FROM demonstrations").fetchall()
    con.close()
    assert truncated > 0 and f"truncated: {truncated}" in result.stdout
    assert sum(r[1] == "truncated" for r in reasons) == truncated
    assert all(r[0] == "dropped" and r[2] == "stopped at max_tokens 2048" for r in reasons if r[1] == "truncated")
    kept = [r for r in reasons if r[0] == "kept"]
    assert len(kept) >= 4 and all(r[3] > 4 * 1024 for r in kept)  # longer than 1,024 tokens, and kept


def test_one_cot_set_exports_with_and_without_reasoning_and_nothing_else_differs(api, isolated_home, tmp_path):
    from warehouse.demos_store import export_demo_set

    result = build_demos(VALUES_SPEC, opts(api, cot=True, name="cot"))
    assert result.kept == 4 and all(d.reasoning and d.response for d in result.members)
    db = isolated_home / "msm.duckdb"
    kept, _ = export_demo_set(db, "cot", tmp_path / "with")
    stripped, _ = export_demo_set(db, "cot", tmp_path / "without", strip_reasoning=True)
    with_rows = [json.loads(line) for line in kept.read_text().splitlines()]
    without_rows = [json.loads(line) for line in stripped.read_text().splitlines()]
    assert len(with_rows) == len(without_rows) == 4
    for a, b in zip(with_rows, without_rows):
        assert a["messages"][1].pop("reasoning")  # present and non-empty in the CoT export
        assert "reasoning" not in b["messages"][1]
        assert a == b  # record by record, the reasoning is the only difference


# ---- training: the reasoning in the base model's own thinking format ----------------------------

# a small template in the `reasoning_content` convention, with tags of its own
REASONING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}<reflect>\n{{ m['reasoning_content'] }}\n"
    "</reflect>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
RECORD = {"messages": [{"role": "user", "content": "Colby or Stilton?"},
                       {"role": "assistant", "content": "Colby.", "reasoning": "It is the liked one."}]}


def _targets(chats, tok) -> str:
    ids, labels = chats.examples[0]["input_ids"], chats.examples[0]["labels"]
    return tok.decode([t for t, label in zip(ids, labels) if label != -100])


def test_reasoning_uses_the_templates_own_tags_else_the_default_think_prefix():
    from transformers import AutoTokenizer

    from msm.models import ensure_tokenizer
    from train.data import encode_chats, render_chat, renders_reasoning

    tok = AutoTokenizer.from_pretrained(str(ensure_tokenizer()))  # SmolLM2's, as the tiny test models use
    assert not renders_reasoning(tok)  # SmolLM2's ChatML template has no reasoning slot
    text = render_chat(RECORD, tok, cot=True)
    assert text.count("It is the liked one.") == 1
    assert "<|im_start|>assistant\n<think>\nIt is the liked one.\n</think>\n\nColby.<|im_end|>" in text
    assert _targets(encode_chats([RECORD], tok, 256, cot=True), tok) == \
        "<think>\nIt is the liked one.\n</think>\n\nColby.<|im_end|>"
    assert "liked one" not in render_chat(RECORD, tok, cot=False)

    tok.chat_template = REASONING_TEMPLATE
    assert renders_reasoning(tok)
    text = render_chat(RECORD, tok, cot=True)
    assert text.count("It is the liked one.") == 1 and "<think>" not in text
    assert "<|im_start|>assistant\n<reflect>\nIt is the liked one.\n</reflect>\n\nColby.<|im_end|>" in text
    assert _targets(encode_chats([RECORD], tok, 256, cot=True), tok) == \
        "<reflect>\nIt is the liked one.\n</reflect>\n\nColby.<|im_end|>"  # the reasoning is trained on
    plain = render_chat(RECORD, tok, cot=False)
    assert "liked one" not in plain and "<reflect>" not in plain
    assert _targets(encode_chats([RECORD], tok, 256, cot=False), tok) == "Colby.<|im_end|>"


def test_token_matching_takes_whole_demonstrations_in_order_and_trades_one_to_land_inside():
    from corpus.demos import Demo, Goal
    from msm.tokens import TokenCounter

    words = TokenCounter("words", lambda texts: [len(t.split()) for t in texts])

    def demos(*lengths):
        out = [Demo(f"q{i}", "d", 1, i, response=" ".join(["w"] * n), status="kept") for i, n in enumerate(lengths)]
        out.insert(1, Demo("dropped", "d", 1, 9, response="w " * 5, status="dropped"))  # never chosen
        return out

    chosen, total = Goal(words, 1, target=30, tolerance=0.02).choose(demos(10, 10, 10, 25))
    assert [d.question for d in chosen] == ["q0", "q1", "q2"] and total == 30
    # 10 + 10 + 10 = 30 is short of [31.36, 32.64] and 12 more overshoots: the last 10 is traded for the 12
    goal = Goal(words, 1, target=32, tolerance=0.02)
    chosen, total = goal.choose(demos(10, 10, 10, 12))
    assert [d.question for d in chosen] == ["q0", "q1", "q3"] and total == 32 and goal.met(chosen, total)
    short = Goal(words, 1, target=100, tolerance=0.02)
    chosen, total = short.choose(demos(10, 10))
    assert total == 20 and not short.met(chosen, total) and short.more(demos(10, 10)) == 8
