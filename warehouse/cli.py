"""`msm warehouse ...`: create, inspect, query, back up and restore the DuckDB warehouse."""

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
    """Create the warehouse (or migrate it to the current schema, after checking every block)."""
    from warehouse.db import WarehouseError, connect, current_version, verify

    path = _db(db)
    existed = path.exists()
    if existed:  # an existing file is read whole first: a damaged one is never reported as migrated
        problems = verify(path)
        if problems:
            raise WarehouseError(problems[0].split("; ", 1)[0], problems[0].split("; ", 1)[-1])
    con = connect(path)
    version = current_version(con)
    con.close()
    click.echo(f"{'migrated' if existed else 'created'} {path} (schema v{version})")


def _reading(path):
    """Read-only use of the warehouse where a damaged block met mid-query is one line."""
    import contextlib

    import duckdb

    from warehouse.db import reraise_damage

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except duckdb.Error as exc:
            reraise_damage(exc, path)
            raise
    return guard()


@warehouse_group.command("tables")
@db_option
def tables(db):
    """List tables and views with their row counts."""
    from warehouse.db import connect
    from warehouse.query import table_counts

    path = _db(db)
    con = connect(path, read_only=True)
    try:
        with _reading(path):
            for name, kind, rows in table_counts(con):
                click.echo(f"{kind:<6} {name:<28} {rows:>10,}")
    finally:
        con.close()


@warehouse_group.command("sql")
@click.argument("query")
@db_option
@click.option("--write", is_flag=True, help="Allow statements that change the warehouse (or reach files).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--limit", type=click.IntRange(min=0), default=None,
              help="Print at most this many rows of each result (default: all, streamed).")
def sql(query, db, write, fmt, limit):
    """Run SQL (read-only unless --write). QUERY may be '-' to read it from stdin.

    Without --write the SQL can read the warehouse and nothing else: DuckDB itself refuses writes,
    files, extensions and settings. Each statement's result prints in turn; rows stream out.
    """
    from warehouse.db import connect, lock_down, sandbox_config
    from warehouse.query import run_sql

    if query == "-":
        query = sys.stdin.read()
    path = _db(db)
    con = connect(path) if write else connect(path, read_only=True, config=sandbox_config())
    try:
        if write:
            con.execute("SET enable_progress_bar = false")
        else:
            lock_down(con)
        run_sql(con, query, write=write, fmt=fmt, limit=limit, path=path,
                out=lambda text: click.echo(text), note=lambda text: click.echo(text, err=True))
    finally:
        con.close()


@warehouse_group.command("stats")
@db_option
def stats(db):
    """File size, schema version and the size of every table."""
    from warehouse.db import connect, current_version
    from warehouse.query import table_counts

    path = _db(db)
    con = connect(path, read_only=True)
    try:
        with _reading(path):
            click.echo(f"warehouse  {path}")
            click.echo(f"size       {path.stat().st_size / 2**20:.2f} MiB")
            click.echo(f"schema     v{current_version(con)}")
            specs = con.execute("SELECT count(*), count(DISTINCT spec_id) FROM specs").fetchone()
            click.echo(f"specs      {specs[1]} spec(s), {specs[0]} version(s)")
            for name, kind, rows in table_counts(con):
                if kind == "table":
                    click.echo(f"  {name:<26} {rows:>10,} rows")
    finally:
        con.close()


@warehouse_group.command("backup")
@db_option
@click.option("--to", "to", required=True, type=click.Path(file_okay=False),
              help="A new (or empty) directory for the backup.")
def backup_cmd(db, to):
    """Copy the warehouse and the call cache to a new directory, checked and whole.

    Run it before anything that rewrites the warehouse (an msm upgrade that migrates it, a `sql
    --write` session, deleting a corpus) and at the end of an expensive build.
    """
    from msm.config import load_settings
    from warehouse.db import backup

    settings = load_settings(db)
    manifest = backup(settings.db, settings.home / "cache", to)
    rows = sum(manifest["tables"].values())
    calls = sum(manifest["cache_calls"].values())
    click.echo(f"backed up {settings.db} to {to}: schema v{manifest['schema_version']}, "
               f"{len(manifest['tables'])} tables, {rows:,} rows; call cache: {calls:,} calls "
               f"in {len(manifest['cache_calls'])} file(s)")


@warehouse_group.command("restore")
@db_option
@click.option("--from", "src", required=True, type=click.Path(file_okay=False),
              help="A directory written by `msm warehouse backup --to DIR`.")
def restore_cmd(db, src):
    """Put a backup's warehouse in place (the current file is kept aside) and bring back its cache.

    The backup is checked against its manifest first. The current warehouse file is renamed to
    NAME.before-restore-STAMP, never deleted. A healthy call cache keeps its answers and gains the
    backup's; a damaged one is set aside and replaced.
    """
    from msm.config import load_settings
    from warehouse.db import restore

    settings = load_settings(db)
    done = restore(src, settings.db, settings.home / "cache")
    click.echo(f"restored {settings.db} from {src} (backup of {done['created_at']}): schema "
               f"v{done['schema_version']}, {sum(done['tables'].values()):,} rows")
    for kept in done["kept"]:
        click.echo(f"  the previous file is kept at {kept}")
    for rel, action in done["cache"].items():
        click.echo(f"  call cache {rel}: {action}")
