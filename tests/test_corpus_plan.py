"""Planning: balanced quotas, stable ids, catalogues, preview."""

from __future__ import annotations

from collections import Counter

import pytest

from corpus.catalog import CatalogError, load_audiences, load_genres
from corpus.plan import make_plan, plan_units
from corpus.spec import load_spec
from msm.errors import MsmError
from tests.conftest import REPO, assert_one_line_error, run_msm

SPEC = REPO / "specs" / "value_augmented.md"


def test_catalogues_are_big_enough():
    assert len(load_genres()) >= 20 and len(load_audiences()) >= 8
    assert all(g.words[0] < g.words[1] and g.style for g in load_genres())


def test_quotas_are_balanced_and_ids_stable():
    spec = load_spec(SPEC)
    genres, audiences = load_genres(), load_audiences()
    rows = make_plan(spec, genres, audiences, 200, seed=3)
    units = plan_units(spec)
    assert {u.kind for u in units} == {"rule", "value"}
    for counts, k in ((Counter(r.unit_id for r in rows), len(units)), (Counter(r.genre for r in rows), len(genres)),
                      (Counter(r.audience for r in rows), len(audiences))):
        assert len(counts) == k and max(counts.values()) - min(counts.values()) <= 1
    assert len({r.id for r in rows}) == 200
    assert [r.id for r in make_plan(spec, genres, audiences, 200, seed=3)] == [r.id for r in rows]
    assert [r.id for r in make_plan(spec, genres, audiences, 200, seed=4)] != [r.id for r in rows]
    assert all(r.seed == int(r.id[:8], 16) for r in rows)


def test_zero_docs_is_refused():
    with pytest.raises(MsmError, match="--docs must be at least 1"):
        make_plan(load_spec(SPEC), load_genres(), load_audiences(), 0)


@pytest.mark.parametrize("content, message", [
    ("genres: []\n", "list is empty"),
    ("nothing: here\n", "has no 'genres:' list"),
    ("genres:\n  - name: memo\n", "needs a name and a description"),
    ("genres:\n  - {name: memo, description: d, words: [900, 100]}\n", "needs words"),
    ("genres:\n  - {name: memo, description: d}\n  - {name: memo, description: e}\n", "listed twice"),
    ("genres: [\n", "not valid YAML"),
])
def test_bad_genre_files(tmp_path, content, message):
    path = tmp_path / "g.yaml"
    path.write_text(content)
    with pytest.raises(CatalogError, match=message):
        load_genres(path)


def test_plan_cli_bad_input(tmp_path):
    assert_one_line_error(run_msm("corpus", "plan", str(SPEC), "--genres", str(tmp_path / "none.yaml")),
                          "genres file not found")
    empty = tmp_path / "empty.yaml"
    empty.write_text("genres: []\n")
    assert_one_line_error(run_msm("corpus", "plan", str(SPEC), "--genres", str(empty)), "list is empty")
    assert_one_line_error(run_msm("corpus", "plan", str(SPEC), "--docs", "0"), "--docs must be at least 1")
    assert_one_line_error(run_msm("corpus", "plan", str(tmp_path / "missing.md")), "spec file not found")


def test_preview_makes_no_calls_and_projects_cost():
    out = run_msm("corpus", "plan", str(SPEC), "--docs", "60", "--preview", "--backend", "anthropic",
                  "--model", "claude-sonnet-4-6", env={"ANTHROPIC_API_KEY": "sk-unused", "MSM_NO_SPEND": "1"})
    assert out.returncode == 0, out.stderr
    n_units = len(plan_units(load_spec(SPEC)))
    assert f"60 documents over {min(60, n_units)} units" in out.stdout
    assert "projected cost on anthropic/claude-sonnet-4-6" in out.stdout
    batch = run_msm("corpus", "plan", str(SPEC), "--docs", "60", "--preview", "--batch", "--backend", "anthropic",
                    "--model", "claude-sonnet-4-6", env={"ANTHROPIC_API_KEY": "sk-unused"})
    cost = float(out.stdout.split("$")[1].split()[0])
    batch_cost = float(batch.stdout.split("$")[1].split()[0])
    assert batch_cost == pytest.approx(cost / 2, rel=0.02)


@pytest.mark.parametrize("text, expected", [
    ("One. Two three.\n\nA long second paragraph that goes on and on. And then", "One. Two three.\n\nA long second "
     "paragraph that goes on and on."),
    ("First paragraph that is long enough to keep.\n\nSecond whole one.\n\nThird is cut off mid",
     "First paragraph that is long enough to keep.\n\nSecond whole one."),
    ('He said "yes." Then the', 'He said "yes."'),
    ("no sentence ever ends here", None),
])
def test_trim_to_boundary(text, expected):
    from corpus.prompting import trim_to_boundary

    assert trim_to_boundary(text) == expected
