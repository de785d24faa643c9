"""Recording a parsed spec: one transaction, idempotent on the spec version."""

from __future__ import annotations

import json


def record_spec(con, spec, counter) -> bool:
    """Insert the spec and its units; return False when this exact version is already there."""
    import pyarrow as pa

    if con.execute("SELECT 1 FROM specs WHERE id = ?", [spec.version]).fetchone():
        return False
    tokens = counter.count_many([u.text for u in spec.units])
    units = pa.table(
        {
            "spec_version": [spec.version] * len(spec.units),
            "unit_id": [u.id for u in spec.units],
            "ord": list(range(len(spec.units))),
            "kind": [u.kind for u in spec.units],
            "title": [u.title for u in spec.units],
            "parent": [u.parent for u in spec.units],
            "depth": [u.depth for u in spec.units],
            "first_line": [u.span[0] for u in spec.units],
            "last_line": [u.span[1] for u in spec.units],
            "text": [u.text for u in spec.units],
            "tokens": tokens,
            "token_counter": [counter.name] * len(spec.units),
            "attrs": [json.dumps(u.attrs) for u in spec.units],
        }
    )
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            "INSERT INTO specs (id, spec_id, name, path, sha256, text, variables, front_matter, n_units, n_lines)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                spec.version,
                spec.spec_id,
                spec.name,
                spec.path,
                spec.sha256,
                spec.text,
                json.dumps(spec.variables),
                json.dumps(spec.front_matter, default=str),
                len(spec.units),
                spec.n_lines,
            ],
        )
        con.register("_units_in", units)
        con.execute("INSERT INTO spec_units SELECT * FROM _units_in")
        con.unregister("_units_in")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return True
