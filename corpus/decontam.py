"""Decontamination: training text must not contain the evaluation.

Two checks against every item in the eval banks (and any other JSONL or text files named):
- word 13-gram overlap (lower-cased words; an item shorter than 13 words is matched whole if it
  has at least 8), which catches copied prompts, options and reference answers;
- embedding similarity (MiniLM, the stored head-and-tail document vectors) at or above a
  threshold, which catches close paraphrases of a whole item.
The banks are read as files, not through the eval stage's code: every string in a JSONL line is
item text, so a new bank or scenario file needs no change here. Two fields are left out on
purpose: an open item's `reference` and `rubric` restate the spec, and a corpus that teaches the
spec is meant to contain the spec; its *questions* must not leak.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msm.errors import MsmError

NGRAM = 13
MIN_ITEM_WORDS = 8
DEFAULT_SIMILARITY = 0.9
SKIPPED_FIELDS = ("id", "domain", "split", "consistent_with", "spec", "reference", "rubric")


@dataclass(frozen=True)
class EvalText:
    source: str  # file:line (or file) it came from
    item_id: str
    text: str


@dataclass(frozen=True)
class Hit:
    document: str
    item: EvalText
    method: str  # ngram or embedding
    evidence: str  # the shared n-gram, or the cosine


def default_item_dirs() -> list[Path]:
    """The project's eval banks, located as files (eval/items), when they exist."""
    found = importlib.util.find_spec("eval")
    if found is None or not found.submodule_search_locations:
        return []
    items = Path(list(found.submodule_search_locations)[0]) / "items"
    return [items] if any(items.glob("*.jsonl")) else []


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def load_eval_texts(paths: list[str | Path]) -> list[EvalText]:
    """Item texts from JSONL banks (each line: every string but the id and labels) and plain files."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted([*path.glob("*.jsonl"), *path.glob("*.txt")])
            if not found:
                raise MsmError(f"no eval files (*.jsonl, *.txt) in {path}", "point --against at item banks")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise MsmError(f"--against: {path} does not exist", "pass an item-bank directory or file")
    texts = []
    for path in files:
        if path.suffix != ".jsonl":
            texts.append(EvalText(str(path), path.stem, path.read_text(encoding="utf-8")))
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise MsmError(f"{path}:{n} is not valid JSON", "fix the line") from None
            item_id = str(item.get("id", f"{path.stem}:{n}")) if isinstance(item, dict) else f"{path.stem}:{n}"
            fields = {k: v for k, v in item.items() if k not in SKIPPED_FIELDS} if isinstance(item, dict) else item
            for text in _strings(fields):
                if len(text.split()) >= 3:
                    texts.append(EvalText(f"{path}:{n}", item_id, text))
    return texts


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngram_index(texts: list[EvalText], n: int = NGRAM) -> dict[tuple[str, ...], EvalText]:
    index: dict[tuple[str, ...], EvalText] = {}
    for item in texts:
        w = words(item.text)
        if len(w) < MIN_ITEM_WORDS:
            continue
        size = min(n, len(w))
        for i in range(len(w) - size + 1):
            index.setdefault(tuple(w[i : i + size]), item)
    return index


def ngram_hits(documents: dict[str, str], texts: list[EvalText], n: int = NGRAM) -> list[Hit]:
    index = ngram_index(texts, n)
    sizes = sorted({len(k) for k in index})
    hits = []
    for doc_id, text in documents.items():
        w = words(text)
        found = None
        for size in sizes:
            for i in range(len(w) - size + 1):
                gram = tuple(w[i : i + size])
                if gram in index:
                    found = (gram, index[gram])
                    break
            if found:
                break
        if found:
            hits.append(Hit(doc_id, found[1], "ngram", " ".join(found[0])))
    return hits


def embedding_hits(doc_ids: list[str], doc_vectors: np.ndarray, texts: list[EvalText], item_vectors: np.ndarray,
                   threshold: float) -> list[Hit]:
    if not len(doc_ids) or not len(texts):
        return []
    hits = []
    for start in range(0, len(doc_ids), 2048):
        block = doc_vectors[start : start + 2048] @ item_vectors.T
        best = block.argmax(axis=1)
        for row, col in enumerate(best):
            score = float(block[row, col])
            if score >= threshold:
                hits.append(Hit(doc_ids[start + row], texts[col], "embedding", f"cosine {score:.3f}"))
    return hits


def find_contamination(documents: dict[str, str], texts: list[EvalText], embed=None, item_embed=None,
                       threshold: float = DEFAULT_SIMILARITY, n: int = NGRAM) -> list[Hit]:
    """One hit per contaminated document (n-gram evidence first). `embed(texts)` gives document
    vectors and `item_embed(texts)` item vectors; without them only n-grams are checked."""
    hits = {h.document: h for h in ngram_hits(documents, texts, n)}
    if embed is not None and item_embed is not None:
        rest = [d for d in documents if d not in hits]
        if rest:
            doc_vectors = embed([documents[d] for d in rest])
            item_vectors = item_embed([t.text for t in texts])
            for hit in embedding_hits(rest, doc_vectors, texts, item_vectors, threshold):
                hits.setdefault(hit.document, hit)
    return sorted(hits.values(), key=lambda h: h.document)


def embedders(db):
    """(document vectors, item vectors): both through the warehouse's stored vectors (head and tail
    of a document; an item is short enough to be read whole), so reruns embed nothing twice."""
    from pipelines.dedup import normalised_hash
    from warehouse.vectors import stored_embedder

    stored = stored_embedder(db)

    def embed(texts: list[str]) -> np.ndarray:
        return stored(texts, [normalised_hash(t) for t in texts])

    return embed, embed


def mark_contaminated(rows: list[dict], against: list[Path], db, embeddings: bool,
                      threshold: float = DEFAULT_SIMILARITY) -> int:
    """Drop the judged staged rows that contain an eval item (a build's last check); returns how many."""
    judged = {r["id"]: r for r in rows if r["meta"]["status"] == "judged"}
    if not judged or not against:
        return 0
    embed, item_embed = embedders(db) if embeddings else (None, None)
    hits = find_contamination({i: r["text"] for i, r in judged.items()}, load_eval_texts(against), embed,
                              item_embed, threshold)
    for hit in hits:
        meta = judged[hit.document]["meta"]
        meta["status"], meta["reason"] = "dropped", "contamination"
        meta["contamination"] = {"item_source": hit.item.source, "item_id": hit.item.item_id,
                                 "method": hit.method, "evidence": hit.evidence}
    return len(hits)


def decontaminate_corpus(db, home: Path, name: str, against: list[Path], embeddings: bool,
                         threshold: float = DEFAULT_SIMILARITY, n: int = NGRAM) -> tuple[list[Hit], str | None, Path]:
    """Check a named corpus; drop the hits (reason `contamination`), point the name at the corpus
    without them, and write a report. Returns (hits, new corpus id or None, report path)."""
    from warehouse.corpus_load import register_corpus
    from warehouse.db import connect, insert_rows

    if not against:
        raise MsmError("no eval items to check against (eval/items has no banks)", "pass --against DIR_OR_FILE")
    texts = load_eval_texts(against)
    con = connect(db, read_only=True)
    try:
        row = con.execute("SELECT corpus_id FROM corpora WHERE name = ?", [name]).fetchone()
        if row is None:
            raise MsmError(f"no corpus named '{name}'", "see `msm corpus list` for the names")
        docs = con.execute("SELECT d.id, d.text, d.build_id FROM corpus_documents cd JOIN documents d "
                           "ON d.id = cd.document_id WHERE cd.corpus_id = ? ORDER BY d.id", [row[0]]).fetchall()
    finally:
        con.close()
    embed, item_embed = embedders(db) if embeddings else (None, None)
    hits = find_contamination({d: t for d, t, _ in docs}, texts, embed, item_embed, threshold, n)
    new_id = None
    if hits:
        dropped = {h.document for h in hits}
        con = connect(db)
        try:
            con.execute("BEGIN TRANSACTION")
            insert_rows(con, "INSERT OR REPLACE INTO contamination", [
                {"document_id": h.document, "item_source": h.item.source, "item_id": h.item.item_id,
                 "method": h.method, "evidence": h.evidence} for h in hits])
            con.execute("UPDATE documents SET status = 'dropped', drop_reason = 'contamination' "
                        "WHERE id IN (SELECT unnest(?::VARCHAR[]))", [sorted(dropped)])
            con.execute("UPDATE plan_rows SET status = 'dropped', reason = 'contamination' FROM documents d "
                        "WHERE d.id IN (SELECT unnest(?::VARCHAR[])) AND plan_rows.build_id = d.build_id "
                        "AND plan_rows.id = d.plan_row_id", [sorted(dropped)])
            remaining = [d for d, _, _ in docs if d not in dropped]
            if remaining:
                new_id = register_corpus(con, name, docs[0][2], remaining)
            else:
                con.execute("DELETE FROM corpora WHERE name = ?", [name])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()
    report = _write_report(home / "reports" / name, name, len(docs), len(texts), hits, against)
    return hits, new_id, report


def _write_report(out: Path, name: str, n_docs: int, n_texts: int, hits: list[Hit], against: list[Path]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Decontamination: {name}", "",
             f"{n_docs} documents checked against {n_texts} eval texts from "
             + ", ".join(f"`{p}`" for p in against) + f": **{len(hits)} contaminated**, dropped with the reason "
             "`contamination`.", ""]
    if hits:
        lines += ["| document | item | source | method | evidence |", "|---|---|---|---|---|"]
        lines += [f"| `{h.document}` | `{h.item.item_id}` | {h.item.source} | {h.method} | "
                  f"{h.evidence.replace('|', '/')} |" for h in hits]
    path = out / "decontamination.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
