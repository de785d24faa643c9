"""The call cache: a response stored under its request key is never paid for twice.

SQLite in WAL mode takes many concurrent writer processes on local disk (datatrove runs many
workers). Its locking is unreliable on the network filesystems Slurm clusters use, so a worker
may instead write its own shard file (`shard=` or $MSM_CACHE_SHARD); reads consult every shard,
and `merge_shards` folds them into the main file. Errors are stored as errors and never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path

from msm.errors import MsmError
from msm.llm.types import Request, Response, Usage

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    purpose TEXT NOT NULL,
    request TEXT NOT NULL,
    text TEXT,
    stop_reason TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    latency_s REAL NOT NULL DEFAULT 0,
    batch INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_created ON calls (created_at);
-- A system prefix (a whole spec) is shared by thousands of requests: stored once, by hash.
CREATE TABLE IF NOT EXISTS prefixes (
    hash TEXT PRIMARY KEY,
    text TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    items TEXT NOT NULL,          -- JSON: custom_id -> request key
    status TEXT NOT NULL,         -- submitted, ended, collected
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""

COLUMNS = ("key", "backend", "model", "purpose", "request", "text", "stop_reason", "input_tokens", "output_tokens",
           "cache_read_tokens", "cache_write_tokens", "cost_usd", "latency_s", "batch", "error", "attempts", "created_at")


class CacheError(MsmError):
    """The cache file cannot be opened or written."""


def _open(path: Path, attempts: int = 40) -> sqlite3.Connection:
    """Open (and create) a cache file; retries the brief lock two processes meet when both
    switch a fresh file to WAL, a case where SQLite skips its busy handler."""
    for attempt in range(attempts):
        con = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA busy_timeout=60000")
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.executescript(SCHEMA)
            return con
        except sqlite3.OperationalError as exc:
            if con is not None:
                con.close()
            if _is_lock_error(exc) and attempt + 1 < attempts:
                time.sleep(min(0.05 * (attempt + 1), 0.5))
                continue
            raise _cannot_open(path, str(exc)) from None
        except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
            if con is not None:
                con.close()
            raise damaged(path, exc) from None
        except OSError as exc:
            raise _cannot_open(path, exc.strerror or str(exc)) from None
    raise AssertionError("unreachable")


def _is_lock_error(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def damaged(path: Path, exc: BaseException | str) -> CacheError:
    """The one-line error for a call-cache file SQLite cannot read."""
    return CacheError(f"the call cache {path} is damaged ({str(exc).splitlines()[0] if str(exc) else 'unreadable'})",
                      f"restore it with `msm warehouse restore --from DIR`, or move it aside (mv {path} {path}.bad) "
                      "and rerun: answers no longer cached are asked again")


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    return not isinstance(exc, sqlite3.OperationalError) or "malformed" in str(exc) or "not a database" in str(exc)


def check_file(path: str | os.PathLike) -> str | None:
    """What is wrong with one cache file (SQLite's quick_check, and the calls table), or None.
    Opens it read-only and changes nothing."""
    path = Path(path)
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        return str(damaged(path, exc))
    try:
        verdict = [row[0] for row in con.execute("PRAGMA quick_check")]
        if verdict != ["ok"]:
            return str(damaged(path, "; ".join(verdict[:2])))
        if not con.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'calls'").fetchone()[0]:
            return str(damaged(path, "no calls table: not an msm call cache"))
        con.execute("SELECT count(*), sum(length(text)) FROM calls").fetchone()
    except sqlite3.Error as exc:
        return str(damaged(path, exc))
    finally:
        con.close()
    return None


def cache_files(root: str | os.PathLike) -> list[Path]:
    """The main cache file and every shard under a cache root, those that exist."""
    root = Path(root)
    shards = sorted((root / "shards").glob("calls-*.sqlite")) if (root / "shards").is_dir() else []
    return [p for p in [root / "calls.sqlite", *shards] if p.is_file()]


def backup_files(root: str | os.PathLike, dest: str | os.PathLike) -> dict[str, int]:
    """Copy every cache file under `root` into `dest` (same layout) with SQLite's online backup, which
    is consistent while workers write; returns {relative path: calls}. A damaged file is refused."""
    root, dest = Path(root), Path(dest)
    copied = {}
    for path in cache_files(root):
        problem = check_file(path)
        if problem:
            raise CacheError(problem.split("; ", 1)[0], "restore the cache first (`msm warehouse restore --from DIR`), "
                             f"or move {path} aside")
        rel = path.relative_to(root)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        out = sqlite3.connect(str(dest / rel))
        try:
            src.backup(out)
            copied[str(rel)] = out.execute("SELECT count(*) FROM calls").fetchone()[0]
        finally:
            out.close()
            src.close()
    return copied


def restore_files(src: str | os.PathLike, root: str | os.PathLike, stamp: str) -> dict[str, str]:
    """Bring a backed-up cache back under `root`. A live, healthy cache file keeps every answer it has
    and gains the backup's (newer paid calls are never lost); a missing one is copied in; a damaged
    one is moved aside (`NAME.before-restore-STAMP`) and replaced. Returns {relative path: action}."""
    import shutil

    src, root = Path(src), Path(root)
    actions = {}
    for backup in cache_files(src):
        rel = backup.relative_to(src)
        live = root / rel
        if live.is_file() and check_file(live) is None:
            con = _open(live)
            try:
                con.execute("ATTACH DATABASE ? AS restored", [str(backup)])
                updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "key")
                con.execute("BEGIN")
                added = con.execute(
                    f"INSERT INTO calls SELECT {', '.join(COLUMNS)} FROM restored.calls WHERE true ON CONFLICT(key) "
                    f"DO UPDATE SET {updates} WHERE calls.error IS NOT NULL AND excluded.error IS NULL").rowcount
                con.execute("INSERT OR IGNORE INTO prefixes SELECT * FROM restored.prefixes")
                con.execute("INSERT OR IGNORE INTO batches SELECT * FROM restored.batches")
                con.execute("COMMIT")
                con.execute("DETACH DATABASE restored")
            finally:
                con.close()
            actions[str(rel)] = f"merged ({added} call(s) added)"
            continue
        live.parent.mkdir(parents=True, exist_ok=True)
        if live.exists():
            for suffix in ("", "-wal", "-shm"):
                side = live.with_name(live.name + suffix)
                if side.exists():
                    os.replace(side, side.with_name(side.name + f".before-restore-{stamp}"))
        tmp = live.with_name(live.name + ".restoring")
        shutil.copyfile(backup, tmp)
        os.replace(tmp, live)
        actions[str(rel)] = "replaced" if (root / rel).with_name(live.name + f".before-restore-{stamp}").exists() \
            else "copied"
    return actions


def _cannot_open(path: Path, reason: str) -> CacheError:
    return CacheError(f"cannot open the call cache at {path}: {reason}",
                      "set MSM_HOME (or the cache path) to a writable local directory")


@contextlib.contextmanager
def _reading(path: Path):
    """A damaged file met mid-run (SQLite checks pages as it reads them) is one line naming it."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if _is_damage(exc):
            raise damaged(path, exc) from None
        raise


class CallCache:
    def __init__(self, root: str | os.PathLike, shard: str | None = None):
        self.root = Path(root)
        self.shard = shard if shard is not None else os.environ.get("MSM_CACHE_SHARD") or None
        self.main_path = self.root / "calls.sqlite"
        self.write_path = self.root / "shards" / f"calls-{self.shard}.sqlite" if self.shard else self.main_path
        self._writer = _open(self.write_path)
        self._prefixes_written: set[str] = set()
        self._readers: dict[Path, sqlite3.Connection] = {self.write_path: self._writer}

    # ---- reading -----------------------------------------------------------------------
    def _paths(self) -> list[Path]:
        shards = sorted((self.root / "shards").glob("calls-*.sqlite")) if (self.root / "shards").is_dir() else []
        return [self.main_path, *[p for p in shards if p != self.main_path]]

    def _reader(self, path: Path) -> sqlite3.Connection | None:
        if path not in self._readers:
            if not path.exists():
                return None
            self._readers[path] = _open(path)
        return self._readers[path]

    def get(self, key: str) -> Response | None:
        """The stored answer for a key; errors are never returned as answers."""
        for path in self._paths():
            con = self._reader(path)
            if con is None:
                continue
            with _reading(path):
                row = con.execute(f"SELECT {', '.join(COLUMNS)} FROM calls WHERE key = ? AND error IS NULL",
                                  [key]).fetchone()
            if row:
                return _row_to_response(dict(zip(COLUMNS, row)))
        return None

    def rows(self, keys: list[str]) -> dict[str, dict]:
        """Stored rows (answers win over errors) for these keys, from every shard."""
        found: dict[str, dict] = {}
        wanted = list(dict.fromkeys(keys))
        for path in self._paths():
            con = self._reader(path)
            if con is None:
                continue
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                marks = ", ".join("?" for _ in chunk)
                with _reading(path):
                    found_rows = con.execute(f"SELECT {', '.join(COLUMNS)} FROM calls WHERE key IN ({marks})",
                                             chunk).fetchall()
                for row in found_rows:
                    record = dict(zip(COLUMNS, row))
                    if record["key"] not in found or found[record["key"]]["error"] is not None:
                        found[record["key"]] = record
        return found

    # ---- writing -----------------------------------------------------------------------
    def put(self, request: Request, response: Response, attempts: int = 1) -> None:
        """Store an answer, or an error; an error never overwrites an answer."""
        row = {
            "key": response.key, "backend": response.backend, "model": response.model, "purpose": request.purpose,
            "request": self._request_json(request), "text": response.text,
            "stop_reason": response.stop_reason, "input_tokens": response.usage.input_tokens,
            "output_tokens": response.usage.output_tokens, "cache_read_tokens": response.usage.cache_read_tokens,
            "cache_write_tokens": response.usage.cache_write_tokens, "cost_usd": response.cost_usd,
            "latency_s": response.latency_s, "batch": int(response.batch), "error": response.error,
            "attempts": attempts, "created_at": time.time(),
        }
        names = ", ".join(COLUMNS)
        marks = ", ".join("?" for _ in COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "key")
        try:
            self._writer.execute(
                f"INSERT INTO calls ({names}) VALUES ({marks}) ON CONFLICT(key) DO UPDATE SET {updates}"
                " WHERE calls.error IS NOT NULL",
                [row[c] for c in COLUMNS],
            )
        except sqlite3.OperationalError as exc:
            if _is_damage(exc):
                raise damaged(self.write_path, exc) from None
            raise self._cannot_write(exc) from None
        except sqlite3.DatabaseError as exc:
            raise damaged(self.write_path, exc) from None

    def put_record(self, key: str, backend: str, model: str, purpose: str, request: dict, text: str,
                   stop_reason: str) -> None:
        """Store an answer that is not a chat completion (a log-probability score, say) under its key."""
        row = {"key": key, "backend": backend, "model": model, "purpose": purpose,
               "request": json.dumps(request, ensure_ascii=False), "text": text, "stop_reason": stop_reason,
               "input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0,
               "cost_usd": 0.0, "latency_s": 0.0, "batch": 0, "error": None, "attempts": 1, "created_at": time.time()}
        try:
            self._writer.execute(f"INSERT OR IGNORE INTO calls ({', '.join(COLUMNS)}) VALUES "
                                 f"({', '.join('?' for _ in COLUMNS)})", [row[c] for c in COLUMNS])
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and not _is_damage(exc):
                raise self._cannot_write(exc) from None
            raise damaged(self.write_path, exc) from None

    def _cannot_write(self, exc: sqlite3.OperationalError) -> CacheError:
        if "full" in str(exc).lower():  # SQLITE_FULL: the disk, or a quota
            fix = "free some space on that disk, then rerun the same command (stored calls are kept)"
        else:
            fix = "use a writable local directory for MSM_HOME"
        return CacheError(f"cannot write the call cache at {self.write_path}: {exc}", fix)

    def _request_json(self, request: Request) -> str:
        """The request as JSON, its system prefix replaced by {"sha256": ...} (see `request`)."""
        fields = asdict(request)
        prefix = fields.get("system_prefix")
        if prefix:
            digest = hashlib.sha256(prefix.encode()).hexdigest()
            if digest not in self._prefixes_written:
                self._writer.execute("INSERT OR IGNORE INTO prefixes VALUES (?, ?)", [digest, prefix])
                self._prefixes_written.add(digest)
            fields["system_prefix"] = {"sha256": digest}
        return json.dumps(fields, ensure_ascii=False)

    def request(self, key: str) -> dict | None:
        """The stored request for a key, with its system prefix filled back in."""
        for path in self._paths():
            con = self._reader(path)
            with _reading(path):
                row = con.execute("SELECT request FROM calls WHERE key = ?", [key]).fetchone() if con else None
            if row:
                fields = json.loads(row[0])
                ref = fields.get("system_prefix")
                if isinstance(ref, dict):
                    fields["system_prefix"] = self._prefix_text(ref["sha256"])
                return fields
        return None

    def _prefix_text(self, digest: str) -> str | None:
        for path in self._paths():
            con = self._reader(path)
            row = con.execute("SELECT text FROM prefixes WHERE hash = ?", [digest]).fetchone() if con else None
            if row:
                return row[0]
        return None

    # ---- batches -----------------------------------------------------------------------
    def save_batch(self, batch_id: str, backend: str, model: str, items: dict[str, str]) -> None:
        now = time.time()
        self._writer.execute(
            "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, 'submitted', ?, ?)",
            [batch_id, backend, model, json.dumps(items), now, now],
        )

    def set_batch_status(self, batch_id: str, status: str) -> None:
        self._writer.execute("UPDATE batches SET status = ?, updated_at = ? WHERE batch_id = ?",
                             [status, time.time(), batch_id])

    def open_batches(self, backend: str, model: str) -> list[tuple[str, dict[str, str]]]:
        """Submitted batches whose results were not collected yet: resume these, never resubmit."""
        rows = self._writer.execute(
            "SELECT batch_id, items FROM batches WHERE backend = ? AND model = ? AND status != 'collected'"
            " ORDER BY created_at", [backend, model]).fetchall()
        return [(bid, json.loads(items)) for bid, items in rows]

    # ---- maintenance -------------------------------------------------------------------
    def stats(self) -> dict:
        totals = {"files": 0, "bytes": 0, "calls": 0, "errors": 0, "cost_usd": 0.0, "by": []}
        groups: dict[tuple, list] = {}
        for path in self._paths():
            con = self._reader(path)
            if con is None:
                continue
            totals["files"] += 1
            totals["bytes"] += sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
            with _reading(path):
                grouped = con.execute(
                    "SELECT backend, model, purpose, count(*), sum(error IS NOT NULL), sum(cost_usd),"
                    " sum(input_tokens), sum(output_tokens), sum(cache_read_tokens) FROM calls GROUP BY 1, 2, 3"
                ).fetchall()
            for backend, model, purpose, n, errors, cost, tin, tout, cread in grouped:
                g = groups.setdefault((backend, model, purpose), [0, 0, 0.0, 0, 0, 0])
                for i, v in enumerate((n, errors, cost, tin, tout, cread)):
                    g[i] += v or 0
        for (backend, model, purpose), (n, errors, cost, tin, tout, cread) in sorted(groups.items()):
            totals["calls"] += n
            totals["errors"] += errors
            totals["cost_usd"] += cost
            totals["by"].append({"backend": backend, "model": model, "purpose": purpose, "calls": n, "errors": errors,
                                 "cost_usd": cost, "input_tokens": tin, "output_tokens": tout, "cache_read_tokens": cread})
        return totals

    def prune(self, older_than_s: float | None = None, errors: bool = False) -> int:
        clauses, args = [], []
        if older_than_s is not None:
            clauses.append("created_at < ?")
            args.append(time.time() - older_than_s)
        if errors:
            clauses.append("error IS NOT NULL")
        if not clauses:
            return 0
        removed = 0
        for path in self._paths():
            con = self._reader(path)
            if con is not None:
                removed += con.execute(f"DELETE FROM calls WHERE {' AND '.join(clauses)}", args).rowcount
        return removed

    def merge_shards(self) -> int:
        """Fold every shard into the main file (answers win over errors); returns rows merged."""
        main = self._reader(self.main_path) or _open(self.main_path)
        self._readers[self.main_path] = main
        merged = 0
        for path in self._paths()[1:]:
            self._reader(path)  # brings an older shard's schema up to date
            main.execute("ATTACH DATABASE ? AS shard", [str(path)])
            try:
                updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "key")
                merged += main.execute(
                    f"INSERT INTO calls SELECT * FROM shard.calls WHERE true ON CONFLICT(key) DO UPDATE SET {updates}"
                    " WHERE calls.error IS NOT NULL AND excluded.error IS NULL").rowcount
                main.execute("INSERT OR IGNORE INTO batches SELECT * FROM shard.batches")
                main.execute("INSERT OR IGNORE INTO prefixes SELECT * FROM shard.prefixes")
            finally:
                main.execute("DETACH DATABASE shard")
        return merged

    def close(self) -> None:
        for con in self._readers.values():
            con.close()
        self._readers.clear()


def _row_to_response(row: dict) -> Response:
    return Response(
        text=row["text"] or "", stop_reason=row["stop_reason"] or "", cost_usd=row["cost_usd"],
        usage=Usage(row["input_tokens"], row["output_tokens"], row["cache_read_tokens"], row["cache_write_tokens"]),
        latency_s=row["latency_s"], backend=row["backend"], model=row["model"], key=row["key"], cached=True,
        error=row["error"], batch=bool(row["batch"]),
    )
