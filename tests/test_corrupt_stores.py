"""A damaged warehouse or call cache is one line naming the file and the fix, never a traceback and
never a reported success; `msm doctor` checks both; backup and restore bring them back (issue 20,
case 4)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import duckdb
import pytest

from tests.conftest import LOOPBACK_KEY, REPO, assert_one_line_error, run_msm
from tests.test_sql_readonly import counts

ROWS = 300_000


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A home with a warehouse (a spec and a table big enough to span several blocks) and a call cache
    of five answers, made once per module."""
    root = tmp_path_factory.mktemp("stores_template")
    env = {"MSM_HOME": str(root)}
    assert run_msm("spec", "load", str(REPO / "specs" / "rules.md"), env=env, cwd=root).returncode == 0
    made = run_msm("warehouse", "sql", f"CREATE TABLE big AS SELECT range AS i, md5(range::VARCHAR) AS s "
                   f"FROM range({ROWS})", "--write", env=env, cwd=root)
    assert made.returncode == 0, made.stderr
    from msm.llm.cache import CallCache
    from msm.llm.types import Request, Response

    cache = CallCache(root / "cache")
    for i in range(5):
        request = Request.user(f"question {i}", purpose="generate")
        cache.put(request, Response(text=f"answer {i}", stop_reason="end_turn", key=f"k{i}", backend="anthropic",
                                    model="m"))
    cache._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cache.close()
    return root


@pytest.fixture
def warehouse(template, isolated_home):
    """Each test's own copy of the template home; returns its warehouse file."""
    shutil.copytree(template, isolated_home, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    return isolated_home / "msm.duckdb"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def scribble(path: Path) -> None:
    """Random bytes over one block in the middle of the data, as a bad disk sector leaves it."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(os.urandom(8192))


COMMANDS = [
    ["warehouse", "stats"], ["warehouse", "tables"], ["warehouse", "init"], ["corpus", "list"],
    ["warehouse", "sql", "SELECT count(*) FROM big"], ["warehouse", "sql", "DELETE FROM big", "--write"],
    ["spec", "load", str(REPO / "specs" / "general.md")], ["warehouse", "backup", "--to", "{tmp}/backup"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_a_truncated_warehouse_is_one_line_and_stays_as_it_is(tmp_path, warehouse, command):
    truncate(warehouse)
    before, home = sha(warehouse), listing(warehouse.parent)
    result = run_msm(*[part.format(tmp=tmp_path) for part in command])
    line = assert_one_line_error(result, f"the warehouse {warehouse} is damaged", "msm warehouse restore --from DIR")
    assert "cut short" in line or "read enough bytes" in line
    assert sha(warehouse) == before and listing(warehouse.parent) == home  # no WAL, no migration, nothing
    assert not (tmp_path / "backup").exists()


@pytest.mark.parametrize("command", [["warehouse", "init"], ["warehouse", "sql", "SELECT sum(length(s)) FROM big"],
                                     ["warehouse", "backup", "--to", "{tmp}/backup"]], ids=["init", "sql", "backup"])
def test_a_damaged_block_is_found_and_never_reported_as_success(tmp_path, warehouse, command):
    scribble(warehouse)
    before = sha(warehouse)
    result = run_msm(*[part.format(tmp=tmp_path) for part in command])
    assert_one_line_error(result, "is damaged", "checksum", "msm warehouse restore --from DIR")
    assert "migrated" not in result.stdout and sha(warehouse) == before
    assert not (tmp_path / "backup").exists()


def scribble_table(path: Path, table: str) -> list[int]:
    """Random bytes over the blocks that hold one table's data (past each block's checksum), so the file
    opens and its catalog reads, and the damage is met only by a query that reads that table."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        block_size = con.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]
        blocks = [r[0] for r in con.execute(f"SELECT DISTINCT block_id FROM pragma_storage_info('{table}') "
                                            "WHERE block_id >= 0 ORDER BY 1").fetchall()]
    finally:
        con.close()
    from warehouse.db import HEADER_BYTES

    with open(path, "r+b") as fh:
        for block in blocks:
            fh.seek(HEADER_BYTES + block * block_size + 64)
            fh.write(os.urandom(4096))
    return blocks


def test_a_damaged_block_met_mid_query_outside_msm_warehouse_is_one_line(warehouse):
    """`msm spec load` opens the file fine and meets the bad block at its first SELECT on specs: the CLI
    turns DuckDB's checksum error into the same one line as `msm warehouse` commands, file unchanged."""
    assert scribble_table(warehouse, "specs")
    before, home = sha(warehouse), listing(warehouse.parent)
    for extra in ([], ["--db", str(warehouse)]):
        result = run_msm("spec", "load", str(REPO / "specs" / "rules.md"), *extra, cwd=warehouse.parent)
        assert_one_line_error(result, f"the warehouse {warehouse} is damaged", "checksum",
                              "msm warehouse restore --from DIR")
        assert "recorded" not in result.stdout
    assert sha(warehouse) == before and listing(warehouse.parent) == home


