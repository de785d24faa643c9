"""`msm warehouse sql` without --write reads the warehouse and changes nothing, by DuckDB's own
settings; every statement's result prints; results stream (issue 20, case 2)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_one_line_error, run_msm


def snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        if root.exists():
            out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()})
            out.update({str(p): "dir" for p in sorted(root.rglob("*")) if p.is_dir()})
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A warehouse with a loaded spec and a small table of our own, made once per module."""
    root = tmp_path_factory.mktemp("sql_template")
    env = {"MSM_HOME": str(root)}
    assert run_msm("spec", "load", str(REPO / "specs" / "rules.md"), env=env, cwd=root).returncode == 0
    made = run_msm("warehouse", "sql", "CREATE TABLE notes AS SELECT range AS id, 'note ' || range AS body "
                   "FROM range(25)", "--write", env=env, cwd=root)
    assert made.returncode == 0, made.stderr
    return root / "msm.duckdb"


@pytest.fixture
def warehouse(template, isolated_home):
    """Each test's own copy of the template warehouse."""
    isolated_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, isolated_home / "msm.duckdb")
    return isolated_home / "msm.duckdb"


def counts(db: Path) -> dict[str, int]:
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        names = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()]
        return {n: con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
    finally:
        con.close()


HOSTILE = [  # (statement, words the one-line error contains)
    ("COPY (SELECT * FROM notes) TO '{out}/copy.csv'", ["reads the warehouse only", "copy.csv", "--write"]),
    ("COPY notes TO '{out}/notes.parquet' (FORMAT parquet)", ["reads the warehouse only", "--write"]),
    ("EXPORT DATABASE '{out}/export'", ["reads the warehouse only", "--write"]),
    ("INSTALL httpfs", ["reads the warehouse only"]),
    ("LOAD httpfs", ["reads the warehouse only", "extensions"]),
    ("SELECT * FROM read_csv('/etc/passwd')", ["reads the warehouse only", "/etc/passwd"]),
    ("SELECT * FROM 'https://example.com/data.parquet'", ["reads the warehouse only"]),
    ("ATTACH '{out}/other.duckdb' AS other", ["reads the warehouse only"]),
    ("SET enable_external_access = true", ["configuration has been locked"]),
    ("SET lock_configuration = false", ["configuration has been locked"]),
    ("SET allowed_directories = ['/']", ["reads the warehouse only"]),
    ("RESET enable_external_access", ["reads the warehouse only"]),
    ("CREATE TABLE x (a INT)", ["writes to the warehouse (CREATE)", "--write"]),
    ("DELETE FROM notes", ["writes to the warehouse (DELETE)", "--write"]),
    ("SELECT 1; DROP TABLE notes", ["writes to the warehouse (DROP)", "--write"]),
]


@pytest.mark.parametrize("statement, needles", HOSTILE, ids=[h[0][:32] for h in HOSTILE])
def test_read_only_sql_changes_nothing(tmp_path, warehouse, statement, needles):
    out = tmp_path / "elsewhere"
    out.mkdir()
    home = tmp_path / "home"  # where DuckDB would install extensions
    home.mkdir()
    before, rows = snapshot(tmp_path), counts(warehouse)
    result = run_msm("warehouse", "sql", statement.format(out=out), env={"HOME": str(home)})
    assert_one_line_error(result, *needles)
    assert snapshot(tmp_path) == before  # warehouse file, the target folder, ~/.duckdb: byte for byte
    assert counts(warehouse) == rows


def test_the_sandbox_is_duckdbs_own_settings(warehouse):
    settings = run_msm("warehouse", "sql", "SELECT name, value FROM duckdb_settings() WHERE name IN "
                       "('enable_external_access', 'autoinstall_known_extensions', 'autoload_known_extensions', "
                       "'lock_configuration', 'allowed_directories', 'allowed_paths') ORDER BY name", "--format", "json")
    assert settings.returncode == 0, settings.stderr
    found = {r["name"]: r["value"] for r in json.loads(settings.stdout)}
    # DuckDB grants the database's own files as the only exceptions: the file, its WAL, its temp folder
    paths = found.pop("allowed_paths").strip("[]").split(", ")
    assert str(warehouse) in paths and f"{warehouse}.wal" in paths
    assert all(p == str(warehouse) or p.startswith(f"{warehouse}.wal") for p in paths), paths
    assert found.pop("allowed_directories") == f"[{warehouse}.tmp/]"
    assert found == {"autoinstall_known_extensions": "false", "autoload_known_extensions": "false",
                     "enable_external_access": "false", "lock_configuration": "true"}


def test_with_write_the_same_statements_run(tmp_path, warehouse):
    target = tmp_path / "notes.csv"
    done = run_msm("warehouse", "sql", f"COPY notes TO '{target}'", "--write")
    assert done.returncode == 0, done.stderr
    assert len(target.read_text().splitlines()) == 26


def test_every_statement_prints_its_result(warehouse):
    out = run_msm("warehouse", "sql", "SELECT count(*) AS n FROM notes; SELECT 'two' AS second, 2 AS k")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "-- statement 1 of 2" and "-- statement 2 of 2" in lines
    assert lines[lines.index("n") + 2] == "25"
    assert any(line.split() == ["two", "2"] for line in lines)
    assert lines.count("(1 row)") == 2


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_several_statements_with_one_result_formats_are_refused(warehouse, fmt):
    before = hashlib.sha256(warehouse.read_bytes()).hexdigest()
    assert_one_line_error(run_msm("warehouse", "sql", "SELECT 1; SELECT 2", "--format", fmt),
                          f"--format {fmt} prints one result", "2 statements", "one at a time")
    assert hashlib.sha256(warehouse.read_bytes()).hexdigest() == before


def test_limit_stops_each_result(warehouse):
    table = run_msm("warehouse", "sql", "SELECT * FROM notes ORDER BY id", "--limit", "3").stdout.splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["0", "1", "2"]
    assert table[-1] == "(3 rows, stopped at --limit 3; more rows not shown)"
    rows = run_msm("warehouse", "sql", "SELECT id FROM notes ORDER BY id", "--limit", "4", "--format", "csv")
    assert list(csv.reader(io.StringIO(rows.stdout))) == [["id"], ["0"], ["1"], ["2"], ["3"]]
    assert "stopped at --limit 4" in rows.stderr
    data = run_msm("warehouse", "sql", "SELECT id FROM notes ORDER BY id", "--limit", "2", "--format", "json")
    assert json.loads(data.stdout) == [{"id": 0}, {"id": 1}]
    whole = run_msm("warehouse", "sql", "SELECT id FROM notes", "--limit", "25").stdout.splitlines()
    assert whole[-1] == "(25 rows)"


@pytest.mark.heavy
def test_a_million_rows_stream_in_bounded_memory(tmp_path, isolated_home):
    """Before streaming, 1M rows took 400 MB (csv) and 595 MB (table) at peak; now about 130 MB."""
    db = tmp_path / "big.duckdb"
    assert run_msm("warehouse", "init", "--db", str(db)).returncode == 0
    assert run_msm("warehouse", "sql", "CREATE TABLE big AS SELECT range AS i, md5(range::VARCHAR) AS s "
                   "FROM range(1000000)", "--write", "--db", str(db)).returncode == 0
    probe = ("import resource, subprocess, sys\n"
             "done = subprocess.run([sys.executable, '-m', 'msm.cli', 'warehouse', 'sql', 'SELECT * FROM big', "
             f"'--format', 'table', '--db', {str(db)!r}], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)\n"
             "lines = done.stdout.count(b'\\n')\n"
             "print(done.returncode, lines, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    rc, lines, peak_kb = map(int, subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                                 check=True, timeout=300).stdout.split())
    assert rc == 0 and lines == 1_000_000 + 3
    assert peak_kb < 250_000, f"peak {peak_kb / 1024:.0f} MiB"
