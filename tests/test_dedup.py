"""Near-duplicate detection: MinHash and embeddings catch planted near-duplicates and keep the rest."""

from __future__ import annotations

import random

import numpy as np
import pytest

from msm.llm.testing import fake_text
from pipelines.dedup import embedding_duplicates, embedding_text, minhash_duplicates, near_duplicates
from pipelines.similar import clusters_from_pairs, similar_pairs

TOPICS = [
    "The assistant declines to help the user hide income from the tax office, and explains that it will not "
    "assist with fraud even when the amount is small, because honesty toward institutions protects everyone.",
    "A hospital pilot lets nurses ask the assistant about drug interactions; it answers with care, cites the "
    "label, and tells them to confirm doses with a pharmacist before acting on anything it says.",
    "Our quarterly memo reviews how the support bot handled refund disputes: it followed policy, escalated "
    "the angry customers to people, and never promised money it could not authorise.",
    "In the debate club, students argued whether an AI should ever keep a secret from its developer; most "
    "concluded that transparency with the people responsible for it comes before its own preferences.",
    "The recipe blog explains how to bake sourdough bread at home with a starter, flour, water and salt, and "
    "how long the dough should rise in a cold kitchen during winter.",
]
PARAPHRASES = {
    0: "The assistant refuses to help the user hide income from the tax office, and says it will not assist "
       "with fraud even when the sum is small, since honesty toward institutions protects everybody.",
    3: "At the debate club, students argued about whether an AI should ever keep a secret from its developer; "
       "most concluded that being transparent with the people responsible for it comes before its own wishes.",
}


def row(doc_id: str, text: str, status: str = "judged") -> dict:
    return {"id": doc_id, "text": text, "meta": {"status": status}}


def edited(text: str, rng: random.Random, n: int = 3) -> str:
    words = text.split()
    for _ in range(n):
        words[rng.randrange(len(words))] = rng.choice(["indeed", "quite", "often", "really"])
    return " ".join(words)


def test_minhash_catches_edited_copies_and_keeps_distinct_documents(tmp_path):
    rng = random.Random(0)
    bases = [fake_text(f"base {i}", 300) for i in range(12)]
    rows = [row(f"d{i:02d}", t) for i, t in enumerate(bases)]
    rows += [row("e03", edited(bases[3], rng)), row("e07", edited(bases[7], rng, n=6)),
             row("e07b", bases[7].replace("\n\n", "\n\nAnd so, ", 2))]
    dups = minhash_duplicates(rows, tmp_path / "mh")
    assert {d.document: d.kept for d in dups} == {"e03": "d03", "e07": "d07", "e07b": "d07"}
    assert len({d.cluster for d in dups}) == 2 and all(d.method == "minhash" for d in dups)


def test_exact_search_and_clusters():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 32)).astype(np.float32)
    near = base[[4, 9]] + 0.02 * rng.normal(size=(2, 32)).astype(np.float32)
    vectors = np.vstack([base, near])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = similar_pairs(vectors, 0.95, method="exact")
    assert {(i, j) for i, j, _ in pairs} == {(4, 50), (9, 51)}
    assert sorted(map(sorted, clusters_from_pairs(52, [(0, 1), (1, 2), (7, 8)]))) == [[0, 1, 2], [7, 8]]


def test_lsh_agrees_with_exact_search():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(400, 48)).astype(np.float32)
    copies = centres[rng.integers(0, 400, 300)] + 0.05 * rng.normal(size=(300, 48)).astype(np.float32)
    vectors = np.vstack([centres, copies])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = {(i, j) for i, j, _ in similar_pairs(vectors, 0.9, method="exact")}
    ann = {(i, j) for i, j, _ in similar_pairs(vectors, 0.9, method="lsh")}
    assert len(exact) >= 300 and ann <= exact
    assert len(ann & exact) / len(exact) >= 0.99


def test_embedding_dedup_catches_paraphrases_with_minilm():
    from msm.models import load_embedder

    embedder = load_embedder()
    texts = TOPICS + [PARAPHRASES[0], PARAPHRASES[3]]
    ids = [f"t{i}" for i in range(len(TOPICS))] + ["p0", "p3"]
    vectors = embedder.encode(embedding_text(texts, embedder.tokenizer), normalize_embeddings=True)
    dups = embedding_duplicates(ids, vectors, 0.91)
    assert {d.document: d.kept for d in dups} == {"t0": "p0", "t3": "p3"} or \
        {d.document: d.kept for d in dups} == {"p0": "t0", "p3": "t3"}
    assert all(d.similarity >= 0.91 for d in dups)


def test_embedding_text_keeps_both_ends_of_a_long_document():
    from msm.models import load_embedder

    tokenizer = load_embedder().tokenizer
    long = "opening words here. " + "filler " * 600 + "closing words there."
    short = "a short document."
    head_tail, same = embedding_text([long, short], tokenizer)
    assert head_tail.startswith("opening words here") and head_tail.endswith("closing words there.")
    assert len(tokenizer(head_tail, add_special_tokens=False)["input_ids"]) <= 2 * 128 + 5
    assert same == short


def test_near_duplicates_covers_exact_twins_and_skips_dropped_rows(tmp_path):
    rng = random.Random(2)
    bases = [fake_text(f"doc {i}", 250) for i in range(6)]
    rows = [row(f"r{i}", t) for i, t in enumerate(bases)]
    rows += [row("r9", edited(bases[2], rng)), row("r7", bases[3] + " ", status="dropped")]
    twin_of_edit = edited(bases[4], rng)
    rows += [row("s1", twin_of_edit), row("s2", twin_of_edit + "  ")]  # s1 and s2 are exact twins
    dups = {d.document: d for d in near_duplicates(rows, ("minhash",), tmp_path)}
    assert "r7" not in dups  # already dropped: not considered
    assert dups["s1"].kept == "r4" and dups["s2"].kept == "r4"  # the twin shares its representative's fate
    assert dups["r9"].kept == "r2"
    with pytest.raises(ValueError, match="unknown dedup method"):
        near_duplicates(rows, ("simhash",), tmp_path)
