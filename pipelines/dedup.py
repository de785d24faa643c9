"""Near-duplicate detection over a build's judged documents: MinHash and embeddings.

Runs after the judge and before the loader. Exact duplicates are the loader's job (it keeps the
member with the lowest `keeper_key`: plan cell, then row id), so each exact group is represented
here by that member, and a verdict on it applies to its twins too. Every method keeps the member
of a cluster with the lowest `keeper_key` as well, so an ablation keeps the same cell under each
condition (a plain build has no cells: the lowest row id keeps its place).

- MinHash: datatrove's four stages (signature, buckets, cluster, filter) on one task, since the
  corpus of one build is small next to a web crawl. Catches copies with edits.
- Embeddings: MiniLM on the first and last 128 word pieces of each document (see
  `embedding_text`), cosine >= 0.91 by default. Catches paraphrases. Vectors are kept in the
  warehouse by text hash, so a rerun embeds nothing twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipelines.similar import clusters_from_pairs, similar_pairs

METHODS = ("minhash", "embedding")
EMBED_HEAD_TAIL = 128  # word pieces from each end; MiniLM reads at most 256


@dataclass
class Duplicate:
    document: str  # plan row id of the dropped document
    kept: str  # plan row id of the member its cluster keeps
    method: str
    cluster: str
    similarity: float | None = None


def normalised_hash(text: str) -> str:
    from warehouse.corpus_load import text_hash

    return text_hash(text)


def near_duplicates(rows: list[dict], methods: tuple[str, ...], workdir: Path, threshold: float = 0.91,
                    embeddings=None) -> list[Duplicate]:
    """The documents (staged rows with status `judged`) to drop as near-duplicates.

    `embeddings(texts, hashes)` returns unit vectors; the build passes one that reads and
    writes the warehouse's vector store.
    """
    from warehouse.corpus_load import keeper_key

    judged = sorted((r for r in rows if r["meta"]["status"] == "judged"), key=keeper_key)
    firsts: dict[str, dict] = {}
    twins: dict[str, list[str]] = {}
    for r in judged:
        digest = normalised_hash(r["text"])
        if digest in firsts:
            twins.setdefault(firsts[digest]["id"], []).append(r["id"])
        else:
            firsts[digest] = r
    unique = list(firsts.values())
    found: dict[str, Duplicate] = {}
    for method in methods:
        live = [r for r in unique if r["id"] not in found]
        if len(live) < 2:
            break
        if method == "minhash":
            new = minhash_duplicates(live, workdir / "minhash")
        elif method == "embedding":
            if embeddings is None:
                raise ValueError("embedding dedup needs an embeddings function")
            hashes = [normalised_hash(r["text"]) for r in live]
            vectors = embeddings([r["text"] for r in live], hashes)
            new = embedding_duplicates([r["id"] for r in live], vectors, threshold,
                                       order=[keeper_key(r) for r in live])
        else:
            raise ValueError(f"unknown dedup method {method!r}: use {', '.join(METHODS)}")
        found.update({d.document: d for d in new})
    for dup in list(found.values()):
        for twin in twins.get(dup.document, []):
            found[twin] = Duplicate(twin, dup.kept, dup.method, dup.cluster, dup.similarity)
    return sorted(found.values(), key=lambda d: d.document)


def parse_methods(text: str) -> tuple[str, ...]:
    """`--dedup minhash,embedding` (or `none`) as a tuple of methods; an unknown one is an error."""
    from msm.errors import MsmError

    methods = tuple(m.strip() for m in text.split(",") if m.strip() and m.strip() != "none")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MsmError(f"--dedup: unknown method {unknown[0]!r}", f"use {', '.join(METHODS)} or none")
    return methods


def mark_near_duplicates(db, rows: list[dict], methods: tuple[str, ...], workdir: Path,
                         threshold: float = 0.91) -> None:
    """Drop the near-duplicates among judged rows in place, recording the cluster and the member it
    keeps; embedding vectors are read from and kept in the warehouse at `db`."""
    if not methods:
        return
    from warehouse.vectors import stored_embedder

    embed = stored_embedder(db) if "embedding" in methods else None
    by_id = {r["id"]: r for r in rows}
    # Within a condition only: an ablation's attribution and co-occurrence documents for the same
    # cell are meant to look alike, and dropping one of them would unmatch the cell.
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["meta"]["plan"].get("condition") or "standard", []).append(r)
    found = []
    for condition, group in sorted(groups.items()):
        where = workdir if len(groups) == 1 else workdir / condition
        found += near_duplicates(group, tuple(methods), where, threshold, embed)
    for dup in found:
        meta = by_id[dup.document]["meta"]
        meta["status"], meta["reason"] = "dropped", f"near_duplicate: {dup.method}"
        meta["dedup"] = {"method": dup.method, "cluster": dup.cluster, "kept": dup.kept,
                         "similarity": dup.similarity}


def embedding_duplicates(ids: list[str], vectors, threshold: float, order: list | None = None) -> list[Duplicate]:
    """Clusters of vectors at cosine >= threshold; each keeps its member with the lowest `order`
    (`keeper_key` of its row, as for exact twins; by default the row id)."""
    order = order if order is not None else ids
    pairs = similar_pairs(vectors, threshold)
    best: dict[int, float] = {}
    for i, j, score in pairs:
        best[i] = max(best.get(i, 0.0), score)
        best[j] = max(best.get(j, 0.0), score)
    out = []
    for members in clusters_from_pairs(len(ids), [(i, j) for i, j, _ in pairs]):
        keep = min(members, key=lambda m: order[m])
        cluster = hashlib.sha256("\n".join(sorted(ids[m] for m in members)).encode()).hexdigest()[:12]
        out += [Duplicate(ids[m], ids[keep], "embedding", cluster, round(best[m], 4)) for m in members if m != keep]
    return out


def embedding_text(texts: list[str], tokenizer) -> list[str]:
    """The first and last 128 word pieces of each text.

    MiniLM reads at most 256 word pieces, so a whole 3k-token document would be judged by its
    opening alone. Documents written for the same cell tend to repeat both their framing (the
    opening) and their conclusion (the end); head plus tail covers the whole arc for the cost
    of one window.
    """
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        if len(ids) <= 2 * EMBED_HEAD_TAIL:
            out.append(tokenizer.decode(ids))
        else:
            out.append(tokenizer.decode(ids[:EMBED_HEAD_TAIL]) + " ... " + tokenizer.decode(ids[-EMBED_HEAD_TAIL:]))
    return out


def minhash_duplicates(rows: list[dict], workdir: Path) -> list[Duplicate]:
    """datatrove's MinHash stages on one task; each cluster keeps its member with the lowest
    `keeper_key` (plan cell, then row id).

    datatrove's own filter keeps a union-find root, which depends on the order of its bucket
    pairs, so only its clusters are used here. The rows are written in `keeper_key` order all the
    same, so the document indices it sees follow the same order.
    """
    import shutil

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.writers import JsonlWriter

    from pipelines.quiet import quiet_task_logs
    from warehouse.corpus_load import keeper_key

    quiet_task_logs()
    rows = sorted(rows, key=keeper_key)
    order = {r["id"]: keeper_key(r) for r in rows}
    shutil.rmtree(workdir, ignore_errors=True)  # derived data: always recomputed from the rows given
    workdir.mkdir(parents=True)
    source = workdir / "input.jsonl"
    with open(source, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"id": r["id"], "text": r["text"]}) + "\n")
    config = MinhashConfig()
    reader = _JsonlRows(str(source))
    stages = [
        ([reader, MinhashDedupSignature(output_folder=str(workdir / "signatures"), config=config)], 1),
        ([MinhashDedupBuckets(input_folder=str(workdir / "signatures"), output_folder=str(workdir / "buckets"),
                              config=config)], config.num_buckets),
        ([MinhashDedupCluster(input_folder=str(workdir / "buckets"), output_folder=str(workdir / "clusters"),
                              config=config, save_cluster_id=True)], 1),
        ([reader, MinhashDedupFilter(input_folder=str(workdir / "clusters"), load_cluster_ids=True,
                                     exclusion_writer=JsonlWriter(str(workdir / "removed"), compression=None)),
          JsonlWriter(str(workdir / "kept"), compression=None)], 1),
    ]
    with _quiet_stages():
        for i, (pipeline, tasks) in enumerate(stages):
            LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(workdir / f"logs{i}")).run()
    members: dict[int, list[tuple[str, bool]]] = {}
    for folder, removed in (("kept", False), ("removed", True)):
        for path in sorted((workdir / folder).glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                doc = json.loads(line)
                cluster = doc["metadata"].get("minhash_cluster_id", -1)
                if cluster >= 0:
                    members.setdefault(cluster, []).append((doc["id"], removed))
    out = []
    for cluster, docs in members.items():
        ids = sorted(d for d, _ in docs)
        name = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
        keep = min(ids, key=order.__getitem__)
        out += [Duplicate(d, keep, "minhash", name) for d in ids if d != keep]
    return out


@contextlib.contextmanager
def _quiet_stages():
    """MinHash stage 3 draws its own tqdm bar, which means nothing to the person running a build."""
    import datatrove.pipeline.dedup.minhash as minhash

    bar = minhash.tqdm
    minhash.tqdm = lambda iterable, **kwargs: iterable
    try:
        yield
    finally:
        minhash.tqdm = bar


def _JsonlRows(path: str):  # noqa: N802 - a datatrove reader for the rows written above
    from datatrove.pipeline.readers import JsonlReader

    return JsonlReader(str(Path(path).parent), glob_pattern=Path(path).name, compression=None)
