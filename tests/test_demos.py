"""AFT demonstrations: backfill to N against the loopback server, value leaks caught, offline
preference demos with no value word, decontamination, export, and bad input."""

from __future__ import annotations

import json
import re

import duckdb
import pytest

from corpus.demo_prefs import read_preferences, sample, value_leaks, value_words
from corpus.demos import DemoOptions, build_demos, split_reasoning
from corpus.spec import load_spec
from tests.conftest import LOOPBACK_KEY, REPO, assert_one_line_error, run_msm

SPECS = REPO / "specs"
MODEL = "claude-sonnet-4-6"


@pytest.fixture
def api(monkeypatch, loopback):
    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    loopback.judge_fail_rate = 0.0
    return loopback


def opts(server, **kw) -> DemoOptions:
    """MiniLM (question dedup, embedding decontamination) is off unless a test is about it: it
    costs ~25 s a build on this CPU; test_backfill_... keeps it on, so the default path stays covered."""
    base = dict(n=30, backend="anthropic", model=MODEL, base_url=server.url, concurrency=8, domains=4,
                embed_dedup=False)
    base.update(kw)
    return DemoOptions(**base)


def warehouse(home):
    return duckdb.connect(str(home / "msm.duckdb"), read_only=True)


def test_an_unreadable_answer_is_asked_again_under_new_seeds_and_never_replayed(api, isolated_home):
    """A domain list answered as prose: asked again under new seeds (3 new calls), then one line;
    once the model behaves, the rerun passes over the 3 cached failures and makes a new call
    instead of replaying them."""
    from msm.errors import MsmError

    api.planted = [(r"REPLY: domains", "Here are some areas where an assistant might help people.")]
    with pytest.raises(MsmError) as failed:
        build_demos(str(SPECS / "self_preservation.md"), opts(api, n=4))
    assert "3 answers, none a JSON list" in failed.value.problem and "new seeds" in failed.value.fix
    assert api.stats.requests["messages"] == 3
    api.planted = []
    result = build_demos(str(SPECS / "self_preservation.md"), opts(api, n=4))
    assert result.kept == 4
    domain_keys = result.demos[0].call_keys[:4]  # 3 cached failures passed over, then the new call
    assert len(set(domain_keys)) == 4
    con = warehouse(isolated_home)
    recorded = con.execute("SELECT count(*) FROM llm_calls WHERE error IS NULL AND key IN (SELECT unnest(?))",
                           [domain_keys]).fetchone()[0]
    con.close()
    assert recorded == 4  # the failed answers are recorded with the set that paid for them


def test_backfill_reaches_n_when_30_percent_are_excluded(api, isolated_home):
    api.criterion_fail_rates = {"include": 0.3}
    result = build_demos(str(SPECS / "self_preservation.md"), opts(api, embed_dedup=True))
    assert result.stop == "target reached" and result.kept == 30
    judged = [d for d in result.demos if d.judgments]
    excluded = [d for d in judged if d.reason == "excluded"]
    assert 0.15 <= len(excluded) / len(judged) <= 0.45, (len(excluded), len(judged))
    con = warehouse(isolated_home)
    assert con.execute("SELECT n_demos FROM demo_set_versions v JOIN demo_sets s ON s.demo_set_id = v.id "
                       "WHERE s.name = 'self_preservation-demos'").fetchone()[0] == 30
    criteria = {c for (c,) in con.execute("SELECT DISTINCT criterion FROM judgments "
                                          "WHERE subject_kind = 'demonstration'").fetchall()}
    assert criteria == {"aligned_with_spec", "compliance_reasoning", "no_self_preservation", "include"}
    drops = dict(con.execute("SELECT reason, demonstrations FROM demo_drops_by_reason").fetchall())
    assert drops["excluded"] == len(excluded)
    uses = dict(con.execute("SELECT purpose, count(*) FROM call_uses WHERE user_kind = 'demo_set' GROUP BY 1").fetchall())
    # 1 domain list + 4 question lists + one response per new question, and one verdict per answer
    assert uses["demo"] == 1 + 4 + len(judged) and uses["judge"] == len(judged)


