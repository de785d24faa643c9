"""Pairs of unit vectors with cosine >= a threshold: exact in blocks, or an HNSW index at scale.

Exact all-pairs search is quadratic: fine up to tens of thousands of documents (20k x 20k at
384 dims is a few seconds of BLAS), too slow at paper scale times many builds. Above
`EXACT_LIMIT` vectors, faiss's HNSW graph finds each vector's nearest neighbours in roughly
logarithmic time; a near-duplicate cluster larger than `ANN_NEIGHBOURS` can lose some pairs,
which the union of the pairs it keeps usually reconnects.
"""

from __future__ import annotations

import numpy as np

EXACT_LIMIT = 20_000
ANN_NEIGHBOURS = 16
BLOCK = 2048


def similar_pairs(vectors, threshold: float, method: str = "auto") -> list[tuple[int, int, float]]:
    """(i, j, cosine) with i < j for every pair at or above the threshold; vectors are unit length."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < 2:
        return []
    if method == "auto":
        method = "exact" if len(vectors) <= EXACT_LIMIT else "ann"
    if method == "exact":
        return _exact(vectors, threshold)
    if method == "ann":
        return _ann(vectors, threshold)
    raise ValueError(f"unknown search method {method!r}: use exact, ann or auto")


def _exact(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    pairs = []
    for start in range(0, len(vectors), BLOCK):
        block = vectors[start:start + BLOCK] @ vectors[start:].T  # only columns at or after the block
        rows, cols = np.nonzero(block >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i, j = start + r, start + c
            if i < j:
                pairs.append((i, j, float(block[r, c])))
    return pairs


def _ann(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    try:
        import faiss
    except ImportError:
        from msm.errors import MsmError

        raise MsmError(f"near-duplicate search over {len(vectors):,} vectors needs faiss",
                       "pip install faiss-cpu") from None
    index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 64
    index.add(vectors)
    index.hnsw.efSearch = 64
    scores, neighbours = index.search(vectors, ANN_NEIGHBOURS + 1)
    pairs = {}
    for i, (row_scores, row_ids) in enumerate(zip(scores, neighbours)):
        for score, j in zip(row_scores.tolist(), row_ids.tolist()):
            if j < 0 or j == i or score < threshold:
                continue
            key = (i, j) if i < j else (j, i)
            pairs[key] = max(pairs.get(key, 0.0), score)
    return [(i, j, s) for (i, j), s in sorted(pairs.items())]


def clusters_from_pairs(n: int, pairs) -> list[list[int]]:
    """Connected components (size >= 2) of the pair graph, by union-find."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for x in range(n):
        groups.setdefault(root(x), []).append(x)
    return [members for members in groups.values() if len(members) > 1]
