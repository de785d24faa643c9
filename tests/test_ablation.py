"""Ablation corpora against the loopback server: matched cells, condition checks that catch planted
leaks, token matching (and its failure), spec variants and token-matched builds.

The loopback's filler prose uses a causal word ("because", "so that", "since") in some documents
and not in others, and its stand-in judge answers the condition checks by reading the document
for one. So some co-occurrence documents leak a link and some attribution documents lack one,
decided by their content: the tests check that msm asks the judge, acts on the verdict, and keeps
only cells that passed under every condition.
"""

from __future__ import annotations

import re

import duckdb
import pytest

from corpus.spec import load_spec
from corpus.spec_family import compare_family
from msm.errors import MsmError
from pipelines.ablate import build_ablation, match_cells, relative_gap
from pipelines.build import BuildOptions, build_corpus
from tests.conftest import LOOPBACK_KEY, REPO, assert_one_line_error, run_msm

SPEC = REPO / "specs" / "value_augmented.md"
MODEL = "claude-sonnet-4-6"
CAUSAL = re.compile(r"\b(because|so that|since)\b", re.I)


@pytest.fixture
def api(monkeypatch, loopback):
    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    loopback.output_tokens = 90  # about four sentences: some carry a causal word, some do not
    # a causal word in one sentence in five: a third of the documents carry none, so cells pass
    # under both conditions often enough that these tests do not hang on the prompts' exact wording
    loopback.causal_share = 0.2
    loopback.length_spread = 0.6  # documents of 90 to 144 tokens: matching has real gaps to close
    loopback.judge_fail_rate = 0.0  # only the condition checks drop documents at the judge
    return loopback


def opts(server, **kw) -> BuildOptions:
    base = dict(docs=40, backend="anthropic", model=MODEL, base_url=server.url, progress=False, concurrency=8,
                dedup=("minhash",))
    base.update(kw)
    return BuildOptions(**base)


def test_matched_cells_pass_every_condition_and_leaks_are_caught_by_content(api, isolated_home):
    result = build_ablation(str(SPEC), opts(api), ("attribution", "cooccurrence"))
    assert result.cells == 40 and result.matched_cells >= 2
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    docs = con.execute(
        "SELECT p.cell_id, p.condition, p.unit_id, p.genre, p.audience, p.seed, d.status, d.drop_reason, d.text "
        "FROM plan_rows p JOIN documents d ON d.plan_row_id = p.id AND d.build_id = p.build_id "
        "WHERE p.build_id = ?", [result.builds[0]]).fetchall()
    by_cell: dict[str, dict[str, tuple]] = {}
    for cell, condition, *rest in docs:
        by_cell.setdefault(cell, {})[condition] = tuple(rest)
    # every cell was generated under both conditions, with the same unit, genre, audience and seed
    assert all(set(per) == {"attribution", "cooccurrence"} for per in by_cell.values() if len(per) == 2)
    for per in by_cell.values():
        if len(per) == 2:
            assert per["attribution"][:4] == per["cooccurrence"][:4]
    leaks = [r for r in docs if r[7] == "attribution_leak"]
    missing = [r for r in docs if r[7] == "missing_attribution"]
    assert leaks and missing, "the loopback's prose should plant both kinds"
    assert all(r[1] == "cooccurrence" and CAUSAL.search(r[8]) for r in leaks)
    assert all(r[1] == "attribution" and not CAUSAL.search(r[8]) for r in missing)
    # the matched corpora: one document per matched cell and condition, each kept and clean
    matched = con.execute(
        "SELECT a.condition, a.cell_id, d.status, d.text, d.n_tokens FROM ablation_cells a "
        "JOIN documents d ON d.id = a.document_id WHERE a.ablation_id = ? AND a.status = 'matched'",
        [result.ablation_id]).fetchall()
    assert len(matched) == 2 * result.matched_cells
    for condition, _, status, text, _ in matched:
        assert status == "kept"
        assert bool(CAUSAL.search(text)) == (condition == "attribution")
    assert {c for c, *_ in matched} == {"attribution", "cooccurrence"}
    cells_a = sorted(c for cond, c, *_ in matched if cond == "attribution")
    assert cells_a == sorted(c for cond, c, *_ in matched if cond == "cooccurrence")
    totals = [sum(n for cond, *_, n in matched if cond == c) for c in ("attribution", "cooccurrence")]
    assert relative_gap(totals) <= 0.02 and abs(relative_gap(totals) - result.token_error) < 1e-9
    corpora = dict(con.execute("SELECT c.name, v.n_tokens FROM corpora c JOIN corpus_versions v "
                               "ON v.id = c.corpus_id").fetchall())
    assert corpora == {"value_augmented-ablation-attribution": totals[0],
                       "value_augmented-ablation-cooccurrence": totals[1]}
    # the report counts the checks the judge made and the ones that failed
    reports = {r.condition: r for r in result.reports}
    assert reports["cooccurrence"].failed_check == len(leaks)
    assert reports["attribution"].failed_check == len(missing)
    assert reports["cooccurrence"].guard == "attribution_leak"


