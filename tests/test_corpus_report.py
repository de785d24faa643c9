"""`msm corpus report`: the diversity measures, and a rendered page for a small loopback corpus."""

from __future__ import annotations

import numpy as np
import pytest

from corpus.report import distinct_n, embedding_diversity
from pipelines.build import BuildOptions, build_corpus
from tests.conftest import LOOPBACK_KEY, REPO, assert_one_line_error, run_msm

SPEC = REPO / "specs" / "value_augmented.md"


def test_vendi_and_cosine_distance_at_their_extremes():
    same = np.tile(np.array([[0.6, 0.8, 0.0]]), (5, 1))
    distance, vendi = embedding_diversity(same)
    assert distance == pytest.approx(0.0, abs=1e-9) and vendi == pytest.approx(1.0)
    distance, vendi = embedding_diversity(np.eye(4))
    assert distance == pytest.approx(1.0) and vendi == pytest.approx(4.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k = x @ x.T  # the n x n definition, for comparison
    eig = np.linalg.eigvalsh(k / 50)
    eig = eig[eig > 1e-12]
    expected = np.exp(-np.sum(eig * np.log(eig)))
    mean_offdiag = (k.sum() - 50) / (50 * 49)
    assert embedding_diversity(x) == pytest.approx((1 - mean_offdiag, expected))
    assert embedding_diversity(x[:1]) == (None, None)


def test_distinct_n_counts_unique_word_ngrams():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    assert distinct_n([""], 3) == 0.0


def test_report_renders_a_page_and_non_empty_plots(loopback, monkeypatch, isolated_home, tmp_path):
    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    loopback.output_tokens = 400
    build_corpus(str(SPEC), BuildOptions(docs=12, backend="anthropic", model="claude-sonnet-4-6",
                                         base_url=loopback.url, progress=False, dedup=("minhash",), name="small"))
    out = tmp_path / "report"
    result = run_msm("corpus", "report", "small", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    page = (out / "report.md").read_text(encoding="utf-8")
    assert "# Corpus report: small" in page
    for needle in ("distinct-2", "Vendi score", "mean pairwise cosine distance", "## Units with no kept documents",
                   "## Not kept, by reason"):
        assert needle in page, needle
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"genre.png", "audience.png", "unit.png", "lengths.png"} <= set(pngs)
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
        assert f"({name})" in page  # every plot is on the page
    assert "Vendi" in result.stdout and f"wrote {out / 'report.md'}" in result.stdout


def test_report_on_an_unknown_corpus_is_a_one_line_error():
    assert_one_line_error(run_msm("corpus", "report", "nothing-here"), "no warehouse at", "msm warehouse init")
    assert run_msm("warehouse", "init").returncode == 0
    assert_one_line_error(run_msm("corpus", "report", "nothing-here"), "no corpus named 'nothing-here'",
                          "msm corpus list")
