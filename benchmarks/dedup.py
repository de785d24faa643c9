"""Near-duplicate detection at scale: embedding throughput, vector search 20k vs 200k, MinHash at 20k.

Run: .venv/bin/python benchmarks/dedup.py [--skip-minhash] [--skip-embed]
The figures come last, one a line, as `name = value`.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msm.llm.testing import fake_text  # noqa: E402
from pipelines.similar import similar_pairs  # noqa: E402

DIM = 384
THRESHOLD = 0.91


def embed_throughput(n: int = 256) -> float:
    from msm.models import load_embedder
    from pipelines.dedup import embedding_text

    embedder = load_embedder()
    texts = [fake_text(f"embed {i}", 700) for i in range(n)]  # longer than the 256-piece window
    embedder.encode(embedding_text(texts[:8], embedder.tokenizer), normalize_embeddings=True)  # warm up
    started = time.perf_counter()
    embedder.encode(embedding_text(texts, embedder.tokenizer), normalize_embeddings=True, batch_size=32)
    seconds = time.perf_counter() - started
    print(f"embedding: {n} documents (head 128 + tail 128 word pieces) in {seconds:.1f} s")
    return n / seconds


def clustered_vectors(n: int, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Topic-clustered unit vectors (neighbours at cosine ~0.6-0.85, below the threshold) with 5%
    planted near-duplicates (cosine ~0.95 to their original)."""
    rng = np.random.default_rng(seed)
    n_dups = n // 20
    n_base = n - n_dups
    centres = rng.normal(size=(max(1, n_base // 200), DIM)).astype(np.float32)
    topic = rng.integers(0, len(centres), n_base)
    base = centres[topic] + 1.1 * rng.normal(size=(n_base, DIM)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    originals = rng.choice(n_base, n_dups, replace=False)
    dups = base[originals] + 0.018 * rng.normal(size=(n_dups, DIM)).astype(np.float32)
    dups /= np.linalg.norm(dups, axis=1, keepdims=True)
    planted = {(int(o), n_base + k) for k, o in enumerate(originals)}
    return np.vstack([base, dups]), planted


def search_benchmark() -> dict[str, float]:
    figures = {}
    small, planted_small = clustered_vectors(20_000, seed=1)
    started = time.perf_counter()
    exact = {(i, j) for i, j, _ in similar_pairs(small, THRESHOLD, method="exact")}
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    ann = {(i, j) for i, j, _ in similar_pairs(small, THRESHOLD, method="lsh")}
    ann_20k_s = time.perf_counter() - started
    print(f"20k vectors: exact {exact_s:.1f} s ({len(exact)} pairs, {len(exact & planted_small)} of "
          f"{len(planted_small)} planted); LSH {ann_20k_s:.1f} s ({len(ann)} pairs)")
    large, planted_large = clustered_vectors(200_000, seed=2)
    started = time.perf_counter()
    ann_large = {(i, j) for i, j, _ in similar_pairs(large, THRESHOLD, method="lsh")}
    ann_200k_s = time.perf_counter() - started
    print(f"200k vectors: LSH {ann_200k_s:.1f} s ({len(ann_large)} pairs, {len(ann_large & planted_large)} of "
          f"{len(planted_large)} planted); exact would be ~{exact_s * 100:.0f} s (quadratic)")
    figures["embed_dedup_10x_time_ratio"] = ann_200k_s / ann_20k_s
    figures["embed_dedup_recall"] = len(ann & exact) / max(1, len(exact))
    return figures


def edited(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(max(1, len(words) // 40)):  # ~2.5% of the words changed
        words[rng.randrange(len(words))] = rng.choice(["indeed", "quite", "often", "really", "so"])
    return " ".join(words)


def minhash_benchmark(n: int = 20_000) -> dict[str, float]:
    from pipelines.dedup import minhash_duplicates

    rng = random.Random(3)
    n_dups = n // 20
    texts = [fake_text(f"minhash {i}", 250) for i in range(n - n_dups)]
    originals = rng.sample(range(len(texts)), n_dups)
    rows = [{"id": f"d{i:06d}", "text": t} for i, t in enumerate(texts)]
    rows += [{"id": f"e{k:06d}", "text": edited(texts[o], rng)} for k, o in enumerate(originals)]
    planted = {f"e{k:06d}": f"d{o:06d}" for k, o in enumerate(originals)}
    work = Path(tempfile.mkdtemp(prefix="msm-bench-minhash-"))
    started = time.perf_counter()
    dups = minhash_duplicates(rows, work)
    seconds = time.perf_counter() - started
    found = {d.document: d.kept for d in dups}
    caught = sum(1 for e, o in planted.items() if found.get(e) == o)
    false = sum(1 for d in found if not d.startswith("e"))
    print(f"MinHash: {n} documents in {seconds:.1f} s; caught {caught} of {n_dups} planted edits, "
          f"{false} distinct documents dropped")
    for stage in sorted(work.glob("logs*/stats.json")):
        import json

        for step in json.loads(stage.read_text()):
            total = step.get("time_stats", {}).get("total")
            if total:
                print(f"  {step['name']:<40} {total:6.1f} s")
    return {"minhash_20k_s": seconds, "minhash_recall": caught / n_dups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--skip-minhash", action="store_true")
    args = parser.parse_args()
    figures = {}
    if not args.skip_embed:
        figures["embed_docs_per_s"] = embed_throughput()
    figures.update(search_benchmark())
    if not args.skip_minhash:
        figures.update(minhash_benchmark())
    for name, value in figures.items():
        print(f"{name} = {value:.3f}")


if __name__ == "__main__":
    main()
