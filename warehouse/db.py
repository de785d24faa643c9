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
WORK_LOCK_WAIT_S = 3600.0  # a write after paid or long work waits this long (MSM_LOAD_LOCK_WAIT)


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


# What a damaged file says when DuckDB opens or reads it: a short file, a bad checksum, a bad header.
DAMAGE_SIGNS = ("Could not read enough bytes", "Corrupt database file", "not a valid DuckDB database",
                "does not match stored checksum", "database file is corrupted")
HEADER_BYTES = 3 * 4096  # DuckDB's file header and its two database headers, before the first block


def damage_fix(path: Path) -> str:
    return (f"restore a backup with `msm warehouse restore --from DIR`, or move {path.name} aside and run "
            "`msm warehouse init` for an empty warehouse")


def is_damage(exc: BaseException) -> bool:
    return any(sign in str(exc) for sign in DAMAGE_SIGNS)


def damaged(path: str | os.PathLike, exc: BaseException | str) -> WarehouseError:
    """The one-line error for a warehouse file that DuckDB cannot read back."""
    path = Path(path)
    detail = str(exc).splitlines()[0].removeprefix("IO Error: ").removeprefix("Error: ") if str(exc) else ""
    detail = re.sub(r'\s*(?:from |in )?(?:the )?file "[^"]*"', "", detail)
    return WarehouseError(f"the warehouse {path} is damaged ({detail[:160]})", damage_fix(path))


def reraise_damage(exc: BaseException, path: str | os.PathLike) -> None:
    """Inside `except duckdb.Error`: a damaged file becomes one line naming it; anything else goes on."""
    if is_damage(exc):
        raise damaged(path, exc) from None


def sandbox_config() -> dict:
    """DuckDB's own settings for SQL that may read the warehouse and change nothing, given when the
    file is opened: no file, network or extension access beyond the database's own files
    (enable_external_access off; DuckDB then fills allowed_paths with the file and its WAL files,
    and allowed_directories with its temp folder, and nothing else), and no automatic extension
    install or load. `lock_down` then locks the configuration so no SET undoes any of it."""
    return {"enable_external_access": False, "autoinstall_known_extensions": False,
            "autoload_known_extensions": False, "allow_community_extensions": False}


def lock_down(con) -> None:
    """After the session settings (no progress bar on the terminal), lock the configuration."""
    con.execute("SET enable_progress_bar = false")
    con.execute("SET lock_configuration = true")


def connect(path: str | os.PathLike, read_only: bool = False, config: dict | None = None,
            lock_wait: float | None = None):
    """Open the warehouse, creating its directory when writing; migrate when writable. A file that
    DuckDB cannot read back (truncated, overwritten) is refused with one line naming the fix.
    Another process's lock is retried for `lock_wait` seconds (default MSM_DB_LOCK_WAIT, 3)."""
    import duckdb

    path = Path(path)
    _check_path(path, read_only)
    if not read_only:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WarehouseError(f"cannot create {path.parent}: {exc.strerror}", "choose a writable --db path") from None
    existed = path.exists() and path.stat().st_size > 0
    deadline = time.monotonic() + (LOCK_WAIT_S if lock_wait is None else lock_wait)
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only, config=config or {})
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
            if "not a valid DuckDB database" in message and not _has_duckdb_magic(path):
                raise WarehouseError(f"{path} is not a DuckDB database", "pass the path of an msm warehouse, or a "
                                     "new file name (a damaged warehouse: `msm warehouse restore --from DIR`)") from None
            reraise_damage(exc, path)
            raise WarehouseError(f"cannot open {path}: {message.removeprefix('IO Error: ')}", "check the --db path") from None
        except duckdb.Error as exc:
            reraise_damage(exc, path)
            raise
    try:
        if existed:
            check_length(con, path)
        if read_only:
            _check_schema(con, path)
        else:
            migrate(con)
    except duckdb.Error as exc:
        con.close()
        reraise_damage(exc, path)
        raise
    except BaseException:
        con.close()
        raise
    return con


def _has_duckdb_magic(path: Path) -> bool:
    """DuckDB files carry 'DUCK' at byte 8; a file with it whose header does not read is damaged,
    a file without it is something else."""
    with open(path, "rb") as fh:
        return fh.read(12)[8:12] == b"DUCK"


def check_length(con, path: Path) -> None:
    """A truncated file (a full disk, a copy cut short) fails here, at open, instead of in the first
    query that reaches a missing block. Cheap when the file is as long as its header says; otherwise
    the highest block any table's data uses must lie inside the file."""
    total, block = con.execute("SELECT total_blocks, block_size FROM pragma_database_size() "
                               "WHERE database_name = current_database()").fetchone()
    size = path.stat().st_size
    if size >= HEADER_BYTES + total * block:
        return
    highest = -1
    for (name,) in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                               "AND schema_name = 'main'").fetchall():
        top = con.execute("SELECT max(block_id) FROM pragma_storage_info(?) WHERE persistent AND block_id >= 0",
                          [name]).fetchone()[0]
        highest = max(highest, top if top is not None else -1)
    need = HEADER_BYTES + (highest + 1) * block
    if size < need:
        raise damaged(path, f"the file is {size:,} bytes, its data reaches byte {need:,}: it was cut short")


