"""Opening the DuckDB file: locks, read-only mode and forward-only migrations.

DuckDB lets one process write. A second process meets a file lock; it retries briefly and then
says who holds the lock, instead of printing a stack trace.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from importlib import resources
from pathlib import Path

from msm.errors import MsmError

LOCK_WAIT_S = float(os.environ.get("MSM_DB_LOCK_WAIT", "3"))


class WarehouseError(MsmError):
    """The warehouse cannot be opened or queried."""


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every file in warehouse/migrations, in order."""
    found = []
    for entry in resources.files("warehouse").joinpath("migrations").iterdir():
        m = re.fullmatch(r"(\d{3})_(\w+)\.sql", entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found)


def latest_version() -> int:
    return migrations()[-1][0]


def _check_path(path: Path, read_only: bool) -> None:
    if path.is_dir():
        raise WarehouseError(f"--db {path} is a directory", "pass a file path such as .msm/msm.duckdb")
    if read_only and not path.exists():
        raise WarehouseError(f"no warehouse at {path}", "run `msm warehouse init` first, or pass --db")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise WarehouseError(f"--db {path}: {parent} is a file, not a directory", "choose a path inside a directory")


def connect(path: str | os.PathLike, read_only: bool = False):
    """Open the warehouse, creating its directory when writing; migrate when writable."""
    import duckdb

    path = Path(path)
    _check_path(path, read_only)
    if not read_only:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WarehouseError(f"cannot create {path.parent}: {exc.strerror}", "choose a writable --db path") from None
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            message = str(exc)
            if "Conflicting lock" in message:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                pid = re.search(r"PID (\d+)", message)
                who = f" (PID {pid.group(1)})" if pid else ""
                raise WarehouseError(
                    f"database {path} is in use by another process{who}",
                    "wait for it to finish, or use another --db",
                ) from None
            if "not a valid DuckDB database" in message:
                raise WarehouseError(f"{path} is not a DuckDB database", "pass the path of an msm warehouse, or a new file name") from None
            raise WarehouseError(f"cannot open {path}: {message.removeprefix('IO Error: ')}", "check the --db path") from None
    if read_only:
        _check_schema(con, path)
    else:
        migrate(con)
    return con


def current_version(con) -> int:
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchone()[0]
    if not exists:
        return 0
    return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]


def _check_schema(con, path: Path) -> None:
    version = current_version(con)
    if version > latest_version():
        raise WarehouseError(
            f"{path} has schema v{version}, newer than this msm knows (v{latest_version()})", "upgrade msm"
        )


def migrate(con) -> list[int]:
    """Apply every migration newer than the file's schema version, each in its own transaction."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
        " applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
    )
    have = current_version(con)
    if have > latest_version():
        raise WarehouseError(f"warehouse schema v{have} is newer than this msm knows (v{latest_version()})", "upgrade msm")
    applied = []
    for version, name, sql in migrations():
        if version <= have:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(sql)
            con.execute("INSERT INTO schema_version (version, name) VALUES (?, ?)", [version, name])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        applied.append(version)
    return applied


@contextlib.contextmanager
def transaction(con):
    """`with transaction(con):` one short write that lands whole or not at all."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def arrow_table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


def insert_rows(con, insert: str, rows: list[dict]) -> None:
    """`insert_rows(con, "INSERT OR IGNORE INTO t", [{col: value}, ...])` as one set-based
    statement: row-at-a-time inserts cost DuckDB milliseconds each."""
    if not rows:
        return
    con.register("_rows_in", arrow_table(rows))
    try:
        columns = ", ".join(rows[0])
        con.execute(f"{insert} ({columns}) SELECT {columns} FROM _rows_in")
    finally:
        con.unregister("_rows_in")
