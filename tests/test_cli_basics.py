"""The CLI's shape: help, version, lazy imports, config precedence, doctor."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from msm import __version__
from msm.config import load_settings
from tests.conftest import run_msm

HEAVY = ("torch", "transformers", "datatrove", "sentence_transformers", "duckdb", "polars")


def test_help_lists_groups_and_version():
    result = run_msm("--help")
    assert result.returncode == 0
    for group in ("spec", "warehouse", "models", "doctor", "llm", "cache"):
        assert f"  {group}" in result.stdout
    assert run_msm("--version").stdout.strip() == f"msm, version {__version__}"


def test_help_and_spec_commands_import_nothing_heavy(tmp_path):
    spec = tmp_path / "s.md"
    spec.write_text("# A\ntext\n")
    probe = textwrap.dedent(f"""
        import sys
        from msm.cli import cli
        for args in (["--help"], ["spec", "--help"], ["spec", "show", {str(spec)!r}],
                     ["spec", "show", {str(spec)!r}, "--json"], ["spec", "check", {str(spec)!r}]):
            try:
                cli.main(args, prog_name="msm", standalone_mode=False)
            except SystemExit:
                pass
        print("HEAVY=" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "HEAVY="


def test_settings_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MSM_HOME")
    assert load_settings(cwd=tmp_path).db == tmp_path / ".msm" / "msm.duckdb"
    (tmp_path / "msm.toml").write_text('home = "from_file"\n')
    assert load_settings(cwd=tmp_path).home == tmp_path / "from_file"
    monkeypatch.setenv("MSM_HOME", str(tmp_path / "from_env"))
    assert load_settings(cwd=tmp_path).db == tmp_path / "from_env" / "msm.duckdb"
    monkeypatch.setenv("MSM_DB", "env.duckdb")
    assert load_settings(cwd=tmp_path).db == tmp_path / "env.duckdb"
    assert load_settings(db="/x/flag.duckdb", cwd=tmp_path).db.as_posix() == "/x/flag.duckdb"


def test_doctor_reports_an_unwritable_home(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_msm("doctor", env={"MSM_HOME": str(blocker / "home")})
    assert result.returncode == 1
    assert "[FAIL] MSM_HOME writable" in result.stdout and "set MSM_HOME" in result.stdout
    assert "[ok  ] datatrove extras" in result.stdout
    assert "[ok  ] xxhash < 4" in result.stdout


def test_doctor_reports_an_unconverted_model(tmp_path):
    result = run_msm("doctor", env={"XDG_CACHE_HOME": str(tmp_path / "empty_cache")})
    assert "[FAIL] smollm2-135m-instruct converted" in result.stdout
    assert "msm models prepare" in result.stdout
    assert result.returncode == 1


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "msm"
    assert script.is_file(), "the `msm` console script is missing: reinstall with pip install -e ."
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True).stdout
    assert out.strip() == f"msm, version {__version__}"


def test_a_write_the_file_system_refuses_is_one_line_wherever_it_happens(monkeypatch, isolated_home, tmp_path):
    """A full disk (ENOSPC) or a read-only mount inside any command: one line naming the file and the fix."""
    import errno

    from click.testing import CliRunner

    import warehouse.demos_store
    from msm.cli import cli

    def full(db, name, out, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / f"{name}.jsonl"))

    monkeypatch.setattr(warehouse.demos_store, "export_demo_set", full)
    result = CliRunner().invoke(cli, ["demos", "export", "prefs", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and not isinstance(result.exception, OSError)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no space left on the device writing" in lines[0] and "prefs.jsonl" in lines[0]
    assert "rerun the same command" in lines[0]

    def other(db, name, out, *args):  # an OSError that is not about storage is not dressed up as one
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(warehouse.demos_store, "export_demo_set", other)
    result = CliRunner().invoke(cli, ["demos", "export", "prefs", "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.EIO