def verify(path: str | os.PathLike) -> list[str]:
    """Read every block of the warehouse (each column of each table) so DuckDB checks every
    checksum; returns the problems found (an empty list: the file is whole). Opens read-only."""
    import duckdb

    path = Path(path)
    try:
        con = connect(path, read_only=True)
    except WarehouseError as exc:
        return [str(exc)]
    problems = []
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = "
                                            "current_database() AND schema_name = 'main' ORDER BY 1").fetchall()]
        for name in tables:
            try:
                con.execute(f'SELECT count(*), bit_xor(hash(COLUMNS(*))) FROM "{name}"').fetchall()
            except duckdb.Error as exc:
                problems.append(str(damaged(path, f"table {name}: {str(exc).splitlines()[0]}")))
                break  # DuckDB may refuse further reads after a corrupt block
    except duckdb.Error as exc:
        problems.append(str(damaged(path, exc)))
    finally:
        con.close()
    return problems


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
    """Apply every migration the file has not recorded, in order, each in its own transaction (by
    recorded set, not by the highest version: a migration numbered below one already applied, as
    when branches land out of order, is still applied)."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
        " applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
    )
    have = current_version(con)
    if have > latest_version():
        raise WarehouseError(f"warehouse schema v{have} is newer than this msm knows (v{latest_version()})", "upgrade msm")
    recorded = {v for (v,) in con.execute("SELECT version FROM schema_version").fetchall()}
    applied = []
    for version, name, sql in migrations():
        if version in recorded:
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


def work_lock_wait() -> float:
    """Seconds a write that follows paid or long work waits for the lock: $MSM_LOAD_LOCK_WAIT, else an hour."""
    raw = os.environ.get("MSM_LOAD_LOCK_WAIT")
    if raw is None:
        return WORK_LOCK_WAIT_S
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise MsmError(f"MSM_LOAD_LOCK_WAIT={raw!r} is not a number of seconds", "set it to e.g. 600") from None


def connect_after_work(path, what: str, wait_s: float | None = None, read_only: bool = False):
    """Open the warehouse to record work already done (a build's load, a demo set, an eval's results,
    a training run): while another process holds the lock, say once on stderr who holds it, and wait
    up to `wait_s` (default work_lock_wait()) instead of failing after MSM_DB_LOCK_WAIT's seconds."""
    import sys

    wait_s = work_lock_wait() if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            return connect(path, read_only=read_only, lock_wait=0)
        except WarehouseError as exc:
            if "in use by another process" not in exc.problem:
                raise
            if time.monotonic() >= deadline:
                raise WarehouseError(f"{exc.problem}, still after waiting {wait_s:.0f} s to record {what}",
                                     "when it is free, rerun the same command: finished calls come from the "
                                     "call cache, nothing is paid again (MSM_LOAD_LOCK_WAIT sets the wait)") from None
            if not said:
                print(f"waiting for the warehouse: {exc.problem}; {what} is recorded when it is free "
                      f"(up to {wait_s:.0f} s, MSM_LOAD_LOCK_WAIT)", file=sys.stderr, flush=True)
                said = True
            time.sleep(0.5)


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


# ---- backup and restore -------------------------------------------------------------------------
MANIFEST = "manifest.json"
BACKUP_DB = "msm.duckdb"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _attach_copy(source: Path, target: Path) -> None:
    """COPY FROM DATABASE: every table, view, constraint and row of `source` into a new file `target`,
    which DuckDB writes compactly; reading every block checks every checksum on the way."""
    import duckdb

    con = duckdb.connect()
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                con.execute("ATTACH ? AS src (READ_ONLY)", [str(source)])
                break
            except duckdb.IOException as exc:
                if "Conflicting lock" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                if "Conflicting lock" in str(exc):
                    pid = re.search(r"PID (\d+)", str(exc))
                    raise WarehouseError(f"database {source} is in use by another process"
                                         f"{f' (PID {pid.group(1)})' if pid else ''}",
                                         "wait for it to finish, then back up") from None
                reraise_damage(exc, source)
                raise
        con.execute("ATTACH ? AS dst", [str(target)])
        try:
            con.execute("COPY FROM DATABASE src TO dst")
        except duckdb.Error as exc:
            reraise_damage(exc, source)
            raise
        con.execute("DETACH dst")
        con.execute("DETACH src")
    finally:
        con.close()


def _counts(path: Path) -> tuple[int, dict[str, int]]:
    con = connect(path, read_only=True)
    try:
        tables = {name: con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for (name,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = 'main' "
            "ORDER BY 1").fetchall()}
        return current_version(con), tables
    finally:
        con.close()


