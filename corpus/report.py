"""`msm corpus report NAME`: one Markdown page with plots, to see whether a corpus is balanced
before spending GPU time on it.

Diversity is measured two ways. distinct-n is the share of unique word n-grams. Embedding
diversity uses the stored MiniLM vectors (the same ones dedup uses): the mean pairwise cosine
distance, and the Vendi score, exp of the entropy of the eigenvalues of the similarity matrix
K/n. With unit vectors X (n x d), K = X Xᵀ has the same non-zero eigenvalues as Xᵀ X, so both are
exact at any corpus size in O(n d²), without an n x n matrix.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msm.errors import MsmError

PLANNED_KINDS = ("principle", "rule", "value", "behaviour")


@dataclass
class CorpusReport:
    name: str
    corpus_id: str
    n_docs: int
    n_tokens: int
    token_counter: str
    by_genre: Counter
    by_audience: Counter
    by_unit: Counter
    distinct: dict[int, float]
    mean_cosine_distance: float | None
    vendi: float | None
    uncovered_units: list[tuple[str, str]]  # (unit id, kind): planned, but no document kept
    unplanned_units: list[tuple[str, str]]  # (unit id, kind): never planned by the corpus's builds
    lengths: list[int]
    drops: Counter
    files: dict[str, Path] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list, repr=False)


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams over all n-grams in the corpus (lower-cased words)."""
    seen, total = set(), 0
    for text in texts:
        words = re.findall(r"\w+", text.lower())
        grams = list(zip(*(words[i:] for i in range(n))))
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def embedding_diversity(vectors: np.ndarray) -> tuple[float | None, float | None]:
    """(mean pairwise cosine distance, Vendi score) of unit vectors."""
    n = len(vectors)
    if n < 2:
        return None, None
    x = vectors.astype(np.float64)
    total = x.sum(axis=0)
    mean_similarity = (total @ total - n) / (n * (n - 1))  # off-diagonal mean of X Xᵀ
    eigenvalues = np.linalg.eigvalsh(x.T @ x / n)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    vendi = math.exp(-float(np.sum(eigenvalues * np.log(eigenvalues))))
    return float(1 - mean_similarity), vendi


def gather(con, name: str) -> CorpusReport:
    """Everything but the embedding measures, from an open (read-only) connection."""
    row = con.execute("SELECT c.corpus_id, v.n_docs, v.n_tokens FROM corpora c JOIN corpus_versions v "
                      "ON v.id = c.corpus_id WHERE c.name = ?", [name]).fetchone()
    if row is None:
        raise MsmError(f"no corpus named '{name}'", "see `msm corpus list` for the names")
    corpus_id, n_docs, n_tokens = row
    docs = con.execute(
        "SELECT d.id, d.text, d.n_tokens, d.token_counter, d.genre, d.audience, d.unit_id, d.build_id, "
        "d.spec_version FROM corpus_documents cd JOIN documents d ON d.id = cd.document_id "
        "WHERE cd.corpus_id = ? ORDER BY d.id", [corpus_id]).fetchall()
    texts = [d[1] for d in docs]
    builds = sorted({d[7] for d in docs})
    versions = sorted({d[8] for d in docs})
    by_unit = Counter(d[6] for d in docs)
    uncovered, unplanned = [], []
    planned = {u for (u,) in con.execute("SELECT DISTINCT unit_id FROM plan_rows WHERE build_id IN "
                                         "(SELECT unnest(?::VARCHAR[]))", [builds]).fetchall()}
    for unit_id, kind in con.execute(
            "SELECT unit_id, kind FROM spec_units WHERE spec_version IN (SELECT unnest(?::VARCHAR[])) "
            "ORDER BY unit_id", [versions]).fetchall():
        if by_unit[unit_id]:
            continue
        if unit_id in planned:
            uncovered.append((unit_id, kind))
        elif kind in PLANNED_KINDS:
            unplanned.append((unit_id, kind))
    drops = Counter(dict(con.execute(
        "SELECT coalesce(reason, status), count(*) FROM plan_rows WHERE build_id IN (SELECT unnest(?::VARCHAR[])) "
        "AND status != 'kept' GROUP BY 1", [builds]).fetchall()))
    report = CorpusReport(name, corpus_id, n_docs, int(n_tokens), docs[0][3] if docs else "",
                          Counter(d[4] for d in docs), Counter(d[5] for d in docs), by_unit,
                          {n: distinct_n(texts, n) for n in (1, 2, 3)}, None, None, uncovered, unplanned,
                          [int(d[2]) for d in docs], drops)
    report.texts = texts
    return report


