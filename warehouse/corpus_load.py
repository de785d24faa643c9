"""The loader: staged shards into DuckDB in one short transaction, with exact dedup and provenance.

Parallel workers never write DuckDB. They write parquet shards; this loader reads them, checks
that every plan row ended exactly once, and records documents, judgments, the LLM calls they
used, the plan rows' final statuses, and the named corpus.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from warehouse.db import arrow_table, insert_rows

FINAL = ("kept", "dropped")
JUDGMENT_FIELDS = ("judge", "criterion", "verdict", "score", "rationale", "call_key")
CALL_FIELDS = ("backend", "model", "purpose", "stop_reason", "input_tokens", "output_tokens", "cache_read_tokens",
               "cache_write_tokens", "cost_usd", "latency_s", "error")


def call_row(key: str, call: dict) -> dict:
    """An `llm_calls` row from the call cache's record of one call."""
    return {**{c: call[c] for c in CALL_FIELDS}, "key": key, "batch": bool(call["batch"]),
            "created_at": datetime.fromtimestamp(call["created_at"], timezone.utc).replace(tzinfo=None)}


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", text.lower())).strip()


def text_hash(text: str) -> str:
    """`documents.text_hash` and `embeddings.text_hash`: the SHA-256 of the normalised text."""
    return hashlib.sha256(normalise(text).encode()).hexdigest()


def keeper_key(row: dict) -> tuple[str, str]:
    """The order in which duplicates keep their place: the plan cell first, then the row id.

    An ablation's row id adds the condition, so ordering by row id would keep a different cell of
    a duplicate group under each condition and unmatch it; ordering by cell keeps the same one
    everywhere. Without a cell (a plain build) this is the row id's order.
    """
    plan = (row.get("meta") or {}).get("plan") or {}
    return (plan.get("cell_id") or row["id"], row["id"])


def read_staged(files) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for path in files:
        table = pq.read_table(path, columns=["id", "text", "meta"])
        for doc_id, text, meta in zip(*(table.column(c).to_pylist() for c in ("id", "text", "meta"))):
            rows.append({"id": doc_id, "text": text or "", "meta": json.loads(meta)})
    return rows


def register_corpus(con, name: str, build_id: str, document_ids: list[str]) -> str:
    """Point `name` at the immutable corpus version made of exactly these documents (inside the
    caller's transaction); the version id is a hash of the sorted document ids."""
    ids = sorted(document_ids)
    corpus_id = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    if not con.execute("SELECT 1 FROM corpus_versions WHERE id = ?", [corpus_id]).fetchone():
        con.execute("INSERT INTO corpus_versions (id, build_id, n_docs, n_tokens) SELECT ?, ?, count(*), "
                    "coalesce(sum(n_tokens), 0) FROM documents WHERE id IN (SELECT unnest(?::VARCHAR[]))",
                    [corpus_id, build_id, ids])
        insert_rows(con, "INSERT INTO corpus_documents", [{"corpus_id": corpus_id, "document_id": d} for d in ids])
    con.execute("INSERT INTO corpora (name, corpus_id) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
                "corpus_id = excluded.corpus_id, updated_at = now()", [name, corpus_id])
    return corpus_id


@dataclass
class PreparedLoad:
    """Everything a load writes, read and counted before the warehouse is opened, so the write
    holds the lock only for its one short transaction."""

    rows: list[dict]
    tokens: list[int]  # one per row with text, in order
    calls: dict  # call key -> the call cache's record
    counter_name: str  # the tokenizer that counted `tokens`


def prepare_load(staged: list[dict], counter, cache) -> PreparedLoad:
    """Exact dedup among kept documents (the lowest `keeper_key`, i.e. plan cell then row id, keeps
    its place), token counts and the calls the rows used."""
    kept = sorted((r for r in staged if r["meta"]["status"] == "judged"), key=keeper_key)
    first_by_hash: dict[str, str] = {}
    for r in kept:
        digest = text_hash(r["text"])
        r["hash"] = digest
        if digest in first_by_hash:
            r["meta"]["status"] = "dropped"
            r["meta"]["reason"] = "exact_duplicate"  # its twin shares documents.text_hash
        else:
            first_by_hash[digest] = r["id"]
    with_text = [r for r in staged if r["text"]]
    tokens = counter.count_many([r["text"] for r in with_text]) if with_text else []
    keys = [k for r in staged for k in r["meta"]["call_keys"]]
    return PreparedLoad(staged, list(tokens), cache.rows(keys) if keys else {}, counter.name)