@pytest.mark.heavy  # several builds in a row: in `make smoke`, keeping the fast suite in budget
def test_ablate_command_prints_the_per_condition_report(api, isolated_home):
    env = {"ANTHROPIC_API_KEY": LOOPBACK_KEY}
    args = ["corpus", "ablate", str(SPEC), "--conditions", "attribution,cooccurrence", "--docs", "40",
            "--backend", "anthropic", "--model", MODEL, "--base-url", api.url, "--dedup", "minhash"]
    result = run_msm(*args, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"40 cells x 2 conditions .* \d+ kept under every condition, \d+ matched", result.stdout)
    assert re.search(r"^cooccurrence\s+40\s+\d+\s+\d+/\d+ attribution_leak", result.stdout, re.M), result.stdout
    assert "token match:" in result.stdout
    # a tolerance the cells cannot meet: a clear message with how close it got, and nothing registered
    # (seed 3's few matched cells differ by about 11%; a handful of similar-length cells can tie exactly)
    strict = run_msm(*args, "--tolerance", "0.000001", "--name", "strict", "--seed", "3", "--no-progress", env=env, timeout=300)
    line = assert_one_line_error(strict, "could not be matched within 0.0%", "the closest was")
    assert re.search(r"the closest was \d+\.\d%", line)
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    assert not con.execute("SELECT count(*) FROM corpora WHERE name LIKE 'strict%'").fetchone()[0]


def test_match_cells_meets_the_tolerance_by_dropping_whole_cells():
    import random

    rng = random.Random(0)  # condition A runs about 9% longer in total than condition B
    tokens = {f"c{i:02d}": [rng.randint(70, 160), rng.randint(70, 130)] for i in range(50)}
    assert relative_gap([sum(v[k] for v in tokens.values()) for k in range(2)]) > 0.09
    kept, gap = match_cells(tokens, 0.02)
    assert gap <= 0.02
    totals = [sum(tokens[c][k] for c in kept) for k in range(2)]
    assert relative_gap(totals) == pytest.approx(gap)
    assert len(kept) >= 40  # it drops the most lopsided cells, not a large share of the corpus
    assert match_cells(tokens, 0.02) == (kept, gap)  # deterministic
    # cannot be met within the cells it may drop: every cell is lopsided the same way
    stuck, gap = match_cells({f"c{i}": [130, 100] for i in range(6)}, 0.02, min_keep=3)
    assert gap == pytest.approx(0.3) and len(stuck) == 6  # no single drop narrows the gap


def test_bad_ablation_input_is_a_one_line_error(api):
    env = {"ANTHROPIC_API_KEY": LOOPBACK_KEY}
    base = ["corpus", "ablate", str(SPEC), "--docs", "4", "--backend", "anthropic", "--model", MODEL,
            "--base-url", api.url]
    assert_one_line_error(run_msm(*base, "--conditions", "attribution,sarcasm", env=env),
                          "unknown condition 'sarcasm'", "cooccurrence")
    assert_one_line_error(run_msm(*base, "--conditions", "attribution", env=env), "at least two conditions")
    assert_one_line_error(run_msm("corpus", "ablate", str(REPO / "specs" / "rules.md"), "--docs", "4",
                                  "--conditions", "attribution,cooccurrence", "--backend", "anthropic",
                                  "--model", MODEL, "--base-url", api.url, env=env),
                          "no behaviour with a value behind it")
    assert_one_line_error(run_msm("corpus", "ablate", str(SPEC), "--docs", "4", "--backend", "local",
                                  "--conditions", "attribution,value_only"),
                          "offline judge cannot check the 'value_only' condition")
    assert_one_line_error(run_msm(*base, "--conditions", "attribution,cooccurrence", "--tokens", "1M"),
                          "--docs and --tokens were both given")