def add_embedding_diversity(report: CorpusReport, db) -> None:
    """Fills the embedding measures from the warehouse's vectors (embedding what is missing)."""
    from pipelines.dedup import normalised_hash
    from warehouse.vectors import stored_embedder

    texts = report.texts
    if len(texts) >= 2:
        vectors = stored_embedder(db)(texts, [normalised_hash(t) for t in texts])
        report.mean_cosine_distance, report.vendi = embedding_diversity(vectors)


def _bar(path: Path, counts: Counter, title: str, xlabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    fig, ax = plt.subplots(figsize=(9, max(2.4, 0.28 * len(items) + 1.2)))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#4c72b0")
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _histogram(path: Path, lengths: list[int], counter: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist(lengths, bins=min(30, max(5, len(lengths) // 4)), color="#55a868")
    ax.set_title("document length")
    ax.set_xlabel(f"tokens ({counter})")
    ax.set_ylabel("documents")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: CorpusReport, out: Path) -> Path:
    """report.md plus one PNG per distribution, written whole into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "genre": _bar(out / "genre.png", report.by_genre, "documents per genre", "documents"),
        "audience": _bar(out / "audience.png", report.by_audience, "documents per audience", "documents"),
        "unit": _bar(out / "unit.png", report.by_unit, "documents per spec unit", "documents"),
        "lengths": _histogram(out / "lengths.png", report.lengths, report.token_counter),
    }
    if report.drops:
        files["drops"] = _bar(out / "drops.png", report.drops, "not kept, by reason (all rows of its builds)",
                              "plan rows")
    report.files = files

    def spread(counts: Counter) -> str:
        if not counts:
            return "none"
        return f"{len(counts)} values, {min(counts.values())}-{max(counts.values())} documents each"

    lines = [
        f"# Corpus report: {report.name}",
        "",
        f"Corpus `{report.corpus_id}`: **{report.n_docs} documents, {report.n_tokens:,} tokens** "
        f"(counted by {report.token_counter}).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| genres | {spread(report.by_genre)} |",
        f"| audiences | {spread(report.by_audience)} |",
        f"| spec units | {spread(report.by_unit)} |",
        *(f"| distinct-{n} (unique word {n}-grams / all) | {v:.3f} |" for n, v in report.distinct.items()),
        f"| mean pairwise cosine distance (MiniLM) | "
        f"{'n/a' if report.mean_cosine_distance is None else f'{report.mean_cosine_distance:.3f}'} |",
        f"| Vendi score (effective number of distinct documents) | "
        f"{'n/a' if report.vendi is None else f'{report.vendi:.1f}'} of {report.n_docs} |",
        f"| length, tokens (median, min-max) | "
        f"{int(np.median(report.lengths)) if report.lengths else 0} ({min(report.lengths, default=0)}-"
        f"{max(report.lengths, default=0)}) |",
        "",
        "## Units with no kept documents",
        "",
    ]
    if report.uncovered_units:
        lines.append("Planned, but no document was kept (look at these before training):")
        lines.append("")
        lines += [f"- **{unit}** ({kind})" for unit, kind in report.uncovered_units]
    else:
        lines.append("None: every planned unit has at least one kept document.")
    if report.unplanned_units:
        kinds = Counter(kind for _, kind in report.unplanned_units)
        lines += ["", f"Not planned by this corpus's builds (by design, e.g. an ablation plans behaviours only): "
                      f"{len(report.unplanned_units)} units ({', '.join(f'{n} {k}' for k, n in kinds.items())}): "
                      + ", ".join(f"`{u}`" for u, _ in report.unplanned_units)]
    lines += ["", "## Distributions", ""]
    for label, path in files.items():
        lines += [f"![{label}]({path.name})", ""]
    lines += ["## Not kept, by reason", ""]
    if report.drops:
        lines += ["| reason | plan rows |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in report.drops.most_common()]
    else:
        lines.append("Nothing was dropped.")
    path = out / "report.md"
    partial = out / "report.md.partial"
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    partial.replace(path)
    return path