def backup(db: str | os.PathLike, cache_root: str | os.PathLike, to: str | os.PathLike) -> dict:
    """Write a backup of the warehouse (and the call cache beside it) to a new directory `to`.

    The warehouse is copied with DuckDB's COPY FROM DATABASE under a read lock (a consistent state,
    every block's checksum read), the cache with SQLite's online backup. Everything is written to a
    hidden sibling directory first and renamed into place, so `to` holds a whole backup or nothing.
    A manifest records each file's sha256, the schema version and every table's row count."""
    import datetime
    import json
    import shutil

    from msm.llm.cache import backup_files

    db, cache_root, to = Path(db), Path(cache_root), Path(to)
    if not db.is_file():
        raise WarehouseError(f"no warehouse at {db}", "run `msm warehouse init` first, or pass --db")
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise WarehouseError(f"--to {to} already exists and is not an empty directory",
                             "pass a new directory for each backup")
    connect(db, read_only=True).close()  # damaged, locked or newer: one line now, before any file is written
    staging = to.parent / f".{to.name}.partial-{os.getpid()}"
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise WarehouseError(f"cannot create {staging.parent}: {exc.strerror}", "choose a writable --to") from None
    try:
        _attach_copy(db, staging / BACKUP_DB)
        version, tables = _counts(staging / BACKUP_DB)
        source_version, source_tables = _counts(db)
        if (version, tables) != (source_version, source_tables):
            raise WarehouseError(f"the copy of {db} does not match it (schema or row counts differ)",
                                 "run `msm doctor`, then back up again")
        cache = backup_files(cache_root, staging / "cache")
        files = {str(p.relative_to(staging)): _sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = {"format": 1, "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "source": {"db": str(db.resolve()), "cache": str(cache_root.resolve())},
                    "schema_version": version, "tables": tables, "cache_calls": cache, "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if to.exists():
            to.rmdir()
        os.replace(staging, to)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def read_backup(src: str | os.PathLike) -> dict:
    """A backup directory's manifest, after checking every file against its sha256."""
    import json

    src = Path(src)
    path = src / MANIFEST
    if not path.is_file():
        raise WarehouseError(f"{src} holds no msm backup (no {MANIFEST})",
                             "pass a directory written by `msm warehouse backup --to DIR`")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise WarehouseError(f"{path} is not a backup manifest", "use another backup") from None
    for rel, digest in files.items():
        file = src / rel
        if not file.is_file() or _sha256(file) != digest:
            raise WarehouseError(f"backup {src} is damaged: {rel} is {'missing' if not file.is_file() else 'changed'}",
                                 "use another backup")
    if BACKUP_DB not in files:
        raise WarehouseError(f"backup {src} has no {BACKUP_DB}", "use another backup")
    return manifest


def restore(src: str | os.PathLike, db: str | os.PathLike, cache_root: str | os.PathLike) -> dict:
    """Put a backup's warehouse in place of `db`, and bring back its call cache.

    The backup is checked first (sha256 of every file, then its row counts against the manifest). The
    current warehouse file, if any, is kept as `NAME.before-restore-STAMP` (with its WAL), never
    deleted; the restored file is copied under a temporary name and renamed into place. A healthy
    call cache keeps every answer it has and gains the backup's; a damaged one is set aside and
    replaced. Refused while another process holds the warehouse."""
    import datetime
    import shutil

    import duckdb

    from msm.llm.cache import restore_files

    src, db, cache_root = Path(src), Path(db), Path(cache_root)
    manifest = read_backup(src)
    if (manifest["schema_version"], manifest["tables"]) != _counts(src / BACKUP_DB):
        raise WarehouseError(f"backup {src}: {BACKUP_DB} does not hold the rows its manifest lists", "use another backup")
    if db.is_dir():
        raise WarehouseError(f"--db {db} is a directory", "pass a file path such as .msm/msm.duckdb")
    if db.exists():  # another process holding the file must finish first; a damaged file is fine to replace
        try:
            duckdb.connect(str(db), read_only=True).close()
        except duckdb.Error as exc:
            if "Conflicting lock" in str(exc):
                pid = re.search(r"PID (\d+)", str(exc))
                raise WarehouseError(f"database {db} is in use by another process"
                                     f"{f' (PID {pid.group(1)})' if pid else ''}",
                                     "stop it, then restore") from None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    db.parent.mkdir(parents=True, exist_ok=True)
    staged = db.with_name(db.name + ".restoring")
    shutil.copyfile(src / BACKUP_DB, staged)
    kept = []
    for side in (db, db.with_name(db.name + ".wal")):
        if side.exists():
            aside = side.with_name(side.name + f".before-restore-{stamp}")
            os.replace(side, aside)
            kept.append(str(aside))
    os.replace(staged, db)
    cache = restore_files(src / "cache", cache_root, stamp) if (src / "cache").is_dir() else {}
    return {"schema_version": manifest["schema_version"], "tables": manifest["tables"], "kept": kept,
            "cache": cache, "created_at": manifest.get("created_at")}
