"""Bringing an existing corpus (the paper's released data, another team's documents) into the
warehouse, so that dedup, reports, decontamination and training work on it like on a build.

An import is recorded as a build whose backend is `import`: every row of the source becomes a
plan row and a document with `imported` provenance (source path, row number, the source's
`domain` column when it has one). Documents go through exact and MinHash near-duplicate
detection and the ordinary loader, and the result is a named corpus.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from msm.errors import MsmError

IMPORTED = "imported"


def read_source(path: str, text_column: str):
    """A pyarrow table from parquet (a file or a folder of files), JSONL, or an HF datasets folder."""
    import pyarrow as pa

    source = Path(path)
    if not source.exists():
        raise MsmError(f"import source not found: {source}", "pass a parquet file or folder, a .jsonl file, "
                                                              "or a folder written by datasets' save_to_disk")
    if source.is_dir() and ((source / "dataset_info.json").exists() or (source / "state.json").exists()
                            or (source / "dataset_dict.json").exists()):
        table = _hf_table(source)
    elif source.is_dir() and list(source.glob("*.parquet")):
        import pyarrow.parquet as pq

        table = pa.concat_tables([pq.read_table(p) for p in sorted(source.glob("*.parquet"))], promote_options="default")
    elif source.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(source)
    elif source.suffix in (".jsonl", ".json", ".ndjson"):
        import polars as pl

        try:
            table = pl.read_ndjson(source).to_arrow()
        except Exception as exc:  # polars raises several types for malformed lines
            raise MsmError(f"cannot read {source} as JSON lines: {str(exc).splitlines()[0]}",
                           "give one JSON object per line") from None
    else:
        raise MsmError(f"cannot tell the format of {source}", "use .parquet, .jsonl, or an HF datasets folder")
    if text_column not in table.column_names:
        raise MsmError(f"{source} has no column {text_column!r} (columns: {', '.join(table.column_names)})",
                       "pass the right one with --text-column")
    return table


def _hf_table(folder: Path):
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else sorted(loaded)[0]
        loaded = loaded[split]
    return loaded.data.table if hasattr(loaded.data, "table") else loaded.to_arrow()


def import_corpus(path: str, text_column: str, name: str | None, db, dedup: tuple[str, ...] = ("minhash",),
                  home: Path | None = None) -> dict:
    from msm.tokens import default_counter
    from pipelines.dedup import mark_near_duplicates
    from warehouse.corpus_load import load_build
    from warehouse.db import connect, insert_rows

    table = read_source(path, text_column)
    texts = table.column(text_column).to_pylist()
    domains = table.column("domain").to_pylist() if "domain" in table.column_names else [None] * len(texts)
    source = str(Path(path).resolve())
    digest = hashlib.sha256(f"{source}|{text_column}".encode())
    for text in texts:
        digest.update(hashlib.sha256((text or "").encode()).digest())
    build_id = "i" + digest.hexdigest()[:15]
    spec_version = _imported_spec()
    name = name or Path(path).stem
    rows, plan_rows = [], []
    for i, (text, domain) in enumerate(zip(texts, domains)):
        row_id = f"{i:08d}"
        plan = {"spec_version": spec_version["id"], "unit_id": str(domain) if domain else IMPORTED,
                "unit_kind": IMPORTED, "genre": IMPORTED, "audience": IMPORTED, "condition": IMPORTED,
                "replicate": 0, "seed": 0}
        empty = not (text or "").strip()
        rows.append({"id": row_id, "text": text or "", "meta": {
            "plan": plan, "status": "dropped" if empty else "judged", "reason": "empty text" if empty else None,
            "call_keys": [], "cost_usd": 0.0, "judgments": [], "backend": "import", "model": source,
            "prompt_hash": ""}})
        plan_rows.append({"id": row_id, "build_id": build_id, **plan, "status": "planned", "reason": None})
    if not rows:
        raise MsmError(f"{path} has no rows", "import a file with at least one document")
    mark_near_duplicates(db, rows, dedup, (home or Path(".")) / "imports" / build_id / "dedup")
    counter = default_counter()
    con = connect(db)
    try:
        if not con.execute("SELECT 1 FROM specs WHERE id = ?", [spec_version["id"]]).fetchone():
            insert_rows(con, "INSERT INTO specs", [spec_version])
        if not con.execute("SELECT 1 FROM builds WHERE id = ?", [build_id]).fetchone():
            config = {"import": source, "text_column": text_column, "dedup": list(dedup)}
            con.execute("BEGIN TRANSACTION")
            con.execute("INSERT INTO builds (id, spec_version, config, code_version, backend, model, count_tokenizer, "
                        "status, n_planned) VALUES (?, ?, ?, ?, 'import', ?, ?, 'running', ?)",
                        [build_id, spec_version["id"], json.dumps(config), _version(), source, counter.name,
                         len(rows)])
            insert_rows(con, "INSERT INTO plan_rows", plan_rows)
            con.execute("COMMIT")
        result = load_build(con, build_id, rows, counter, _NoCalls(), name)
    finally:
        con.close()
    kept = sum(1 for r in rows if r["meta"]["status"] == "judged")
    return {"build_id": build_id, "corpus_id": result["corpus_id"], "name": name, "rows": len(rows),
            "kept": result["counts"].get("kept", kept), "dropped": result["counts"].get("dropped", 0)}


def _imported_spec() -> dict:
    """The spec row imported documents hang from when they came without one."""
    text = "Documents imported from outside msm; they discuss a spec msm did not record."
    sha = hashlib.sha256(text.encode()).hexdigest()
    return {"id": sha[:16], "spec_id": IMPORTED, "name": "imported documents", "path": None, "sha256": sha,
            "text": text, "variables": "{}", "front_matter": "{}", "n_units": 0, "n_lines": 1}


def _version() -> str:
    import msm

    return msm.__version__


class _NoCalls:
    """Imported documents used no model calls."""

    def rows(self, keys):
        return {}
