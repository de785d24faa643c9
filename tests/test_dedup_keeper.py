"""Which member of a duplicate group keeps its place: the plan cell first, then the row id.

An ablation's row ids add the condition, so a keeper chosen by row id alone is usually a different
cell under each condition, and both cells are then unmatched. These tests pin the cell-first choice
in exact dedup (the loader), in near-duplicate dedup (MinHash and embeddings), and end to end in an
ablation build whose replicate cells come back word for word the same; a plain build (no cells)
still keeps the lowest row id.
"""

from __future__ import annotations

import random

import duckdb
import numpy as np
import pytest

from msm.llm.testing import fake_text
from pipelines.dedup import embedding_duplicates, minhash_duplicates, near_duplicates
from warehouse.corpus_load import prepare_load


def row(doc_id: str, text: str, cell: str | None = None, condition: str = "standard", status: str = "judged") -> dict:
    plan = {"condition": condition, "cell_id": cell}
    return {"id": doc_id, "text": text, "meta": {"status": status, "reason": None, "plan": plan, "call_keys": []}}


class _Counter:
    name = "words"

    def count_many(self, texts):
        return [len(t.split()) for t in texts]


class _Cache:
    def rows(self, keys):
        return {}


# Row ids chosen so that the lowest row id is cell c2 under attribution and cell c1 under
# co-occurrence: a keeper by row id would keep a different cell under each condition.
ABLATION_IDS = {("c1", "attribution"): "r9", ("c2", "attribution"): "r1",
                ("c1", "cooccurrence"): "r2", ("c2", "cooccurrence"): "r8"}


def ablation_rows(texts: dict[str, str]) -> list[dict]:
    """Cells c1 and c2 under both conditions; `texts[condition]` is what both cells wrote."""
    return [row(ABLATION_IDS[cell, cond], texts[cond], cell, cond) for cell, cond in ABLATION_IDS]