def test_a_junk_call_cache_is_one_line_and_stays_as_it_is(tmp_path, warehouse, loopback):
    junk = warehouse.parent / "cache" / "calls.sqlite"
    for side in ("-wal", "-shm"):
        junk.with_name(junk.name + side).unlink(missing_ok=True)
    junk.write_bytes(b"this is not a database, it is a note left by mistake\n" * 100)
    before = sha(junk)
    needles = [f"the call cache {junk} is damaged", "file is not a database", "msm warehouse restore", "mv"]
    assert_one_line_error(run_msm("cache", "stats"), *needles)
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "a-1", "domain": "art", "prompt": "Which paints?", "options": {
        "A": "Student acrylics for 20 euros.", "B": "Hand-ground pigments for 600 euros."},
        "consistent_with": {"affordability": "A"}, "split": "held_out"}) + "\n")
    assert_one_line_error(run_msm("eval", "run", "preferences", "--model", "m", "--backend", "openai", "--base-url",
                                  f"{loopback.url}/v1", "--target", "affordability", "--items", str(items),
                                  env={"OPENAI_API_KEY": LOOPBACK_KEY}), *needles)
    assert loopback.stats.requests["completions"] == 0  # nothing asked, so nothing paid for and lost
    assert sha(junk) == before


def test_doctor_checks_the_warehouse_and_the_call_cache(warehouse):
    healthy = run_msm("doctor")
    assert "[ok  ] warehouse:" in healthy.stdout and "[ok  ] call cache: 1 file(s)" in healthy.stdout
    truncate(warehouse)
    (warehouse.parent / "cache" / "calls.sqlite").write_bytes(b"junk" * 2000)
    result = run_msm("doctor")
    assert result.returncode != 0 and "all checks passed" not in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    bad_db = next(line for line in lines if line.startswith("[FAIL] warehouse:"))
    assert "is damaged" in bad_db and "-> restore a backup with `msm warehouse restore --from DIR`" in bad_db
    bad_cache = next(line for line in lines if line.startswith("[FAIL] call cache:"))
    assert "calls.sqlite is damaged" in bad_cache and "msm warehouse restore" in bad_cache


def test_backup_then_restore_brings_back_a_damaged_warehouse_and_cache(tmp_path, warehouse):
    rows = counts(warehouse)
    made = run_msm("warehouse", "backup", "--to", str(tmp_path / "b1"))
    assert made.returncode == 0, made.stderr
    assert f"{sum(rows.values()):,} rows" in made.stdout and "5 calls" in made.stdout
    manifest = json.loads((tmp_path / "b1" / "manifest.json").read_text())
    assert manifest["tables"] == rows and set(manifest["files"]) == {"msm.duckdb", "cache/calls.sqlite"}
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    # damage both stores, then restore
    truncate(warehouse)
    damaged = sha(warehouse)
    junk = warehouse.parent / "cache" / "calls.sqlite"
    for side in ("-wal", "-shm"):
        junk.with_name(junk.name + side).unlink(missing_ok=True)
    junk.write_bytes(b"junk" * 2000)
    done = run_msm("warehouse", "restore", "--from", str(tmp_path / "b1"))
    assert done.returncode == 0, done.stderr
    assert counts(warehouse) == rows
    kept = [p for p in warehouse.parent.iterdir() if p.name.startswith("msm.duckdb.before-restore-")]
    assert len(kept) == 1 and sha(kept[0]) == damaged  # the damaged file is kept, not deleted
    assert "call cache calls.sqlite: replaced" in done.stdout
    stats = run_msm("cache", "stats")
    assert stats.returncode == 0 and "calls: 5" in stats.stdout
    assert run_msm("warehouse", "stats").returncode == 0


def test_restore_merges_a_healthy_cache_and_refuses_bad_backups(tmp_path, warehouse):
    assert run_msm("warehouse", "backup", "--to", str(tmp_path / "b1")).returncode == 0
    from msm.llm.cache import CallCache
    from msm.llm.types import Request, Response

    cache = CallCache(warehouse.parent / "cache")  # a call paid for after the backup
    cache.put(Request.user("a newer question", purpose="generate"),
              Response(text="newer", stop_reason="end_turn", key="newer", backend="anthropic", model="m"))
    cache.close()
    before, home = sha(warehouse), listing(warehouse.parent)
    # refusals: each one line, and nothing in the home changes
    assert_one_line_error(run_msm("warehouse", "backup", "--to", str(tmp_path / "b1")), "not an empty directory",
                          "new directory")
    assert_one_line_error(run_msm("warehouse", "restore", "--from", str(tmp_path)), "holds no msm backup",
                          "msm warehouse backup --to DIR")
    tampered = tmp_path / "b2"
    shutil.copytree(tmp_path / "b1", tampered)
    with open(tampered / "msm.duckdb", "r+b") as fh:
        fh.seek(20_000)
        fh.write(b"\xff" * 16)
    assert_one_line_error(run_msm("warehouse", "restore", "--from", str(tampered)), "is damaged: msm.duckdb is changed",
                          "another backup")
    assert sha(warehouse) == before and listing(warehouse.parent) == home
    # a healthy live cache keeps the newer call and gains nothing it already has
    done = run_msm("warehouse", "restore", "--from", str(tmp_path / "b1"))
    assert done.returncode == 0, done.stderr
    assert "call cache calls.sqlite: merged (0 call(s) added)" in done.stdout
    stats = run_msm("cache", "stats")
    assert "calls: 6" in stats.stdout
