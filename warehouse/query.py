"""Running user SQL against the warehouse and printing it as a table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json

from warehouse.db import WarehouseError


def run_sql(con, sql: str, write: bool) -> tuple[list[str], list[tuple]]:
    """Run SQL; with write=True it runs in one transaction, so a failure leaves no partial rows."""
    import duckdb

    try:
        if write:
            con.execute("BEGIN TRANSACTION")
        cur = con.execute(sql)
        columns = [d[0] for d in cur.description] if cur.description else []
        rows = cur.fetchall() if columns else []
        if write:
            con.execute("COMMIT")
        return columns, rows
    except duckdb.Error as exc:
        if write:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
        message = str(exc).splitlines()[0]
        if "read-only mode" in message:
            kind = message.split('type "', 1)[-1].split('"', 1)[0] if 'type "' in message else "a write"
            raise WarehouseError(f"this statement writes to the warehouse ({kind})", "rerun with --write") from None
        raise WarehouseError(f"SQL error: {message}", "fix the query") from None


def _cell(value) -> str:
    if value is None:
        return "NULL"
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= 80 else text[:79] + "…"


def format_rows(columns: list[str], rows: list[tuple], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([dict(zip(columns, row)) for row in rows], default=str, indent=1)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    if not columns:
        return "ok"
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = [line(columns), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def table_counts(con) -> list[tuple[str, str, int | None]]:
    """(name, 'table' or 'view', rows) for everything in the main schema."""
    objects = con.execute(
        "SELECT table_name, table_type FROM information_schema.tables"
        " WHERE table_schema = 'main' ORDER BY table_type, table_name"
    ).fetchall()
    result = []
    for name, kind in objects:
        rows = con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
        result.append((name, "view" if kind == "VIEW" else "table", rows))
    return result