def kept_cells(rows: list[dict], dropped: set[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in rows:
        if r["id"] not in dropped:
            out.setdefault(r["meta"]["plan"]["condition"], set()).add(r["meta"]["plan"]["cell_id"])
    return out


def test_keeper_key_is_the_row_id_without_a_cell():
    from warehouse.corpus_load import keeper_key

    assert keeper_key(row("b", "x")) == ("b", "b")
    assert keeper_key({"id": "b", "text": "x"}) == ("b", "b")  # rows without a plan (benchmarks)
    assert keeper_key(row("b", "x", cell="a")) == ("a", "b")


def test_exact_dedup_keeps_the_same_cell_under_every_condition():
    rows = ablation_rows({"attribution": "Twin text, because of the value.", "cooccurrence": "Twin text; and the value."})
    prepare_load(rows, _Counter(), _Cache())
    dropped = {r["id"] for r in rows if r["meta"]["reason"] == "exact_duplicate"}
    assert kept_cells(rows, dropped) == {"attribution": {"c1"}, "cooccurrence": {"c1"}}


def test_exact_dedup_without_cells_keeps_the_lowest_row_id():
    rows = [row("r5", "Same words."), row("r2", "same words"), row("r7", "Other words.")]
    prepare_load(rows, _Counter(), _Cache())
    assert [r["meta"]["status"] for r in rows] == ["dropped", "judged", "judged"]


def test_minhash_keeps_the_same_cell_under_every_condition(tmp_path):
    rng = random.Random(0)
    dropped: set[str] = set()
    rows = []
    for i, cond in enumerate(("attribution", "cooccurrence")):
        base = fake_text(f"{cond} base", 300)
        words = base.split()
        for _ in range(3):
            words[rng.randrange(len(words))] = "indeed"
        group = [row(ABLATION_IDS["c1", cond], base, "c1", cond),
                 row(ABLATION_IDS["c2", cond], " ".join(words), "c2", cond),
                 row(f"z{i}", fake_text(f"{cond} other", 300), "c3", cond)]
        rows += group
        dups = minhash_duplicates(group, tmp_path / cond)
        assert [(d.document, d.kept) for d in dups] == [(ABLATION_IDS["c2", cond], ABLATION_IDS["c1", cond])]
        dropped |= {d.document for d in dups}
    assert kept_cells(rows, dropped) == {"attribution": {"c1", "c3"}, "cooccurrence": {"c1", "c3"}}


def test_embedding_dedup_keeps_the_same_cell_under_every_condition(tmp_path):
    def embeddings(texts, hashes):  # paraphrases of one cell's text share a vector
        vectors = np.array([[1.0, 0.0] if "value" in t else [0.0, 1.0] for t in texts], dtype=np.float32)
        return vectors

    dropped: set[str] = set()
    rows = []
    for cond in ("attribution", "cooccurrence"):
        group = [row(ABLATION_IDS["c1", cond], "The value, first wording.", "c1", cond),
                 row(ABLATION_IDS["c2", cond], "The value, second wording.", "c2", cond),
                 row(f"z-{cond}", "Something else entirely.", "c3", cond)]
        rows += group
        dups = near_duplicates(group, ("embedding",), tmp_path, embeddings=embeddings)
        assert [(d.document, d.kept) for d in dups] == [(ABLATION_IDS["c2", cond], ABLATION_IDS["c1", cond])]
        dropped |= {d.document for d in dups}
    assert kept_cells(rows, dropped) == {"attribution": {"c1", "c3"}, "cooccurrence": {"c1", "c3"}}
    # without an order, the lowest row id keeps its place, as before
    plain = embedding_duplicates(["r9", "r1"], np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32), 0.91)
    assert [(d.document, d.kept) for d in plain] == [("r9", "r1")]


def test_near_duplicate_twins_follow_the_cell_that_the_loader_keeps(tmp_path):
    """Exact twins are represented by the member the loader keeps, so a near-duplicate verdict on
    the group names that member as the one kept."""
    base = fake_text("twin base", 300)
    rows = [row("r9", base, "c1", "attribution"), row("r1", base + " ", "c2", "attribution"),
            row("r5", base.replace("\n\n", "\n\nAnd so, ", 2), "c0", "attribution")]
    dups = {d.document: d.kept for d in near_duplicates(rows, ("minhash",), tmp_path)}
    assert dups == {"r9": "r5", "r1": "r5"}
    rows[2]["meta"]["status"] = "dropped"  # without c0, the twins' group keeps c1 (row r9)
    assert near_duplicates(rows, ("minhash",), tmp_path) == []
    prepare_load(rows, _Counter(), _Cache())
    assert rows[0]["meta"]["status"] == "judged" and rows[1]["meta"]["reason"] == "exact_duplicate"


@pytest.fixture
def api(monkeypatch, loopback):
    from tests.conftest import LOOPBACK_KEY

    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    loopback.output_tokens = 90
    loopback.judge_fail_rate = 0.0
    loopback.link_check_pass_rate = 1.0  # every condition check passes: only dedup can unmatch a cell
    return loopback


def test_an_ablation_keeps_the_same_twin_cell_under_both_conditions(api, isolated_home, tmp_path):
    """The loopback answers from the prompt alone, so the replicates of one (unit, genre, audience)
    under one condition are exact twins; the kept twin must be the same cell under both."""
    import yaml

    from msm.errors import MsmError
    from pipelines.ablate import build_ablation
    from pipelines.build import BuildOptions
    from tests.conftest import REPO

    # one genre and one audience: the spec's 21 units twice over are 21 pairs of twin cells
    catalog = {}
    for key in ("genres", "audiences"):
        first = yaml.safe_load((REPO / "corpus" / f"{key}.yaml").read_text(encoding="utf-8"))[key][:1]
        catalog[key] = tmp_path / f"{key}.yaml"
        catalog[key].write_text(yaml.safe_dump({key: first}), encoding="utf-8")
    opts = BuildOptions(docs=42, genres=str(catalog["genres"]), audiences=str(catalog["audiences"]),
                        backend="anthropic", model="claude-sonnet-4-6", base_url=api.url, progress=False,
                        concurrency=8, dedup=("minhash",))
    try:
        build_ablation(str(REPO / "specs" / "value_augmented.md"), opts, ("attribution", "cooccurrence"))
    except MsmError as exc:  # matching may fail on a small build; the load is what is checked here
        print(f"build_ablation: {exc}")
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    rows = con.execute(
        "SELECT p.cell_id, p.condition, coalesce(d.status, p.status), coalesce(d.drop_reason, p.reason) "
        "FROM plan_rows p LEFT JOIN documents d ON d.build_id = p.build_id AND d.plan_row_id = p.id "
        "WHERE p.cell_id IS NOT NULL").fetchall()
    per_cell: dict[str, dict[str, tuple]] = {}
    for cell, condition, status, reason in rows:
        per_cell.setdefault(cell, {})[condition] = (status, reason)
    twins = [c for c, per in per_cell.items() if any(r == "exact_duplicate" for _, r in per.values())]
    assert twins, "the loopback's replicates should come back as exact twins"
    # cells whose documents both got through to exact dedup: kept under one condition means kept under both
    both = {c: per for c, per in per_cell.items() if len(per) == 2
            and all(s == "kept" or r == "exact_duplicate" for s, r in per.values())}
    unmatched = [c for c, per in both.items() if len({s for s, _ in per.values()}) > 1]
    print(f"{len(twins)} twin cells, {len(both)} cells through to exact dedup, {len(unmatched)} unmatched")
    assert both and not unmatched, f"{len(unmatched)} of {len(both)} cells kept under one condition only"

