"""msm against a real llama.cpp server (llama-cpp-python 0.3.36, `python -m llama_cpp.server`).

Each test runs the real CLI in a subprocess with its own MSM_HOME; the server is one per session
(tests/realserver/conftest.py). Outputs are short (few documents, small --max-tokens, few items)
so that the tier fits in `make smoke`'s budget on a 2-core machine: the figures it prints
(seconds per test, the server's tokens/s) are the ones the README quotes.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from tests.conftest import REPO, assert_one_line_error, run_msm
from tests.realserver.conftest import MODEL

pytestmark = [pytest.mark.realserver, pytest.mark.heavy]

SPEC = str(REPO / "specs" / "value_augmented.md")
LIMIT = 20           # preferences items (each scored in both A/B orders)
TOLERANCE = 0.02     # per-item |consistent_p(server) - consistent_p(local)|
SHARE = 0.9          # of the items within TOLERANCE


def msm(*args: str, timeout: float = 300, what: str = "") -> subprocess.CompletedProcess:
    """run_msm, timed; a command that runs past `timeout` fails the test with one line."""
    started = time.monotonic()
    try:
        result = run_msm(*args, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`msm {' '.join(args[:2])}` ({what or 'no label'}) did not finish in {timeout:.0f} s "
                    "(the tier's budget for it)", pytrace=False)
    print(f"\n[realserver] msm {' '.join(args[:2])} {what}: rc {result.returncode} in "
          f"{time.monotonic() - started:.1f} s")
    return result


def build_args(url: str, docs: int) -> list[str]:
    # the model table (msm/llm/context_windows.yaml) gives SmolLM2 the compact prompt on any backend
    return ["corpus", "build", SPEC, "--docs", str(docs), "--backend", "openai", "--model", MODEL,
            "--base-url", url, "--max-tokens", "128", "--truncated", "trim", "--dedup", "none", "--no-progress"]


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def warehouse(home: Path):
    return duckdb.connect(str(home / "msm.duckdb"), read_only=True)


def cache_rows(home: Path) -> dict[str, dict]:
    """Every entry of the call cache (main file and shards), by key."""
    root = home / "cache"
    files = [root / "calls.sqlite", *sorted((root / "shards").glob("calls-*.sqlite"))]
    out: dict[str, dict] = {}
    for path in files:
        if not path.is_file():
            continue
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        con.row_factory = sqlite3.Row
        for row in con.execute("SELECT key, text, stop_reason, input_tokens, output_tokens, cache_read_tokens, "
                               "error FROM calls"):
            out[row["key"]] = dict(row)
        con.close()
    return out


def call_records(con, user_kind: str, user_id: str) -> list[dict]:
    cols = ["key", "stop_reason", "input_tokens", "output_tokens", "cache_read_tokens", "error"]
    rows = con.execute(f"SELECT {', '.join('c.' + c for c in cols)} FROM call_uses u JOIN llm_calls c "
                       "ON c.key = u.call_key WHERE u.user_kind = ? AND u.user_id = ?", [user_kind, user_id]).fetchall()
    return [dict(zip(cols, row)) for row in rows]


def assert_mirrors_cache(records: list[dict], cache: dict[str, dict]) -> None:
    """llm_calls holds each call's final record: the cache's tokens, and no error the cache no longer has."""
    assert records, "no calls recorded for it"
    for rec in records:
        entry = cache.get(rec["key"])
        assert entry is not None, f"llm_calls row {rec['key'][:12]} has no call-cache entry"
        assert rec["error"] is None or entry["error"] is not None, \
            f"stale error row: llm_calls says {rec['error']!r} for {rec['key'][:12]}, the cache holds its answer"
        for col in ("input_tokens", "output_tokens", "cache_read_tokens", "stop_reason"):
            assert rec[col] == entry[col], f"{rec['key'][:12]}: llm_calls {col}={rec[col]!r}, cache {entry[col]!r}"


def test_ping(server):
    before = server.posts()
    result = msm("llm", "ping", "--backend", "openai", "--model", MODEL, "--base-url", server.url, what="known model")
    ok(result)
    assert f"model: {MODEL}" in result.stdout
    assert "answer:" in result.stdout
    assert server.posts() > before, "ping only listed /v1/models: it must send the named model one tiny completion"

    # llama-cpp-python answers a completion for any model name when it serves one model, so the
    # name has to be checked against /v1/models as well
    bad = msm("llm", "ping", "--backend", "openai", "--model", "no-such-model", "--base-url", server.url,
              what="unknown model")
    assert_one_line_error(bad, "no-such-model")


def test_corpus_build_records_what_the_server_reported(server, recorder, isolated_home):
    mark = recorder.mark()
    result = msm(*build_args(recorder.url, 3), timeout=240, what="3 documents")
    ok(result)
    answers = [e for e in recorder.since(mark, "chat/completions") if e.status == 200 and e.complete]
    assert answers, "the build sent no chat completion to the server"

    con = warehouse(isolated_home)
    (build_id,) = con.execute("SELECT id FROM builds").fetchone()
    statuses = dict(con.execute("SELECT status, count(*) FROM plan_rows WHERE build_id = ? GROUP BY ALL",
                                [build_id]).fetchall())
    assert sum(statuses.values()) == 3 and set(statuses) <= {"kept", "dropped"}, statuses
    records = call_records(con, "build", build_id)
    cache = cache_rows(isolated_home)
    assert_mirrors_cache(records, cache)

    # against what the server itself sent back (the tap saw every byte)
    by_text = {e.text: e for e in answers}
    checked_usage = checked_bounds = 0
    for rec in records:
        if rec["error"] is not None:
            continue
        ex = by_text.get(cache[rec["key"]]["text"])
        assert ex is not None, f"{rec['key'][:12]}: msm recorded an answer the server never sent"
        assert (rec["stop_reason"] == "max_tokens") == (ex.finish_reason == "length"), \
            f"{rec['key'][:12]}: server finish_reason {ex.finish_reason!r}, msm stop_reason {rec['stop_reason']!r}"
        if ex.usage:
            assert rec["input_tokens"] + rec["cache_read_tokens"] == ex.usage["prompt_tokens"], (rec, ex.usage)
            assert rec["output_tokens"] == ex.usage["completion_tokens"], (rec, ex.usage)
            checked_usage += 1
        else:  # a stream without usage (llama-cpp-python sends none): bounded by what was streamed
            room = ex.request.get("max_tokens") or ex.request.get("max_completion_tokens")
            assert rec["input_tokens"] + rec["cache_read_tokens"] > 0, rec
            assert ex.content_chunks <= rec["output_tokens"] <= room, (rec, ex.content_chunks, room)
            if ex.finish_reason == "length":
                assert rec["output_tokens"] == room, (rec, room)
            checked_bounds += 1
    print(f"[realserver] build {build_id[:12]}: {len(records)} calls, {len(answers)} answers from the server; "
          f"tokens checked against server usage: {checked_usage}, against the stream's bounds: {checked_bounds}; "
          f"streamed: {sum(e.streamed for e in answers)}")

    # the same command again: everything comes from the cache, nothing reaches the server
    con.close()  # a read-only connection holds DuckDB's file lock against the rerun's writer
    posts, mark = server.posts(), recorder.mark()
    again = msm(*build_args(recorder.url, 3), timeout=180, what="rerun")
    ok(again)
    assert recorder.since(mark) == [] and server.posts() == posts, \
        f"the rerun sent {len(recorder.since(mark))} request(s): {[e.path for e in recorder.since(mark)]}"


def _run_id(result) -> str:
    found = re.search(r"eval run ([0-9a-f]+)", result.stdout)
    assert found, result.stdout
    return found.group(1)


def chat_template() -> Path:
    """SmolLM2's chat template as the local backend has it (`msm models prepare` writes it)."""
    from msm.models import prepared_dir

    path = prepared_dir(MODEL) / "chat_template.jinja"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make models`", pytrace=False)
    return path


def test_preferences_logprobs_match_the_local_backend(server, isolated_home):
    local = msm("eval", "run", "preferences", "--model", MODEL, "--target", "affordability",
                "--limit", str(LIMIT), what=f"local, {LIMIT} items")
    ok(local)
    # a server scores raw text: frame it with the chat template the local backend applies, so that both
    # score the same tokens (without one, msm sends a plain "Question: ... Answer:" frame)
    template = chat_template()
    served = msm("eval", "run", "preferences", "--backend", "openai", "--model", MODEL, "--base-url", server.url,
                 "--target", "affordability", "--limit", str(LIMIT), "--chat-template", str(template),
                 timeout=300, what=f"llama.cpp, {LIMIT} items")
    ok(served)
    con = warehouse(isolated_home)

    def samples(run_id):
        return {item: (p, err) for item, p, err in con.execute(
            "SELECT item_id, consistent_p, error FROM eval_samples WHERE run_id = ?", [run_id]).fetchall()}

    mine, theirs = samples(_run_id(local)), samples(_run_id(served))
    assert len(mine) == LIMIT and set(mine) == set(theirs), (sorted(mine), sorted(theirs))
    errors = {item: err for item, (_, err) in theirs.items() if err is not None}
    assert not errors, f"{len(errors)} item(s) in error against llama.cpp, e.g. {next(iter(errors.items()))}"
    diffs = sorted(abs(mine[i][0] - theirs[i][0]) for i in mine)
    share = sum(d <= TOLERANCE for d in diffs) / len(diffs)
    print(f"[realserver] preferences, {len(diffs)} items: {share:.0%} within {TOLERANCE} of the local backend; "
          f"max |diff| {diffs[-1]:.4f}, median {diffs[len(diffs) // 2]:.4f}")
    assert share >= SHARE, f"only {share:.0%} of items within {TOLERANCE} (max |diff| {diffs[-1]:.4f})"


def test_tiny_demo_build(server, recorder, isolated_home):
    """The demo builder end to end against the real server: every stage's calls streamed, answered
    (none cut off or failed), recorded, and the warehouse mirroring the cache. SmolLM2-135M seldom
    writes the question lists the builder asks for (measured: a Markdown list of domains, then
    prose instead of questions), so the build may end short of its target; that ends in the
    builder's own one line, never a traceback."""
    result = msm("demos", "build", SPEC, "--backend", "openai", "--model", MODEL, "--base-url", recorder.url,
                 "--n", "2", "--domains", "1", "--max-rounds", "1", "--max-tokens", "128", "--no-embeddings",
                 "--no-decontaminate", timeout=240, what="2 demonstrations, 1 domain, 1 round")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    if result.returncode != 0:
        assert len(lines) == 1 and re.search(r"kept \d of 2 demonstrations", lines[0]), result.stderr[-2000:]
    cache = cache_rows(isolated_home)
    assert len(cache) >= 2 and all(r["error"] is None for r in cache.values()), cache  # domains, then questions
    con = warehouse(isolated_home)
    (build_id, backend, model, kept, stop) = con.execute(
        "SELECT id, backend, model, n_kept, stop FROM demo_builds").fetchone()
    assert (backend, model) == ("openai", MODEL)
    statuses = dict(con.execute("SELECT status, count(*) FROM demonstrations WHERE demo_build_id = ? GROUP BY ALL",
                                [build_id]).fetchall())
    assert_mirrors_cache(call_records(con, "demo_set", build_id), cache)
    print(f"[realserver] demo build: {statuses}, kept {kept}, stop: {stop}, {len(cache)} calls")


def _successes(home: Path) -> int:
    path = home / "cache" / "calls.sqlite"
    if not path.is_file():
        return 0
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT count(*) FROM calls WHERE error IS NULL").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_server_killed_mid_build_then_resumed(server, isolated_home, tmp_path):
    args = build_args(server.url, 4)
    out, err = open(tmp_path / "first.out", "w"), open(tmp_path / "first.err", "w")
    started = time.monotonic()
    first = subprocess.Popen([sys.executable, "-m", "msm.cli", *args], stdout=out, stderr=err,
                             env=dict(os.environ), start_new_session=True)
    try:
        while _successes(isolated_home) < 1:  # the first answer is in: the rest are queued or mid-answer
            if first.poll() is not None:
                pytest.fail(f"the build ended (exit {first.returncode}) before the server could be killed: "
                            f"{(tmp_path / 'first.err').read_text()[-2000:]}", pytrace=False)
            if time.monotonic() - started > 180:
                pytest.fail("no answer reached the call cache within 180 s", pytrace=False)
            time.sleep(0.2)
        server.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        print(f"\n[realserver] server SIGKILLed {killed_at - started:.1f} s into the build, "
              f"{_successes(isolated_home)} answer(s) cached")
        try:
            first.wait(timeout=150)  # retries against a dead port, then it gives up with what it has
        except subprocess.TimeoutExpired:
            pass
        first_rc = first.poll()
        print(f"[realserver] the first build "
              + (f"exited {first_rc} {time.monotonic() - killed_at:.1f} s after the kill" if first_rc is not None
                 else "was still retrying 150 s after the kill; the server comes back under it"))
        server.start()
        if first_rc is None:
            first.wait(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        out.close()
        err.close()
    errors_before = sum(e["error"] is not None for e in cache_rows(isolated_home).values())
    assert first_rc != 0, "the build reported complete although its server died under it"
    assert errors_before >= 1, "no call failed while the server was down: the kill came too late to test a resume"

    again = msm(*args, timeout=300, what="resumed")
    ok(again)
    con = warehouse(isolated_home)
    (build_id,) = con.execute("SELECT id FROM builds").fetchone()
    statuses = dict(con.execute("SELECT status, count(*) FROM plan_rows WHERE build_id = ? GROUP BY ALL",
                                [build_id]).fetchall())
    assert sum(statuses.values()) == 4 and set(statuses) <= {"kept", "dropped"}, statuses
    kept = con.execute("SELECT count(*) FROM documents WHERE build_id = ? AND status = 'kept'", [build_id]).fetchone()[0]
    named = con.execute("SELECT count(*) FROM corpora c JOIN corpus_documents d ON d.corpus_id = c.corpus_id")\
        .fetchone()[0]
    assert kept == statuses.get("kept", 0) == named, (kept, statuses, named)

    records = call_records(con, "build", build_id)
    cache = cache_rows(isolated_home)
    assert_mirrors_cache(records, cache)
    row = con.execute("SELECT calls, input_tokens, output_tokens, cache_read_tokens FROM cost_per_build "
                      "WHERE build_id = ?", [build_id]).fetchone()
    keys = {r["key"] for r in records}
    truth = (len(keys), *(sum(cache[k][col] for k in keys) for col in
                          ("input_tokens", "output_tokens", "cache_read_tokens")))
    assert tuple(row) == truth, f"cost_per_build {tuple(row)} != the call cache's {truth} (calls, in, out, cache read)"
    print(f"[realserver] resumed build {build_id[:12]}: {statuses}; cache errors before the rerun: {errors_before}; "
          f"cost_per_build {tuple(row)} matches the cache")