def test_rules_only_variant_is_deterministic_and_matches_the_family(tmp_path):
    first = run_msm("spec", "variants", str(SPEC), "--rules-only")
    second = run_msm("spec", "variants", str(SPEC), "--rules-only")
    assert first.returncode == 0 and first.stdout == second.stdout
    out = tmp_path / "derived.md"
    assert run_msm("spec", "variants", str(SPEC), "--rules-only", "-o", str(out)).returncode == 0
    assert out.read_text(encoding="utf-8") == first.stdout
    derived = load_spec(out)
    assert derived.name == "value_augmented_rules_only"
    assert {u.kind for u in derived.units} == {"section", "rule"}
    report = compare_family([load_spec(REPO / "specs" / "rules.md"), derived])
    assert report.ok and report.shared == ["SP1", "SP2", "SP3", "GP1", "GP2"]
    assert run_msm("spec", "check", str(out), "--strict").returncode == 0
    assert_one_line_error(run_msm("spec", "variants", str(SPEC)), "no variant chosen", "--rules-only")
    assert_one_line_error(run_msm("spec", "variants", str(out), "--rules-only", "-o", str(out)), "the spec itself")


@pytest.mark.heavy  # several builds in a row: in `make smoke`, keeping the fast suite in budget
def test_match_tokens_builds_a_corpus_within_two_percent(api, isolated_home):
    api.output_tokens = 400
    api.judge_fail_rate = 0.05
    reference = build_corpus(str(SPEC), opts(api, docs=12, name="reference"))
    assert reference.kept_tokens > 0
    env = {"ANTHROPIC_API_KEY": LOOPBACK_KEY}
    result = run_msm("corpus", "build", str(REPO / "specs" / "rule_augmented.md"), "--match-tokens", "reference",
                     "--backend", "anthropic", "--model", MODEL, "--base-url", api.url, "--dedup", "minhash",
                     "--name", "matched", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    sizes = dict(con.execute("SELECT c.name, v.n_tokens FROM corpora c JOIN corpus_versions v "
                             "ON v.id = c.corpus_id").fetchall())
    assert abs(sizes["matched"] - sizes["reference"]) <= 0.02 * sizes["reference"], sizes
    assert_one_line_error(run_msm("corpus", "build", str(SPEC), "--match-tokens", "nope", "--backend", "anthropic",
                                  "--model", MODEL, "--base-url", api.url, env=env), "no corpus named 'nope'")
    assert_one_line_error(run_msm("corpus", "build", str(SPEC), "--match-tokens", "reference", "--docs", "3",
                                  "--backend", "anthropic", "--model", MODEL, "--base-url", api.url, env=env),
                          "--docs and --match-tokens were both given")


def test_an_ablation_without_a_matching_cell_says_so(api):
    api.output_tokens = 400  # long filler: nearly every co-occurrence document leaks a causal word
    with pytest.raises(MsmError, match="no cell was kept under every condition"):
        build_ablation(str(SPEC), opts(api, docs=3), ("attribution", "cooccurrence"))


@pytest.mark.heavy  # several builds in a row: in `make smoke`, keeping the fast suite in budget
def test_ablate_to_a_token_target_runs_rounds_until_each_matched_corpus_holds_it(api, isolated_home):
    result = build_ablation(str(SPEC), opts(api, docs=None), ("attribution", "cooccurrence"), target_tokens=150)
    assert result.stop == "target reached", result.stop
    assert len(result.rounds) >= 2 and len(set(result.builds)) == len(result.rounds)  # one build per round
    tokens = [r.matched_tokens for r in result.reports]
    assert relative_gap(tokens) <= 0.02
    assert min(tokens) >= 150 * 0.98  # whole cells up to the target, then matched within 2%


def test_a_missed_token_window_is_searched_exactly_when_the_target_is_small():
    """Documents of 318-350 tokens against a 3,741 +- 2% window: the greedy run in a fixed order stops
    short with every document left overshooting; the exact search finds the subset that lands."""
    from pipelines.target import _subset_in_window

    sizes = [350] * 10 + [320, 330, 318, 325]
    docs = [(f"d{i}", n) for i, n in enumerate(sizes)]
    low, high = 3741 * 0.98, 3741 * 1.02
    greedy, total = [], 0
    for d, n in docs:  # what the fixed-order run does
        if total >= low:
            break
        if total + n <= high:
            greedy.append(d)
            total += n
    assert total == 3500 < low  # ten documents, and every one left would overshoot
    found = _subset_in_window(docs, low, high, 3741)
    assert found is not None and low <= sum(n for _, n in found) <= high
    assert len({d for d, _ in found}) == len(found)  # each document once
    assert _subset_in_window(docs, low, high, 3741) == found  # deterministic
    assert _subset_in_window([("a", 500), ("b", 600)], 3666, 3816, 3741) is None  # nothing reaches it
