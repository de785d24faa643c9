"""Demonstrations in the warehouse: one transaction per demo build, and the export the train stage reads.

A rerun of the same build replaces its demonstrations and judgments whole (the calls behind them
come from the cache), so recording is idempotent. The demo set is the selection the build made
(the first N kept demonstrations in build order, or the token-matched ones); its id is a hash of
their ids, so the same selection is the same set.

Tokens of a demo set are its assistant text, counted with the project's counter (msm/tokens.py):
each response, plus its reasoning where the set keeps one (what AFT trains on with `cot`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from msm.errors import MsmError
from warehouse.corpus_load import JUDGMENT_FIELDS, call_row
from warehouse.db import connect, connect_after_work, insert_rows, transaction


def demo_tokens(counter, demos) -> list[int]:
    """Assistant tokens of each demonstration (objects or rows with `response` and `reasoning`)."""
    def get(d, key):
        return d[key] if isinstance(d, dict) else getattr(d, key)

    responses = counter.count_many([get(d, "response") or "" for d in demos])
    reasoned = [i for i, d in enumerate(demos) if get(d, "reasoning")]
    for i, n in zip(reasoned, counter.count_many([get(demos[i], "reasoning") for i in reasoned])):
        responses[i] += n
    return responses


def record_demo_build(db, spec, build_id: str, name: str, demos: list, members: list, build: dict, config: dict,
                      source: str, backend: str, model: str, prompt_hash: str, started: float,
                      counter=None, stage_keys=()) -> str | None:
    """Record everything about one demo build; returns the demo set id (None when `members`, the
    demonstrations chosen for the set in order, is empty: nothing is registered then). `build`
    holds the demo_builds columns n_target, rounds, stop, cost_usd, style, n_truncated,
    match_tokens_of, target_tokens. `started` (a Unix time) tells which calls this run made and
    which came from the cache. `counter` (msm.tokens; default: the project's) counts the set's tokens."""
    from msm.llm.select import default_cache
    from msm.tokens import default_counter
    from warehouse.specs import record_spec

    rows, judgments, first_use, ids, member_ids = [], [], {}, set(), {id(d) for d in members}
    for d in demos:
        demo_id = f"{build_id}-{d.key}"
        if demo_id in ids:  # the same question twice can only be a dropped duplicate; keep the first
            continue
        ids.add(demo_id)
        for key in d.call_keys:
            first_use.setdefault(key, demo_id)
        rows.append({"id": demo_id, "demo_build_id": build_id, "spec_version": spec.version, "domain": d.domain,
                     "question": d.question, "reasoning": d.reasoning, "response": d.response,
                     "status": "kept" if d.status == "kept" else "dropped", "drop_reason": d.reason,
                     "evidence": d.evidence, "round": d.round, "seed": d.seed, "prompt_hash": prompt_hash,
                     "backend": backend, "model": model, "call_keys": json.dumps(d.call_keys),
                     "cost_usd": d.cost_usd})
        judgments += [{"subject_kind": "demonstration", "subject_id": demo_id, **{k: j[k] for k in JUDGMENT_FIELDS}}
                      for j in d.judgments]
    chosen = [f"{build_id}-{d.key}" for d in demos if id(d) in member_ids]
    set_id = _set_id(chosen) if chosen else None

    for key in stage_keys:  # a domain or question call no demonstration came of: the build's own
        first_use.setdefault(key, build_id)
    keys = sorted(k for k in first_use if k)
    calls = default_cache().rows(keys) if source == "llm" and keys else {}
    llm_calls = [call_row(key, call) for key, call in calls.items()]
    call_uses = [{"call_key": key, "user_kind": "demo_set", "user_id": build_id, "subject_id": first_use[key],
                  "purpose": call["purpose"], "cache_hit": call["created_at"] < started} for key, call in calls.items()]

    counter = counter or default_counter()
    con = connect_after_work(db, f"demo build {build_id}")
    try:
        record_spec(con, spec, counter)  # its own transaction; idempotent
        with transaction(con):  # a rerun's rows replace the build's earlier ones whole
            con.execute("DELETE FROM judgments WHERE subject_kind = 'demonstration' AND subject_id IN "
                        "(SELECT id FROM demonstrations WHERE demo_build_id = ?)", [build_id])
            con.execute("DELETE FROM demonstrations WHERE demo_build_id = ?", [build_id])
            con.execute("INSERT OR REPLACE INTO demo_builds (id, spec_version, source, config, backend, model, "
                        "n_target, n_kept, rounds, stop, cost_usd, style, n_truncated, match_tokens_of, target_tokens) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [build_id, spec.version, source, json.dumps(config, default=str), backend, model,
                         build["n_target"], len(chosen), build["rounds"], build["stop"], build["cost_usd"],
                         build["style"], build["n_truncated"], build.get("match_tokens_of"),
                         build.get("target_tokens")])
            insert_rows(con, "INSERT INTO demonstrations", rows)
            insert_rows(con, "INSERT OR REPLACE INTO judgments", judgments)
            insert_rows(con, "INSERT OR REPLACE INTO llm_calls", llm_calls)  # the cache's final record
            insert_rows(con, "INSERT OR REPLACE INTO call_uses", call_uses)
            if chosen:
                register_demo_set(con, name, build_id, chosen, counter)
    finally:
        con.close()
    return set_id


def _set_id(members: list[str]) -> str:
    return "s" + hashlib.sha256("\n".join(members).encode()).hexdigest()[:15]


def register_demo_set(con, name: str, build_id: str, members: list[str], counter=None) -> str:
    """Point `name` at the immutable, ordered set of these demonstrations (inside the caller's
    transaction, after they are inserted); the set id is a hash of the ids in order, and the set
    records its assistant tokens and the counter that counted them."""
    from msm.tokens import default_counter

    set_id = _set_id(members)
    if not con.execute("SELECT 1 FROM demo_set_versions WHERE id = ?", [set_id]).fetchone():
        cur = con.execute("SELECT response, reasoning FROM demonstrations WHERE id IN (SELECT unnest(?))", [members])
        counter = counter or default_counter()
        tokens = sum(demo_tokens(counter, [{"response": r, "reasoning": t} for r, t in cur.fetchall()]))
        con.execute("INSERT INTO demo_set_versions (id, demo_build_id, n_demos, n_tokens, token_counter) "
                    "VALUES (?, ?, ?, ?, ?)", [set_id, build_id, len(members), tokens, counter.name])
        insert_rows(con, "INSERT INTO demo_set_members", [
            {"demo_set_id": set_id, "demonstration_id": m, "position": i} for i, m in enumerate(members)])
    con.execute("INSERT INTO demo_sets (name, demo_set_id) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
                "demo_set_id = excluded.demo_set_id, updated_at = now()", [name, set_id])
    return set_id


def demo_set_id(con, name: str) -> str:
    """The immutable set a name points to; an immutable set's own id is accepted too."""
    rows = con.execute("SELECT demo_set_id FROM demo_sets WHERE name = ? UNION ALL "
                       "SELECT id FROM demo_set_versions WHERE id = ?", [name, name]).fetchall()
    row = rows[0] if rows else None
    if row is None:
        known = [n for (n,) in con.execute("SELECT name FROM demo_sets ORDER BY name").fetchall()]
        hint = f"known: {', '.join(known)}" if known else "build one with `msm demos build SPEC --n N`"
        raise MsmError(f"no demo set named '{name}'", hint)
    return row[0]


def demo_rows(con, set_id: str) -> list[dict]:
    """The set's demonstrations, in set order, with their provenance."""
    cur = con.execute(
        "SELECT d.id, d.domain, d.question, d.reasoning, d.response, d.demo_build_id, d.spec_version, d.model, "
        "d.seed FROM demo_set_members m JOIN demonstrations d ON d.id = m.demonstration_id "
        "WHERE m.demo_set_id = ? ORDER BY m.position", [set_id])
    columns = [c[0] for c in cur.description]
    return [dict(zip(columns, row)) for row in cur.fetchall()]


def demo_set_info(con, set_id: str) -> dict:
    """What a set is: its build's style, source, model, cot, stop and truncated count, and its tokens."""
    cur = con.execute(
        "SELECT v.id AS demo_set_id, v.n_demos, v.n_tokens, v.token_counter, b.id AS build_id, b.style, b.source, "
        "b.backend, b.model, b.stop, b.n_truncated, b.match_tokens_of, b.target_tokens, "
        "coalesce(json_extract(b.config, '$.cot')::BOOLEAN, false) AS cot "
        "FROM demo_set_versions v JOIN demo_builds b ON b.id = v.demo_build_id WHERE v.id = ?", [set_id])
    columns = [c[0] for c in cur.description]
    return dict(zip(columns, cur.fetchone()))


def set_tokens(db, name: str, counter=None) -> tuple[int, int, str]:
    """(assistant tokens, demonstrations, counter) of a demo set (name or id), counted now with the
    project's counter, so a set recorded under another counter is still compared like for like."""
    from msm.tokens import default_counter

    con = connect(db, read_only=True)
    try:
        rows = demo_rows(con, demo_set_id(con, name))
    finally:
        con.close()
    counter = counter or default_counter()
    return sum(demo_tokens(counter, rows)), len(rows), counter.name


def to_messages(row: dict, strip_reasoning: bool = False) -> dict:
    """The one export shape: {messages: [user, assistant]}; the assistant may carry `reasoning`."""
    assistant = {"role": "assistant", "content": row["response"]}
    if row["reasoning"] and not strip_reasoning:
        assistant["reasoning"] = row["reasoning"]
    return {"messages": [{"role": "user", "content": row["question"]}, assistant], "id": row["id"],
            "domain": row["domain"], "source": f"msm:{row['demo_build_id']}", "spec_version": row["spec_version"]}


def export_demo_set(db, name: str, out: Path, fmt: str = "jsonl", strip_reasoning: bool = False) -> tuple[Path, int]:
    """Write a demo set as {messages} JSONL, or as a datasets save_to_disk folder; atomically."""
    import shutil

    con = connect(db, read_only=True)
    try:
        set_id = demo_set_id(con, name)
        records = [to_messages(r, strip_reasoning) for r in demo_rows(con, set_id)]
    finally:
        con.close()
    if out.exists() and not out.is_dir():
        raise MsmError(f"--out {out} is a file", "pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name if fmt == "hf" else f"{name}.jsonl")
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "hf":
        import datasets

        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_list(records).save_to_disk(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
    else:
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path, len(records)


def drop_from_set(db, name: str, drops: dict[str, str]) -> str | None:
    """Mark `drops` (demonstration id -> evidence) as contamination and point `name` at the set
    without them, in one transaction; returns the new set id (None when nothing is left)."""
    con = connect(db)
    try:
        set_id = demo_set_id(con, name)
        members = [r["id"] for r in demo_rows(con, set_id) if r["id"] not in drops]
        build_id = con.execute("SELECT demo_build_id FROM demo_set_versions WHERE id = ?", [set_id]).fetchone()[0]
        new_id = None
        with transaction(con):
            for demo_id, evidence in drops.items():
                con.execute("UPDATE demonstrations SET status = 'dropped', drop_reason = 'contamination', "
                            "evidence = ? WHERE id = ?", [evidence, demo_id])
            if members:
                new_id = register_demo_set(con, name, build_id, members)
            else:
                con.execute("DELETE FROM demo_sets WHERE name = ?", [name])
    finally:
        con.close()
    return new_id