def load_build(con, build_id: str, staged, counter=None, cache=None, corpus_name: str | None = None, *,
               allow_partial: bool = False) -> dict:
    """Returns a summary: counts by status and reason, tokens, cost, corpus id. `staged` is the
    staged rows (read and counted here) or a PreparedLoad. The corpus name moves to the kept
    documents only when every plan row ended, or when `allow_partial` says a partial corpus may
    take it."""
    prepared = staged if isinstance(staged, PreparedLoad) else prepare_load(staged, counter, cache)
    staged, calls = prepared.rows, prepared.calls
    started = con.execute("SELECT started_at FROM builds WHERE id = ?", [build_id]).fetchone()[0]
    started = started.replace(tzinfo=timezone.utc).timestamp() if started else 0.0

    with_text = [r for r in staged if r["text"]]
    documents, judgments, statuses, llm_calls, call_uses, clusters, contaminated = [], [], [], {}, {}, [], []
    for r, n_tokens in zip(with_text, prepared.tokens):
        meta, plan = r["meta"], r["meta"]["plan"]
        doc_id = f"{build_id}-{r['id']}"
        status = "kept" if meta["status"] == "judged" else "dropped"
        documents.append({
            "id": doc_id, "build_id": build_id, "plan_row_id": r["id"], "spec_version": plan["spec_version"],
            "unit_id": plan["unit_id"], "genre": plan["genre"], "audience": plan["audience"],
            "condition": plan["condition"], "text": r["text"], "n_tokens": n_tokens, "token_counter": prepared.counter_name,
            "status": status, "drop_reason": None if status == "kept" else meta["reason"],
            "text_hash": r.get("hash") or text_hash(r["text"]),
            "prompt_hash": meta["prompt_hash"], "backend": meta["backend"], "model": meta["model"],
            "seed": plan["seed"], "call_keys": json.dumps(meta["call_keys"]), "cost_usd": meta["cost_usd"],
            "trimmed": bool(meta.get("trimmed")), "revision": meta.get("revision"), "draft_text": meta.get("draft")})
        if meta.get("dedup"):
            dup = meta["dedup"]
            clusters.append({"build_id": build_id, "method": dup["method"], "cluster_id": dup["cluster"],
                             "document_id": doc_id, "kept_id": f"{build_id}-{dup['kept']}",
                             "similarity": dup["similarity"]})
        if meta.get("contamination"):
            contaminated.append({"document_id": doc_id, **meta["contamination"]})
        judgments += [{"subject_kind": "document", "subject_id": doc_id, **{k: j[k] for k in JUDGMENT_FIELDS}}
                      for j in meta["judgments"]]
    for r in staged:
        meta = r["meta"]
        status = {"judged": "kept"}.get(meta["status"], meta["status"])
        statuses.append({"id": r["id"], "status": status, "reason": None if status == "kept" else meta["reason"]})
        for key in meta["call_keys"]:
            call = calls.get(key)
            if call is None or key in call_uses:
                continue
            llm_calls[key] = call_row(key, call)
            call_uses[key] = {"call_key": key, "user_kind": "build", "user_id": build_id,
                              "subject_id": f"{build_id}-{r['id']}", "purpose": call["purpose"],
                              "cache_hit": call["created_at"] < started}

    con.execute("BEGIN TRANSACTION")
    try:
        # A resumed build reloads its shards whole: judgments are replaced, documents upserted.
        con.execute("DELETE FROM judgments WHERE subject_kind = 'document' AND subject_id IN "
                    "(SELECT id FROM documents WHERE build_id = ?)", [build_id])
        con.execute("DELETE FROM dedup_clusters WHERE build_id = ?", [build_id])
        insert_rows(con, "INSERT OR REPLACE INTO documents", documents)
        insert_rows(con, "INSERT INTO dedup_clusters", clusters)
        con.execute("DELETE FROM contamination WHERE document_id IN (SELECT id FROM documents WHERE build_id = ?)",
                    [build_id])
        insert_rows(con, "INSERT INTO contamination", contaminated)
        insert_rows(con, "INSERT OR REPLACE INTO judgments", judgments)
        # the cache's record is the truth: a call that failed in an earlier run and succeeded in this
        # one replaces its error row (the same key in another build is the same call)
        insert_rows(con, "INSERT OR REPLACE INTO llm_calls", list(llm_calls.values()))
        insert_rows(con, "INSERT OR REPLACE INTO call_uses", list(call_uses.values()))
        if statuses:
            con.register("staged_status", arrow_table(statuses))
            try:
                con.execute("UPDATE plan_rows SET status = s.status, reason = s.reason FROM staged_status s "
                            "WHERE plan_rows.build_id = ? AND plan_rows.id = s.id", [build_id])
            finally:
                con.unregister("staged_status")
        counts = dict(con.execute("SELECT status, count(*) FROM plan_rows WHERE build_id = ? GROUP BY 1",
                                  [build_id]).fetchall())
        complete = sum(counts.get(s, 0) for s in FINAL) == sum(counts.values())
        con.execute("UPDATE builds SET status = ?, finished_at = current_timestamp WHERE id = ?",
                    ["complete" if complete else "incomplete", build_id])
        corpus_id = None
        kept_ids = [d for (d,) in con.execute(
            "SELECT id FROM documents WHERE build_id = ? AND status = 'kept' ORDER BY id", [build_id]).fetchall()]
        if kept_ids and corpus_name and (complete or allow_partial):
            corpus_id = register_corpus(con, corpus_name, build_id, kept_ids)
        con.execute("COMMIT")
    except BaseException:  # a signal mid-write too: the load lands whole or not at all
        con.execute("ROLLBACK")
        raise
    return {"counts": counts, "complete": complete, "corpus_id": corpus_id}
