"""Pairs of unit vectors with cosine >= a threshold: exact in blocks, or LSH blocking at scale.

Exact all-pairs search is quadratic: fine up to tens of thousands of documents (20k x 20k at
384 dims is about 1.5 s of BLAS here), too slow at paper scale times many builds. Above
`EXACT_LIMIT` vectors, random-hyperplane blocking compares only vectors that share a bucket,
which keeps the work linear. (faiss's HNSW index was tried first: at 200k vectors it took 28x
the time of 20k on this machine, being memory-bound, and lost pairs; see benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import math

import numpy as np

EXACT_LIMIT = 20_000
BLOCK = 2048
LSH_TABLES = 16
LSH_BUCKET = 64  # vectors per bucket, on average
LSH_SEED = 20261123


def similar_pairs(vectors, threshold: float, method: str = "auto") -> list[tuple[int, int, float]]:
    """(i, j, cosine) with i < j for every pair at or above the threshold; vectors are unit length."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < 2:
        return []
    if method == "auto":
        method = "exact" if len(vectors) <= EXACT_LIMIT else "lsh"
    if method == "exact":
        return _exact(vectors, threshold)
    if method == "lsh":
        return _lsh(vectors, threshold)
    raise ValueError(f"unknown search method {method!r}: use exact, lsh or auto")


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


def _lsh(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Random-hyperplane blocking: vectors that agree on all `bits` signs of one table share a
    bucket, and only bucket mates are compared exactly. Buckets hold ~BUCKET vectors whatever n
    is, so the work grows linearly; two vectors at cosine c share a bucket in one table with
    probability (1 - acos(c)/pi) ** bits, and LSH_TABLES tables make a miss unlikely (at c = 0.91
    and 200k vectors, about 5% per pair; at 0.95, under 1%)."""
    n, dim = vectors.shape
    bits = max(4, min(30, round(math.log2(max(2, n / LSH_BUCKET)))))
    rng = np.random.default_rng(LSH_SEED)
    pairs: dict[tuple[int, int], float] = {}
    weights = (1 << np.arange(bits, dtype=np.int64))
    for _ in range(LSH_TABLES):
        planes = rng.normal(size=(dim, bits)).astype(np.float32)
        codes = ((vectors @ planes) > 0).astype(np.int64) @ weights
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        for members in np.split(order, bounds):
            if len(members) < 2:
                continue
            sims = vectors[members] @ vectors[members].T
            rows, cols = np.nonzero(np.triu(sims, k=1) >= threshold)
            for r, c in zip(rows.tolist(), cols.tolist()):
                i, j = int(members[r]), int(members[c])
                pairs[(min(i, j), max(i, j))] = float(sims[r, c])
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