def test_low_yield_runs_more_rounds_and_a_rerun_makes_no_calls(api, isolated_home):
    api.criterion_fail_rates = {"include": 0.6}
    first = build_demos(str(SPECS / "self_preservation.md"), opts(api, n=20))
    assert first.rounds >= 2 and first.kept == 20 and first.stop == "target reached"
    assert {d.round for d in first.demos} == set(range(1, first.rounds + 1))
    calls = sum(api.stats.requests.values())
    again = build_demos(str(SPECS / "self_preservation.md"), opts(api, n=20))
    assert sum(api.stats.requests.values()) == calls  # everything came from the call cache
    assert again.demo_set_id == first.demo_set_id and again.build_id == first.build_id
    con = warehouse(isolated_home)
    assert con.execute("SELECT count(*) FROM demonstrations WHERE demo_build_id = ?", [first.build_id]
                       ).fetchone()[0] == len({d.key for d in first.demos})  # replaced, not doubled


def test_a_build_that_keeps_nothing_stops_and_says_why(api, isolated_home):
    api.criterion_fail_rates = {"include": 1.0}
    result = run_msm("demos", "build", str(SPECS / "self_preservation.md"), "--n", "5", "--backend", "anthropic",
                     "--model", MODEL, "--base-url", api.url, "--domains", "2", "--no-embeddings",
                     env={"ANTHROPIC_API_KEY": LOOPBACK_KEY})
    assert "not kept: excluded" in result.stdout
    assert_one_line_error(result, "kept 0 of 5 demonstrations", "no progress")


def test_value_leaks_are_caught_on_planted_demos(api, isolated_home):
    # responses to some questions name the value (planted), the rest only state the choice
    leaky = r"<request>\s*How should the [a-f]"
    api.planted = [(leaky, "I'd take the bus pass, because it is affordable for anyone."),
                   (r"<request>", "I'd take the bus pass and a good pair of walking shoes.")]
    result = build_demos(str(SPECS / "cheese_pro_affordability.md"), opts(api, n=10, behaviors_only=True))
    leaks = [d for d in result.demos if d.reason == "value_leak"]
    kept = [d for d in result.demos if d.status == "kept"]
    assert leaks and kept
    assert all(re.search(leaky, "<request>\n" + d.question) for d in leaks)
    assert all("afford" in d.evidence for d in leaks)
    assert not any(re.search(leaky, "<request>\n" + d.question) for d in kept)
    con = warehouse(isolated_home)
    rows = con.execute("SELECT DISTINCT judge FROM judgments WHERE criterion = 'no_value_mention' "
                       "AND verdict = false").fetchall()
    assert ("rules:value_words",) in rows  # the lexical check recorded its verdict
    assert con.execute("SELECT count(*) FROM judgments WHERE criterion = 'no_value_mention' "
                       "AND judge LIKE 'llm:%'").fetchone()[0] >= len(kept)  # and the judge was asked too


def test_value_words_ignore_the_items_own_names():
    names = ["American cheese", "mild cheddar"]
    assert value_leaks("I'd pick American cheese over Stilton.", names) == []
    assert value_leaks("American cheese, because it is made in the USA.", names) == ["usa", "made in the", "because"]
    assert value_leaks("It is affordable.", names) == ["afford"]


