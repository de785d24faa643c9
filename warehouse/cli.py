"""`msm warehouse ...`: create, inspect and query the DuckDB warehouse."""

from __future__ import annotations

import sys

import click

from msm.cli_util import db_option


@click.group("warehouse")
def warehouse_group():
    """The DuckDB warehouse: every spec, document, call and result, with provenance."""


def _db(db):
    from msm.config import load_settings

    return load_settings(db).db


@warehouse_group.command("init")
@db_option
def init(db):
    """Create the warehouse (or migrate it to the current schema)."""
    from warehouse.db import connect, current_version

    path = _db(db)
    existed = path.exists()
    con = connect(path)
    version = current_version(con)
    con.close()
    click.echo(f"{'migrated' if existed else 'created'} {path} (schema v{version})")


@warehouse_group.command("tables")
@db_option
def tables(db):
    """List tables and views with their row counts."""
    from warehouse.db import connect
    from warehouse.query import table_counts

    con = connect(_db(db), read_only=True)
    for name, kind, rows in table_counts(con):
        click.echo(f"{kind:<6} {name:<28} {rows:>10,}")
    con.close()


@warehouse_group.command("sql")
@click.argument("query")
@db_option
@click.option("--write", is_flag=True, help="Allow statements that change the warehouse.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def sql(query, db, write, fmt):
    """Run SQL (read-only unless --write). QUERY may be '-' to read it from stdin."""
    from warehouse.db import connect
    from warehouse.query import format_rows, run_sql

    if query == "-":
        query = sys.stdin.read()
    path = _db(db)
    con = connect(path, read_only=not write)
    try:
        columns, rows = run_sql(con, query, write=write)
    finally:
        con.close()
    click.echo(format_rows(columns, rows, fmt))


@warehouse_group.command("stats")
@db_option
def stats(db):
    """File size, schema version and the size of every table."""
    from warehouse.db import connect, current_version
    from warehouse.query import table_counts

    path = _db(db)
    con = connect(path, read_only=True)
    click.echo(f"warehouse  {path}")
    click.echo(f"size       {path.stat().st_size / 2**20:.2f} MiB")
    click.echo(f"schema     v{current_version(con)}")
    specs = con.execute("SELECT count(*), count(DISTINCT spec_id) FROM specs").fetchone()
    click.echo(f"specs      {specs[1]} spec(s), {specs[0]} version(s)")
    for name, kind, rows in table_counts(con):
        if kind == "table":
            click.echo(f"  {name:<26} {rows:>10,} rows")
    con.close()
