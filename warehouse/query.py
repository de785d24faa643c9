"""Running user SQL against the warehouse and printing it as a table, CSV or JSON.

DuckDB's own parser splits the SQL into statements; each statement's result is printed in turn, and
rows stream out in batches (`fetchmany`), so a result of millions of rows is never held in memory.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Callable, Iterator

from warehouse.db import WarehouseError, reraise_damage

BATCH = 10_000  # rows fetched at a time
WIDTH_SAMPLE = 1_000  # a streamed table's column widths come from its first rows


def split_statements(con, sql: str) -> list[str]:
    """The statements of `sql`, split by DuckDB's parser (a `;` inside a string stays put)."""
    import duckdb

    try:
        found = [s.query.strip() for s in con.extract_statements(sql)]
    except duckdb.Error as exc:
        raise WarehouseError(f"SQL error: {str(exc).splitlines()[0]}", "fix the query") from None
    found = [s for s in found if s.strip().strip(";").strip()]
    if not found:
        raise WarehouseError("no SQL statement given", "pass a query such as \"SELECT count(*) FROM documents\"")
    return found


def _error(exc, path=None) -> WarehouseError:
    """A DuckDB error as one line: the warehouse is damaged, a write needs --write, a file or an
    extension is out of reach without --write, or a plain SQL error."""
    if path is not None:
        reraise_damage(exc, path)
    message = str(exc).splitlines()[0]
    if "read-only mode" in message:
        kind = message.split('type "', 1)[-1].split('"', 1)[0] if 'type "' in message else "a write"
        return WarehouseError(f"this statement writes to the warehouse ({kind})", "rerun with --write")
    if "disabled by configuration" in message or "disabled through configuration" in message \
            or "configuration has been locked" in message:
        what = message.split(": ", 1)[-1]
        return WarehouseError(f"read-only SQL reads the warehouse only ({what})",
                              "rerun with --write to let the SQL reach files, extensions or settings")
    return WarehouseError(f"SQL error: {message}", "fix the query")


def run_sql(con, sql: str, write: bool, fmt: str = "table", out: Callable[[str], None] = print,
            limit: int | None = None, path=None, note: Callable[[str], None] | None = None) -> int:
    """Run every statement of `sql` and print each result as it streams; returns the statements run.

    With write=True the statements run in one transaction, so a failure leaves no partial rows.
    CSV and JSON print one result, so several statements with those formats are refused up front.
    """
    import duckdb

    statements = split_statements(con, sql)
    if len(statements) > 1 and fmt != "table":
        raise WarehouseError(f"--format {fmt} prints one result and this SQL has {len(statements)} statements",
                             "run them one at a time, or use --format table")
    try:
        if write:
            con.execute("BEGIN TRANSACTION")
        for number, statement in enumerate(statements, 1):
            cur = con.execute(statement)
            columns = [d[0] for d in cur.description] if cur.description else []
            if len(statements) > 1:
                out(f"-- statement {number} of {len(statements)}")
            state: dict = {}
            for chunk in render(columns, _rows(cur, limit) if columns else iter(()), fmt, limit, state):
                out(chunk)
            if state.get("more") and fmt != "table" and note:
                note(f"stopped at --limit {limit:,}: more rows not shown")
            if len(statements) > 1 and number < len(statements):
                out("")
        if write:
            con.execute("COMMIT")
        return len(statements)
    except duckdb.Error as exc:
        if write:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
        raise _error(exc, path) from None


def _rows(cur, limit: int | None) -> Iterator[tuple]:
    """The result's rows, `BATCH` at a time, stopping at `limit` (one more is read to tell whether
    the limit cut anything off)."""
    left = None if limit is None else limit + 1
    while left is None or left > 0:
        rows = cur.fetchmany(BATCH if left is None else min(BATCH, left))
        if not rows:
            return
        yield from rows
        if left is not None:
            left -= len(rows)


def _cell(value) -> str:
    if value is None:
        return "NULL"
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= 80 else text[:79] + "…"


def render(columns: list[str], rows: Iterator[tuple], fmt: str, limit: int | None = None,
           state: dict | None = None) -> Iterator[str]:
    """The lines (or blocks of lines) that print a result, produced as rows arrive. `state` gets
    `rows` (how many were printed) and `more` (whether --limit cut the result short)."""
    import itertools

    state = {} if state is None else state

    count = 0
    more = False

    def counted(source):
        nonlocal count, more
        for row in source:
            if limit is not None and count >= limit:
                more = True
                return
            count += 1
            yield row

    rows = counted(rows)
    if fmt == "json":
        yield "["
        held = None
        for row in rows:
            if held is not None:
                yield held + ","
            held = json.dumps(dict(zip(columns, row)), default=str, ensure_ascii=False)
        if held is not None:
            yield held
        yield "]"
        state["rows"], state["more"] = count, more
        return
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        yield buffer.getvalue().rstrip("\n")
        while True:
            part = list(itertools.islice(rows, BATCH))
            if not part:
                break
            buffer.seek(0)
            buffer.truncate()
            writer.writerows(part)
            yield buffer.getvalue().rstrip("\n")
        state["rows"], state["more"] = count, more
        return
    if not columns:
        yield "ok"
        return
    head = [[_cell(v) for v in row] for row in itertools.islice(rows, WIDTH_SAMPLE)]
    widths = [max([len(c)] + [len(r[i]) for r in head]) for i, c in enumerate(columns)]

    def line(vals):
        return "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()

    yield line(columns)
    yield line(["-" * w for w in widths])
    if head:
        yield "\n".join(line(r) for r in head)
    while True:
        part = list(itertools.islice(rows, BATCH))
        if not part:
            break
        yield "\n".join(line([_cell(v) for v in row]) for row in part)
    state["rows"], state["more"] = count, more
    footer = f"({count:,} row{'s' if count != 1 else ''}"
    yield footer + (f", stopped at --limit {limit:,}; more rows not shown)" if more else ")")


def format_rows(columns: list[str], rows: list[tuple], fmt: str) -> str:
    """A whole (small) result as one string."""
    return "\n".join(render(columns, iter(rows), fmt))


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
