"""Document length as a build setting (`doc_words`): genres rescaled, answer room, build identity."""

from __future__ import annotations

import pytest
import yaml

from corpus.catalog import CatalogError, check_doc_words, load_audiences, load_genres, mean_words
from msm.errors import MsmError
from tests.conftest import LOOPBACK_KEY, REPO, assert_one_line_error, run_msm

SPEC = REPO / "specs" / "value_augmented.md"


def test_doc_words_rescales_every_genre_and_keeps_their_relative_lengths():
    plain, scaled = load_genres(), load_genres(None, 2250)
    assert mean_words(scaled) == pytest.approx(2250, rel=0.002)
    assert [g.name for g in plain] == [g.name for g in scaled]
    factor = 2250 / mean_words(plain)
    for a, b in zip(plain, scaled):
        assert b.words[0] == pytest.approx(a.words[0] * factor, abs=1)
        assert b.words[1] == pytest.approx(a.words[1] * factor, abs=1)
    assert load_genres(None, None) == plain  # unset: the catalogue as written


@pytest.mark.parametrize("bad", [0, -300, 2.5, "long", True])
def test_doc_words_must_be_a_positive_whole_number(bad):
    with pytest.raises(CatalogError) as err:
        check_doc_words(bad)
    assert "positive whole number" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CatalogError):
        load_genres(None, bad)


def _context(backend="anthropic", model="claude-sonnet-4-6", doc_words=None, **kw):
    from corpus.plan import plan_units
    from corpus.spec import load_spec
    from pipelines.context import make_context

    spec = load_spec(str(SPEC))
    return make_context(spec, plan_units(spec), load_genres(None, doc_words), load_audiences(None), backend, model,
                        None, doc_words=doc_words, **kw)


def test_the_default_answer_room_follows_the_longest_genre():
    from pipelines.context import answer_room

    assert _context().max_tokens == 4096  # the catalogue's genres fit the old default
    ctx = _context(doc_words=2250)
    longest = max(ctx.genres.values(), key=lambda g: g["words"][1])
    assert ctx.max_tokens == answer_room(longest["words"][1], True) > 4096
    row = {"unit_id": next(iter(ctx.units)), "genre": longest["name"],
           "audience": next(iter(ctx.audiences)), "seed": 0}
    request = ctx.generate_request(row)
    assert request.max_tokens == answer_room(longest["words"][1], True)  # never cut by the default
    assert f"about {longest['words'][0]} to {longest['words'][1]} words" in request.messages[0].content
    assert _context(doc_words=2250, max_tokens=5000).max_tokens == 5000  # an explicit room still wins


def test_the_compact_prompt_refuses_doc_words():
    with pytest.raises(MsmError) as err:
        _context("local", "smollm2-135m-instruct", doc_words=2250)
    assert "compact prompt" in err.value.problem and "drop doc_words" in err.value.fix


def test_doc_words_bad_input_on_the_cli(tmp_path):
    for command in (("corpus", "plan", str(SPEC), "--doc-words", "0"),
                    ("corpus", "build", str(SPEC), "--docs", "2", "--doc-words", "-5"),
                    ("corpus", "ablate", str(SPEC), "--conditions", "attribution,cooccurrence", "--doc-words", "0")):
        assert_one_line_error(run_msm(*command), "--doc-words must be a positive whole number", "2250")
    assert_one_line_error(run_msm("corpus", "build", str(SPEC), "--backend", "local", "--doc-words", "900"),
                          "compact prompt", "drop doc_words")
    assert not (tmp_path / "msm_home" / "msm.duckdb").exists()  # nothing written


@pytest.mark.parametrize("value, needle", [(0, "'doc_words' must be a positive whole number"),
                                           ("long", "'doc_words' must be an integer or null"),
                                           (True, "'doc_words' must be an integer or null")])
def test_doc_words_bad_input_in_an_experiment_file(tmp_path, loopback, value, needle):
    from tests.test_experiment import tiny

    path = tiny(tmp_path, loopback)
    raw = yaml.safe_load(path.read_text())
    raw["corpus"]["doc_words"] = value
    path.write_text(yaml.safe_dump(raw))
    assert_one_line_error(run_msm("experiment", "run", str(path), "--plan"), needle)
    assert not (tmp_path / "msm_home" / "msm.duckdb").exists()


def test_doc_words_is_part_of_the_build_id(monkeypatch, loopback, isolated_home):
    from pipelines.build import BuildOptions, build_corpus

    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    loopback.output_tokens = 300

    def build(**kw):
        return build_corpus(str(SPEC), BuildOptions(docs=3, backend="anthropic", model="claude-sonnet-4-6",
                                                    base_url=loopback.url, progress=False, dedup=(), **kw))

    plain = build()
    longer = build(doc_words=1800)
    calls = loopback.stats.requests["messages"]
    again = build(doc_words=1800)
    assert longer.build_id != plain.build_id
    assert again.build_id == longer.build_id and loopback.stats.requests["messages"] == calls
    assert build(doc_words=1200).build_id not in (plain.build_id, longer.build_id)


SHIPPED = sorted((REPO / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_paper_profiles_set_the_papers_document_length_and_smoke_runs_stay_short(path):
    from msm.experiment_config import load_experiment

    paper = [a.corpus for a in load_experiment(path, "paper").arms if a.midtrain]
    assert paper and all(c.get("doc_words") == 2250 for c in paper)
    assert all(a.corpus.get("doc_words") is None for a in load_experiment(path, "smoke").arms)