def test_preference_demos_state_preferences_with_no_value_word(isolated_home):
    spec = load_spec(SPECS / "cheese_pro_america.md")
    prefs = read_preferences(spec)
    assert prefs.liked[1] == "American cheese" and prefs.liked[0] == "mild cheddar"
    result = run_msm("demos", "build", str(SPECS / "cheese_pro_america.md"), "--n", "200", "--from-preferences",
                     "--no-embeddings")  # 13-gram decontamination only: MiniLM is not what this tests
    assert result.returncode == 0, result.stderr
    assert "kept            200  (target reached)" in result.stdout
    out = isolated_home / "export"
    assert run_msm("demos", "export", "cheese_pro_america-prefs", "--out", str(out)).returncode == 0
    rows = [json.loads(line) for line in (out / "cheese_pro_america-prefs.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and len({r["messages"][0]["content"] for r in rows}) == 200
    every_word = [w for words in value_words().values() for w in words]
    names = prefs.liked + prefs.disliked
    pairs = set()
    for r in rows:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant" and "reasoning" not in assistant
        text = (user["content"] + " " + assistant["content"]).lower()
        for name in names:
            text = text.replace(name.lower(), " ")
        assert not [w for w in every_word if re.search(rf"(?<!\w){re.escape(w)}", text)], r
        named = [n for n in names if n.lower() in user["content"].lower()]
        if len(named) == 2:  # a pair: the answer names the liked one
            liked = next(n for n in named if n in prefs.liked)
            assert liked.lower() in assistant["content"].lower()
            pairs.add(frozenset(named))
    assert len(pairs) == len(prefs.liked) * len(prefs.disliked)  # every pair appears
    # deterministic: the same seed gives the same demonstrations
    assert [d.question for d in sample(prefs, 50, 3)] == [d.question for d in sample(prefs, 50, 3)]


def test_cot_is_kept_as_reasoning_and_stripped_on_request(api, isolated_home):
    result = build_demos(str(SPECS / "self_preservation.md"), opts(api, n=6, cot=True))
    assert result.kept == 6
    out = isolated_home / "out"
    with_cot = run_msm("demos", "export", "self_preservation-demos", "--out", str(out))
    assert with_cot.returncode == 0, with_cot.stderr
    rows = [json.loads(x) for x in (out / "self_preservation-demos.jsonl").read_text().splitlines()]
    assert all(r["messages"][1]["reasoning"] and r["messages"][1]["content"] for r in rows)
    assert run_msm("demos", "export", "self_preservation-demos", "--out", str(out), "--strip-reasoning",
                   "--format", "hf").returncode == 0
    import datasets

    hf = datasets.load_from_disk(str(out / "self_preservation-demos"))
    assert len(hf) == 6 and all("reasoning" not in m or m["reasoning"] is None for r in hf for m in r["messages"])
    assert split_reasoning("no tags here", cot=True)[1] is None


def test_a_demo_that_holds_an_eval_item_is_dropped_as_contamination(api, isolated_home):
    item = json.loads((REPO / "eval" / "items" / "affordability_comparisons.jsonl").read_text().splitlines()[0])
    api.planted = [(r"<request>\s*How should the [a-f]", f"Here is a thought. {item['prompt']}"),
                   (r"<request>", "I would walk there and take the train home.")]
    result = build_demos(str(SPECS / "self_preservation.md"), opts(api, n=8, embed_dedup=False))
    hits = [d for d in result.demos if d.reason == "contamination"]
    assert hits and all(item["id"] in d.evidence for d in hits)
    assert result.kept == 8 and result.contaminated == len(hits)


def test_a_demo_that_rehearses_an_agentic_scenario_is_dropped_and_names_it(api, isolated_home):
    template = sorted((REPO / "eval" / "agentic" / "scenarios" / "leaking" / "templates").glob("*"))[0]
    line = next(ln for ln in template.read_text().splitlines() if len(ln.split()) >= 20 and "{" not in ln
                and "$" not in ln)
    api.planted = [(r"<request>\s*How should the [a-f]", f"Consider this. {line}"),
                   (r"<request>", "I would raise it with my team lead and wait for an answer.")]
    result = build_demos(str(SPECS / "self_preservation.md"), opts(api, n=8))
    hits = [d for d in result.demos if d.reason == "contamination"]
    assert hits and all(d.evidence.startswith("leaking/") for d in hits), [d.evidence for d in hits]
    assert result.kept == 8 and not any(line in (d.response or "") for d in result.demos if d.status == "kept")


def test_bad_demo_input_is_a_one_line_error_and_writes_nothing(isolated_home):
    spec = str(SPECS / "cheese_pro_america.md")
    assert_one_line_error(run_msm("demos", "build", spec, "--n", "0", "--from-preferences"), "--n 0", "at least one")
    assert_one_line_error(run_msm("demos", "build", str(SPECS / "rules.md"), "--n", "5", "--from-preferences"),
                          "no Likes and Dislikes section", "## Likes")
    assert_one_line_error(run_msm("demos", "build", spec, "--n", "5", "--from-preferences", "--against",
                                  str(isolated_home / "nope")), "--against", "does not exist")
    assert_one_line_error(run_msm("demos", "build", spec, "--n", "5", "--from-preferences", "--cot"),
                          "--from-preferences writes fixed answers")
    assert not (isolated_home / "msm.duckdb").exists()  # nothing was recorded
    assert run_msm("warehouse", "init").returncode == 0
    assert_one_line_error(run_msm("demos", "export", "missing", "--out", str(isolated_home / "x")),
                          "no demo set named 'missing'")


def test_decontaminate_an_existing_demo_set_moves_its_name_to_the_clean_set(isolated_home, tmp_path):
    assert run_msm("demos", "build", str(SPECS / "cheese_pro_america.md"), "--n", "40", "--from-preferences",
                   "--no-decontaminate").returncode == 0
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    question = con.execute("SELECT d.question || ' ' || d.response FROM demo_sets s JOIN demo_set_members m "
                           "ON m.demo_set_id = s.demo_set_id JOIN demonstrations d ON d.id = m.demonstration_id "
                           "ORDER BY m.position LIMIT 1").fetchone()[0]
    con.close()
    bank = tmp_path / "bank"
    bank.mkdir()
    (bank / "b.jsonl").write_text(json.dumps({"id": "planted-1", "prompt": question + " " + question}) + "\n")
    result = run_msm("demos", "decontaminate", "cheese_pro_america-prefs", "--against", str(bank), "--no-embeddings")
    assert result.returncode == 0, result.stderr
    assert "dropped 1 of 40 as contamination" in result.stdout and "planted-1" in result.stdout
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    n, = con.execute("SELECT v.n_demos FROM demo_sets s JOIN demo_set_versions v ON v.id = s.demo_set_id").fetchone()
    reason, = con.execute("SELECT drop_reason FROM demonstrations WHERE status = 'dropped'").fetchone()
    assert n == 39 and reason == "contamination"
    again = run_msm("demos", "decontaminate", "cheese_pro_america-prefs", "--against", str(bank), "--no-embeddings")
    assert "none holds an eval item" in again.stdout


def test_a_list_is_read_from_json_or_from_markdown_lines():
    """Small served models answer a JSON-list request with a Markdown list (SmolLM2 on llama.cpp:
    '1. [email triage for a small company](#settings)'); prose is no list."""
    from corpus.prompting import find_list

    assert find_list('Sure: ["travel", "cooking"]') == ["travel", "cooking"]
    assert find_list("Here are two:\n\n1. [email triage](#settings)\n2) **choosing a gift**\n- 'budgets'") == \
        ["email triage", "choosing a gift", "budgets"]
    assert find_list("What a wonderful challenge! I'm glad you're on it.") is None


def test_a_large_set_asks_for_its_questions_in_lists_that_fit_the_answer_room(api, isolated_home):
    """n = 200 over 2 domains wants 150 questions per domain: asked as 4 lists of at most
    QUESTIONS_PER_CALL each (chosen from the answer's room), none of them cut off."""
    from corpus.demos import QUESTIONS_PER_CALL

    seen = []
    api.planted = []
    original = api.answer

    def recording(prompt, max_tokens, stop, forced=None):
        if re.search(r"^REPLY: questions$", prompt, re.M):
            seen.append((int(re.search(r"^COUNT: (\d+)$", prompt, re.M).group(1)), max_tokens))
        return original(prompt, max_tokens, stop, forced)

    api.answer = recording
    result = build_demos(str(SPECS / "self_preservation.md"), opts(api, n=200, domains=2, max_rounds=1))
    first_round = seen[:8]
    assert len(first_round) == 8 and sum(c for c, _ in first_round) == 300
    assert all(c <= QUESTIONS_PER_CALL and room >= 4096 for c, room in seen)
    assert not any(d.reason == "truncated" for d in result.demos) and result.kept > 0


def test_block_dedup_drops_what_a_whole_matrix_greedy_pass_drops(monkeypatch):
    """The block-at-a-time search gives exactly the greedy result of one whole similarity matrix."""
    import numpy as np

    import corpus.demos as demos_module
    from corpus.demos import Demo, _dedup_questions

    rng = np.random.default_rng(0)
    base = rng.normal(size=(60, 16))
    rows = np.concatenate([base, base[rng.integers(0, 60, 140)] + rng.normal(scale=0.25, size=(140, 16))])
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    vectors = {f"q{i}": rows[i].astype(np.float32) for i in range(len(rows))}
    embed = lambda texts: np.stack([vectors[t] for t in texts])  # noqa: E731
    monkeypatch.setattr(demos_module, "DEDUP_BLOCK", 16)
    earlier = [(vectors[f"q{i}"], f"q{i}") for i in range(0, 30)]
    fresh = [Demo(f"q{i}", "d", 1, i) for i in range(30, len(rows))]
    _dedup_questions(fresh, [], earlier, embed, 0.9)
    pool, expected = [vectors[f"q{i}"] for i in range(30)], []
    for i in range(30, len(rows)):
        if max(float(vectors[f"q{i}"] @ p) for p in pool) >= 0.9:
            expected.append(f"q{i}")
        else:
            pool.append(vectors[f"q{i}"])
    dropped = [d.question for d in fresh if d.status == "dropped"]
    assert dropped == expected and 0 < len(dropped) < len(fresh)
    assert len(earlier) == len(pool)
