"""The loader: staged shards into DuckDB in one short transaction, with exact dedup and provenance.

Parallel workers never write DuckDB. They write parquet shards; this loader reads them, checks
that every plan row ended exactly once, and records documents, judgments, the LLM calls they
used, the plan rows' final statuses, and the named corpus.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone

FINAL = ("kept", "dropped")


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", text.lower())).strip()


def read_staged(files) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for path in files:
        table = pq.read_table(path, columns=["id", "text", "meta"])
        for doc_id, text, meta in zip(*(table.column(c).to_pylist() for c in ("id", "text", "meta"))):
            rows.append({"id": doc_id, "text": text or "", "meta": json.loads(meta)})
    return rows


def load_build(con, build_id: str, staged: list[dict], counter, cache, corpus_name: str | None) -> dict:
    """Returns a summary: counts by status and reason, tokens, cost, corpus id."""
    by_row = {r["id"]: r for r in staged}
    started = con.execute("SELECT started_at FROM builds WHERE id = ?", [build_id]).fetchone()[0]
    started = started.replace(tzinfo=timezone.utc).timestamp() if started else 0.0

    # exact dedup among kept documents: the lowest plan row id keeps its place
    kept = sorted((r for r in staged if r["meta"]["status"] == "judged"), key=lambda r: r["id"])
    first_by_hash: dict[str, str] = {}
    for r in kept:
        digest = hashlib.sha256(normalise(r["text"]).encode()).hexdigest()
        r["hash"] = digest
        if digest in first_by_hash:
            r["meta"]["status"] = "dropped"
            r["meta"]["reason"] = "exact_duplicate"  # its twin shares documents.text_hash
        else:
            first_by_hash[digest] = r["id"]

    with_text = [r for r in staged if r["text"]]
    tokens = counter.count_many([r["text"] for r in with_text]) if with_text else []
    keys = [k for r in staged for k in r["meta"]["call_keys"]]
    calls = cache.rows(keys) if keys else {}

    con.execute("BEGIN TRANSACTION")
    try:
        # A resumed build reloads its shards whole: judgments are replaced, documents upserted.
        con.execute("DELETE FROM judgments WHERE subject_kind = 'document' AND subject_id IN "
                    "(SELECT id FROM documents WHERE build_id = ?)", [build_id])
        for r, n_tokens in zip(with_text, tokens):
            meta, plan = r["meta"], r["meta"]["plan"]
            doc_id = f"{build_id}-{r['id']}"
            status = "kept" if meta["status"] == "judged" else "dropped"
            values = [doc_id, build_id, r["id"], plan["spec_version"], plan["unit_id"], plan["genre"], plan["audience"],
                      plan["condition"], r["text"], n_tokens, counter.name, status,
                      None if status == "kept" else meta["reason"],
                      r.get("hash") or hashlib.sha256(normalise(r["text"]).encode()).hexdigest(),
                      meta["prompt_hash"], meta["backend"], meta["model"], plan["seed"], json.dumps(meta["call_keys"]),
                      meta["cost_usd"], bool(meta.get("trimmed")), meta.get("revision"), meta.get("draft")]
            con.execute("INSERT OR REPLACE INTO documents (id, build_id, plan_row_id, spec_version, unit_id, genre, "
                        "audience, condition, text, n_tokens, token_counter, status, drop_reason, text_hash, prompt_hash, "
                        "backend, model, seed, call_keys, cost_usd, trimmed, revision, draft_text) VALUES (" + ", ".join("?" * len(values)) + ")",
                        values)
            for j in meta["judgments"]:
                con.execute("INSERT OR REPLACE INTO judgments VALUES ('document', ?, ?, ?, ?, ?, ?, ?)",
                            [doc_id, j["judge"], j["criterion"], j["verdict"], j["score"], j["rationale"], j["call_key"]])
        for r in staged:
            meta = r["meta"]
            status = {"judged": "kept"}.get(meta["status"], meta["status"])
            con.execute("UPDATE plan_rows SET status = ?, reason = ? WHERE build_id = ? AND id = ?",
                        [status, None if status == "kept" else meta["reason"], build_id, r["id"]])
            for key in meta["call_keys"]:
                call = calls.get(key)
                if call is None:
                    continue
                con.execute("INSERT OR IGNORE INTO llm_calls VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [key, call["backend"], call["model"], call["purpose"], call["stop_reason"],
                             call["input_tokens"], call["output_tokens"], call["cache_read_tokens"],
                             call["cache_write_tokens"], call["cost_usd"], call["latency_s"], bool(call["batch"]),
                             call["error"], datetime.fromtimestamp(call["created_at"], timezone.utc).replace(tzinfo=None)])
                con.execute("INSERT OR IGNORE INTO call_uses VALUES (?, 'build', ?, ?, ?, ?)",
                            [key, build_id, f"{build_id}-{r['id']}", call["purpose"], call["created_at"] < started])
        counts = dict(con.execute("SELECT status, count(*) FROM plan_rows WHERE build_id = ? GROUP BY 1",
                                  [build_id]).fetchall())
        complete = sum(counts.get(s, 0) for s in FINAL) == sum(counts.values())
        con.execute("UPDATE builds SET status = ?, finished_at = current_timestamp WHERE id = ?",
                    ["complete" if complete else "incomplete", build_id])
        corpus_id = None
        kept_ids = [d for (d,) in con.execute(
            "SELECT id FROM documents WHERE build_id = ? AND status = 'kept' ORDER BY id", [build_id]).fetchall()]
        if kept_ids and corpus_name:
            corpus_id = hashlib.sha256("\n".join(kept_ids).encode()).hexdigest()[:16]
            if not con.execute("SELECT 1 FROM corpus_versions WHERE id = ?", [corpus_id]).fetchone():
                n_tok = con.execute("SELECT sum(n_tokens) FROM documents WHERE build_id = ? AND status = 'kept'",
                                    [build_id]).fetchone()[0]
                con.execute("INSERT INTO corpus_versions (id, build_id, n_docs, n_tokens) VALUES (?, ?, ?, ?)",
                            [corpus_id, build_id, len(kept_ids), n_tok])
                con.executemany("INSERT INTO corpus_documents VALUES (?, ?)", [[corpus_id, d] for d in kept_ids])
            con.execute("INSERT INTO corpora (name, corpus_id) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
                        "corpus_id = excluded.corpus_id, updated_at = now()", [corpus_name, corpus_id])
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return {"counts": counts, "complete": complete, "corpus_id": corpus_id}
