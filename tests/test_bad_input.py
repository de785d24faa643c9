"""Bad input: one line on stderr naming the problem and the fix, a non-zero exit, nothing half-written."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_one_line_error, run_msm


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.md"
    path.write_text("---\nname: s\nmodel_name: Claude\n---\n# A\n{model_name} helps.\n")
    return path


def test_missing_path(tmp_path):
    assert_one_line_error(run_msm("spec", "show", str(tmp_path / "nope.md")), "spec file not found")


def test_directory(tmp_path):
    assert_one_line_error(run_msm("spec", "show", str(tmp_path)), "is a directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.md"
    path.write_text("\n  \n")
    assert_one_line_error(run_msm("spec", "show", str(path)), "is empty", "write at least one")


def test_binary_file(tmp_path):
    path = tmp_path / "blob.md"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert_one_line_error(run_msm("spec", "show", str(path)), "binary")


def test_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.md"
    path.write_bytes("# Cafe\nok\nna\xefve\n".encode("latin-1"))
    assert_one_line_error(run_msm("spec", "check", str(path)), "not valid UTF-8", "line 3", "UTF-8")


def test_broken_front_matter(tmp_path):
    path = tmp_path / "fm.md"
    path.write_text("---\nname: [unclosed\n---\n# A\n")
    assert_one_line_error(run_msm("spec", "show", str(path)), "front matter is not valid YAML")


def test_unclosed_front_matter(tmp_path):
    path = tmp_path / "fm.md"
    path.write_text("---\nname: x\n# A\n")
    assert_one_line_error(run_msm("spec", "show", str(path)), "never closed")


def test_unknown_placeholder(spec_file):
    line = assert_one_line_error(run_msm("spec", "show", str(spec_file), "--var", "colour=red"), "unknown placeholder 'colour'")
    assert "variables:" in line


def test_malformed_var(spec_file):
    result = run_msm("spec", "show", str(spec_file), "--var", "novalue")
    assert result.returncode != 0 and "NAME=VALUE" in result.stderr and "Traceback" not in result.stderr


def test_huge_file_is_refused_with_the_limit(tmp_path):
    path = tmp_path / "huge.md"
    chunk = ("# Heading\n" + "All work and no play makes a spec. " * 30 + "\n\n").encode()
    with path.open("wb") as fh:
        for _ in range(50 * 2**20 // len(chunk) + 1):
            fh.write(chunk)
    assert path.stat().st_size >= 50 * 2**20
    assert_one_line_error(run_msm("spec", "show", str(path)), "MB spec limit", "MSM_SPEC_MAX_MB")


def test_db_path_is_a_directory(tmp_path, spec_file):
    assert_one_line_error(run_msm("spec", "load", str(spec_file), "--db", str(tmp_path)), "is a directory")
    assert_one_line_error(run_msm("warehouse", "init", "--db", str(tmp_path)), "is a directory")


def test_db_path_under_a_file(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert_one_line_error(run_msm("warehouse", "init", "--db", str(blocker / "w.duckdb")), "is a file")


def test_db_is_not_duckdb(tmp_path):
    fake = tmp_path / "notes.duckdb"
    fake.write_text("not a database")
    assert_one_line_error(run_msm("warehouse", "tables", "--db", str(fake)), "not a DuckDB database")
    assert fake.read_text() == "not a database"


def test_sql_on_missing_warehouse(tmp_path):
    assert_one_line_error(run_msm("warehouse", "sql", "SELECT 1", "--db", str(tmp_path / "none.duckdb")),
                          "no warehouse", "msm warehouse init")
    assert not (tmp_path / "none.duckdb").exists()


def test_sql_that_writes_without_write(spec_file):
    assert run_msm("spec", "load", str(spec_file)).returncode == 0
    assert_one_line_error(run_msm("warehouse", "sql", "DELETE FROM spec_units"), "writes to the warehouse", "--write")
    assert_one_line_error(run_msm("warehouse", "sql", "CREATE TABLE x (a INT)"), "--write")
    rows = json.loads(run_msm("warehouse", "sql", "SELECT count(*) AS n FROM spec_units", "--format", "json").stdout)
    assert rows[0]["n"] > 0


def test_sql_syntax_error(spec_file):
    assert run_msm("warehouse", "init").returncode == 0
    assert_one_line_error(run_msm("warehouse", "sql", "SELEC * FROM specs"), "SQL error", "syntax error")


def test_failed_write_script_leaves_no_partial_rows(spec_file):
    assert run_msm("spec", "load", str(spec_file)).returncode == 0
    script = "DELETE FROM spec_units; INSERT INTO nonexistent VALUES (1);"
    assert_one_line_error(run_msm("warehouse", "sql", script, "--write"), "SQL error")
    rows = json.loads(run_msm("warehouse", "sql", "SELECT count(*) AS n FROM spec_units", "--format", "json").stdout)
    assert rows[0]["n"] > 0


def test_bad_spec_writes_nothing_to_the_warehouse(tmp_path):
    path = tmp_path / "bad.md"
    path.write_text("---\nname: [x\n---\n# A\n")
    assert_one_line_error(run_msm("spec", "load", str(path)), "YAML")
    assert not (tmp_path / "msm_home" / "msm.duckdb").exists()


def test_unknown_model_alias():
    assert_one_line_error(run_msm("models", "prepare", "gpt-17"), "unknown model 'gpt-17'", "msm models list")


def test_broken_msm_toml(tmp_path):
    (tmp_path / "msm.toml").write_text("home = [unterminated\n")
    assert_one_line_error(run_msm("warehouse", "init", cwd=tmp_path), "msm.toml is not valid TOML")
