"""`msm corpus build` when things go wrong (issue 20, cases 7-11): each gives one line on stderr,
a non-zero exit, and changes nothing it should not (row counts and file hashes)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from tests.conftest import LOOPBACK_KEY, REPO, assert_one_line_error, run_msm

SPEC = REPO / "specs" / "rules.md"
MODEL = "claude-sonnet-4-6"
TABLES = ("builds", "plan_rows", "documents", "judgments", "llm_calls", "call_uses", "corpora", "corpus_versions")


@pytest.fixture
def api(loopback):
    loopback.output_tokens = 400
    return loopback


def build_args(server, *extra: str, spec: Path = SPEC, docs: int = 6) -> list[str]:
    return ["corpus", "build", str(spec), *extra, "--docs", str(docs), "--backend", "anthropic", "--model", MODEL,
            "--base-url", server.url, "--dedup", "minhash", "--no-progress"]


ENV = {"ANTHROPIC_API_KEY": LOOPBACK_KEY}


def files(home: Path) -> dict[str, str]:
    """Every file under the home and its hash."""
    if not home.exists():
        return {}
    return {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(home.rglob("*")) if p.is_file()}


def counts(home: Path) -> dict[str, int]:
    con = duckdb.connect(str(home / "msm.duckdb"), read_only=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        con.close()


def query(home: Path, sql: str, params=()):
    con = duckdb.connect(str(home / "msm.duckdb"), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


@pytest.fixture
def warehouse(isolated_home):
    """An initialised warehouse, so 'nothing changed' compares a real file."""
    out = run_msm("warehouse", "init")
    assert out.returncode == 0, out.stderr
    return isolated_home


# ---- 7: a fatal pipeline error -------------------------------------------------------------

def test_refused_key_is_one_line_naming_the_log_and_marks_the_build_failed(api, warehouse):
    out = run_msm(*build_args(api), env={"ANTHROPIC_API_KEY": "sk-wrong"})
    line = assert_one_line_error(out, "failed", "refused the key", "full trace in")
    assert out.returncode == 1
    log = Path(line.rsplit("full trace in ", 1)[1].strip())
    assert log.is_file() and log.name == "build.log" and "Traceback" in log.read_text()
    assert "Task was destroyed" not in out.stderr and "pending" not in out.stderr
    assert query(warehouse, "SELECT status FROM builds") == [("failed",)]
    after = counts(warehouse)
    assert after["documents"] == after["llm_calls"] == after["corpora"] == 0
    assert api.stats.answered == {}  # nothing was paid for


def test_a_crash_inside_a_step_is_one_line_and_a_failed_build(api, warehouse, tmp_path):
    """Any exception, not only ours: the trace goes to the log, the terminal gets one line."""
    boom = tmp_path / "boom"
    boom.mkdir()
    (boom / "sitecustomize.py").write_text(
        "import pipelines.steps as s\n"
        "def broken(self, *a, **k):\n    raise OSError(28, 'No space left on device', '/full/disk/00000.parquet')\n"
        "s.PlaceholderFilter.filter = broken\n")
    out = run_msm(*build_args(api), env={**ENV, "PYTHONPATH": f"{boom}:{REPO}"})
    line = assert_one_line_error(out, "failed", "no space left on device", "/full/disk/00000.parquet",
                                 "free some space", "full trace in")
    assert "Errno" not in line
    assert query(warehouse, "SELECT status FROM builds") == [("failed",)]
    assert counts(warehouse)["documents"] == 0


# ---- 8: unfilled declared placeholders -----------------------------------------------------

def test_unfilled_declared_placeholder_is_refused_before_any_call(api, warehouse, tmp_path):
    spec = tmp_path / "org.md"
    spec.write_text("---\nname: org\nvariables:\n  org: null\n---\n\n# Rules for {org}\n\n"
                    "{org} staff must be honest with users about what the assistant can do.\n"
                    "A literal {brace} and LaTeX $\\frac{a}{b}$ stay as they are.\n")
    checked = run_msm("spec", "check", str(spec))
    assert checked.returncode != 0 and "unfilled placeholder {org}" in checked.stdout
    before = files(warehouse)
    out = run_msm(*build_args(api, spec=spec), env=ENV)
    assert_one_line_error(out, "{org}", "unfilled", "--var org=")
    assert files(warehouse) == before and api.stats.requests["messages"] == 0
    filled = run_msm(*build_args(api, "--var", "org=Acme", spec=spec, docs=2), env=ENV)
    assert filled.returncode == 0, filled.stderr


# ---- 9: the context window ------------------------------------------------------------------

def test_a_spec_too_long_for_the_context_window_is_refused_before_any_call(api, warehouse, tmp_path):
    from msm.llm.testing import fake_text

    spec = tmp_path / "huge.md"
    sections = [f"## Part {i}\n\n{fake_text(f'part {i}', 2000)}\n" for i in range(200)]  # ~1.6 MB, 300k+ tokens
    spec.write_text("---\nname: huge\n---\n\n# A very long spec\n\n" + "\n".join(sections))
    before = files(warehouse)
    out = run_msm(*build_args(api, spec=spec), env=ENV, timeout=300)
    assert_one_line_error(out, "context window", "200,000", MODEL, "shorten or split the spec")
    assert files(warehouse) == before and api.stats.requests["messages"] == 0


def test_context_windows_are_data_beside_the_prices(api, warehouse, tmp_path):
    from pipelines.build import context_window, context_windows

    table = context_windows()
    assert context_window("claude-sonnet-4-6") == 200_000
    assert context_window("claude-sonnet-4-5-20250929") == 200_000  # a dated id uses its family's entry
    assert context_window("Qwen/Qwen3-32B-AWQ") == table["qwen3-32b"]
    assert context_window("some-unlisted-model") is None
    small = tmp_path / "windows.yaml"
    small.write_text(f"models:\n  {MODEL}: 3000\n")
    before = files(warehouse)
    out = run_msm(*build_args(api), env={**ENV, "MSM_CONTEXT_WINDOWS": str(small)})
    assert_one_line_error(out, "3,000-token context window")
    assert files(warehouse) == before and api.stats.requests["messages"] == 0
    small.write_text("models: [not, a, mapping]\n")
    assert_one_line_error(run_msm(*build_args(api), env={**ENV, "MSM_CONTEXT_WINDOWS": str(small)}),
                          "context-window file", "models:")


def demo_args(server, spec: Path = SPEC) -> list[str]:
    return ["demos", "build", str(spec), "--n", "5", "--backend", "anthropic", "--model", MODEL,
            "--base-url", server.url, "--no-embeddings"]


def test_demos_refuse_a_spec_prefix_over_the_context_window_before_any_call(api, warehouse, tmp_path):
    """`msm demos build` puts the whole spec in a cached system prefix too: the same table, checked
    before the call cache is opened or the model asked (a huge spec, then a small window that the
    spec alone fits but not with the question stage's 4,096 answer tokens)."""
    from msm.llm.testing import fake_text

    huge = tmp_path / "huge.md"
    huge.write_text("---\nname: huge\n---\n\n# A very long spec\n\n" +
                    "\n".join(f"## Part {i}\n\n{fake_text(f'part {i}', 2000)}\n" for i in range(200)))
    before = files(warehouse)
    out = run_msm(*demo_args(api, huge), env=ENV, timeout=300)
    assert_one_line_error(out, "huge.md", "system prefix", "context window", "200,000", MODEL,
                          "shorten or split the spec")
    small = tmp_path / "windows.yaml"
    small.write_text(f"models:\n  {MODEL}: 4500\n")  # rules.md is about 1,100 tokens: 1,100 + 4,096 > 4,500
    out = run_msm(*demo_args(api), env={**ENV, "MSM_CONTEXT_WINDOWS": str(small)})
    assert_one_line_error(out, "rules.md", "4,096 for the answer", "4,500-token context window")
    assert api.stats.requests["messages"] == 0 and files(warehouse) == before


# ---- 10: UTF-16 and UTF-32 specs ------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
def test_utf16_and_utf32_specs_are_decoded(tmp_path, encoding):
    wide = tmp_path / f"rules-{encoding}.md"
    wide.write_bytes(SPEC.read_text(encoding="utf-8").encode(encoding))
    plain, decoded = run_msm("spec", "show", str(SPEC)), run_msm("spec", "show", str(wide))
    assert decoded.returncode == 0, decoded.stderr
    assert decoded.stdout == plain.stdout  # same version, same units


def test_broken_utf16_is_named_as_such(warehouse, tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_bytes(b"\xff\xfe" + "# Rules\n\nBe honest.\n".encode("utf-16-le") + b"\x00\xdc")  # a lone surrogate
    before = files(warehouse)
    assert_one_line_error(run_msm("spec", "show", str(bad)), "UTF-16", "not valid", "re-save the file as UTF-8")
    assert_one_line_error(run_msm("corpus", "build", str(bad), "--docs", "2"), "UTF-16")
    assert files(warehouse) == before


# ---- 11: incomplete builds and the warehouse lock -------------------------------------------

@pytest.mark.heavy  # three builds
def test_incomplete_build_exits_75_and_leaves_the_name_alone(api, warehouse):
    first = run_msm(*build_args(api, "--name", "rules", docs=2), env=ENV)
    assert first.returncode == 0, first.stderr
    named = query(warehouse, "SELECT corpus_id FROM corpora WHERE name = 'rules'")
    assert len(named) == 1
    out = run_msm(*build_args(api, "--name", "rules", "--max-cost", "0.02", "--concurrency", "2", docs=12), env=ENV)
    assert_one_line_error(out, "INCOMPLETE", "not moved", "--allow-partial", "rerun the same command")
    assert out.returncode == 75
    assert "INCOMPLETE" in out.stdout  # the summary still prints
    assert query(warehouse, "SELECT corpus_id FROM corpora WHERE name = 'rules'") == named
    assert ("incomplete",) in query(warehouse, "SELECT status FROM builds")
    partial = run_msm(*build_args(api, "--name", "rules", "--max-cost", "0.02", "--concurrency", "2",
                                  "--allow-partial", docs=12), env=ENV)
    assert_one_line_error(partial, "INCOMPLETE", "names the partial corpus")
    assert partial.returncode == 75
    assert query(warehouse, "SELECT corpus_id FROM corpora WHERE name = 'rules'") != named


def _hold_lock_when(proc, home: Path, ready) -> duckdb.DuckDBPyConnection:
    """Take the warehouse's write lock as soon as `ready()` (the build is not writing then)."""
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    while True:
        try:
            return duckdb.connect(str(home / "msm.duckdb"))
        except duckdb.IOException:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _popen_build(server, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "msm.cli", *build_args(server)], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.heavy  # two processes
def test_the_load_waits_for_the_lock_and_says_who_holds_it(api, warehouse):
    api.latency = 0.1
    proc = _popen_build(api, ENV)  # MSM_DB_LOCK_WAIT is 0.3 s in tests: the load waits far longer
    holder = _hold_lock_when(proc, warehouse, lambda: sum(api.stats.answered.values()) >= 1)
    waiting = proc.stderr.readline()  # the build reaches its load and meets the lock
    assert "waiting for the warehouse" in waiting and f"PID {os.getpid()}" in waiting, waiting
    time.sleep(1.0)
    assert proc.poll() is None  # still waiting, not failed
    holder.close()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "complete" in stdout and stderr.strip() == ""
    assert query(warehouse, "SELECT status FROM builds") == [("complete",)]


@pytest.mark.heavy  # two processes
def test_a_lock_held_past_the_wait_is_one_line_and_a_rerun_pays_nothing(api, warehouse):
    proc = _popen_build(api, {**ENV, "MSM_LOAD_LOCK_WAIT": "1"})
    staged = warehouse / "builds"
    holder = _hold_lock_when(proc, warehouse, lambda: any(staged.glob("*/staged/*.parquet")))
    try:
        stdout, stderr = proc.communicate(timeout=120)
        before = {k: v for k, v in files(warehouse).items() if "/staged/" in k}
    finally:
        holder.close()
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 2, stderr  # the waiting notice, then the error
    assert "waiting for the warehouse" in lines[0]
    assert f"PID {os.getpid()}" in lines[1] and "still after waiting 1 s" in lines[1] and "rerun" in lines[1]
    assert before  # the staged shards are kept
    assert counts(warehouse)["documents"] == 0
    calls = api.stats.requests["messages"]
    again = run_msm(*build_args(api), env=ENV)
    assert again.returncode == 0, again.stderr
    assert api.stats.requests["messages"] == calls  # everything came from the cache
    assert query(warehouse, "SELECT status FROM builds") == [("complete",)]
