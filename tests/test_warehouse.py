"""The DuckDB warehouse: migrations, idempotent loading, locks, views and output formats."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap

import pytest

from corpus.spec import parse_spec_text
from msm.tokens import TokenCounter
from tests.conftest import assert_one_line_error, run_msm
from warehouse.db import connect, current_version, latest_version, migrate
from warehouse.specs import record_spec

WORDS = TokenCounter("words", lambda texts: [len(t.split()) for t in texts])


def test_init_creates_schema_and_is_idempotent(tmp_path):
    db = tmp_path / "w.duckdb"
    con = connect(db)
    assert current_version(con) == latest_version()
    assert migrate(con) == []  # nothing left to apply
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"schema_version", "specs", "spec_units", "latest_specs", "spec_unit_counts"} <= tables
    con.close()
    result = run_msm("warehouse", "init", "--db", str(db))
    assert result.returncode == 0 and "migrated" in result.stdout


def test_a_migration_numbered_below_one_already_applied_still_runs(tmp_path):
    """Branches land out of order: a file at v14 that never ran 012 gets 012 on the next connect."""
    import duckdb

    from warehouse.db import migrations

    path = tmp_path / "w.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
                " applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)")
    skipped = 12
    for version, name, sql in migrations():
        if version != skipped:
            con.execute(sql)
            con.execute("INSERT INTO schema_version (version, name) VALUES (?, ?)", [version, name])
    assert migrate(con) == [skipped]
    assert "scenario" in {r[0] for r in con.execute("DESCRIBE contamination").fetchall()}
    assert migrate(con) == []
    con.close()


def test_default_db_lives_under_msm_home(isolated_home):
    result = run_msm("warehouse", "init")
    assert result.returncode == 0, result.stderr
    assert (isolated_home / "msm.duckdb").is_file()


def test_msm_db_env_wins_over_home(tmp_path):
    target = tmp_path / "elsewhere.duckdb"
    assert run_msm("warehouse", "init", env={"MSM_DB": str(target)}).returncode == 0
    assert target.is_file()


def test_record_spec_is_idempotent_and_versions_changes(tmp_path):
    con = connect(tmp_path / "w.duckdb")
    text = "---\nname: s\nmodel_name: A\n---\n# Rules\n1. Be kind.\n2. Be honest.\n"
    spec = parse_spec_text(text, "s.md")
    assert record_spec(con, spec, WORDS) is True
    assert record_spec(con, spec, WORDS) is False
    changed = parse_spec_text(text.replace("Be kind.", "Be very kind."), "s.md")
    assert record_spec(con, changed, WORDS) is True
    assert con.execute("SELECT count(*) FROM specs").fetchone()[0] == 2
    assert con.execute("SELECT count(*) FROM spec_units").fetchone()[0] == 6
    latest = con.execute("SELECT id FROM latest_specs").fetchall()
    assert latest == [(changed.version,)]
    kinds = dict(con.execute(
        "SELECT kind, units FROM spec_unit_counts WHERE spec_version = ?", [spec.version]).fetchall())
    assert kinds == {"section": 1, "rule": 2}
    tokens = con.execute("SELECT sum(tokens), any_value(token_counter) FROM spec_units WHERE spec_version = ?",
                         [spec.version]).fetchone()
    assert tokens == (len("# Rules 1. Be kind. 2. Be honest.".split()), "words")
    con.close()


def test_second_writer_gets_a_clear_error(tmp_path, isolated_home):
    db = tmp_path / "locked.duckdb"
    connect(db).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({str(db)!r})
            print("held", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        line = assert_one_line_error(run_msm("warehouse", "init", "--db", str(db)),
                                     "in use by another process", f"PID {holder.pid}")
        assert "wait for it" in line
        assert_one_line_error(run_msm("warehouse", "sql", "SELECT 1", "--db", str(db)), "in use by another process")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert run_msm("warehouse", "sql", "SELECT 1 AS one", "--db", str(db)).returncode == 0


def test_sql_formats_and_write(tmp_path):
    db = str(tmp_path / "w.duckdb")
    assert run_msm("warehouse", "init", "--db", db).returncode == 0
    made = run_msm("warehouse", "sql", "CREATE TABLE notes (id INT, body VARCHAR); "
                   "INSERT INTO notes VALUES (1, 'a,b'), (2, NULL)", "--write", "--db", db)
    assert made.returncode == 0, made.stderr
    query = "SELECT * FROM notes ORDER BY id"
    table = run_msm("warehouse", "sql", query, "--db", db).stdout.splitlines()
    assert table[0].split() == ["id", "body"] and table[-1] == "(2 rows)" and "NULL" in table[3]
    rows = list(csv.reader(io.StringIO(run_msm("warehouse", "sql", query, "--format", "csv", "--db", db).stdout)))
    assert rows == [["id", "body"], ["1", "a,b"], ["2", ""]]
    data = json.loads(run_msm("warehouse", "sql", query, "--format", "json", "--db", db).stdout)
    assert data == [{"id": 1, "body": "a,b"}, {"id": 2, "body": None}]
    piped = run_msm("warehouse", "sql", "-", "--format", "json", "--db", db, input="SELECT 42 AS x")
    assert json.loads(piped.stdout) == [{"x": 42}]


def test_tables_and_stats(tmp_path):
    spec = tmp_path / "s.md"
    spec.write_text("# A\n- **R1. x.** y\n")
    assert run_msm("spec", "load", str(spec)).returncode == 0
    tables = run_msm("warehouse", "tables").stdout
    assert any(line.split()[:3] == ["table", "spec_units", "2"] for line in tables.splitlines())
    assert any(line.startswith("view") and "latest_specs" in line for line in tables.splitlines())
    stats = run_msm("warehouse", "stats").stdout
    assert f"schema     v{latest_version()}" in stats and "1 spec(s), 1 version(s)" in stats


def test_newer_schema_is_refused(tmp_path):
    db = tmp_path / "future.duckdb"
    con = connect(db)
    con.execute("INSERT INTO schema_version (version, name) VALUES (999, 'from_the_future')")
    con.close()
    assert_one_line_error(run_msm("warehouse", "tables", "--db", str(db)), "newer than this msm", "upgrade msm")


def test_a_write_after_paid_work_waits_for_the_lock_and_says_who_holds_it(tmp_path, capsys):
    """Demo sets, eval results, training runs and experiment steps are recorded after the work is
    done: they wait for another process's lock (MSM_LOAD_LOCK_WAIT) instead of failing in 3 s."""
    from warehouse.db import WarehouseError, connect_after_work

    path = tmp_path / "w.duckdb"
    connect(path).close()
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(float(sys.argv[2]))", str(path), "4"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WarehouseError) as short:
            connect_after_work(path, "eval run e1", wait_s=0.5)
        assert f"PID {holder.pid}" in short.value.problem and "still after waiting 0 s to record eval run e1" in \
            short.value.problem and "rerun" in short.value.fix
        con = connect_after_work(path, "eval run e1", wait_s=60)  # the holder exits after 4 s
        assert con.execute("SELECT 1").fetchone() == (1,)
        con.close()
    finally:
        holder.wait(timeout=30)
    notices = [ln for ln in capsys.readouterr().err.splitlines() if "waiting for the warehouse" in ln]
    assert len(notices) == 2 and all(f"PID {holder.pid}" in ln and "eval run e1" in ln for ln in notices)
