"""Bad banks cost nothing and paid eval calls are never lost (issue 20, case 3): duplicate item ids are
refused before any model call, and an API backend's scoring calls go through the call cache, so a
run that dies after its calls (a crash, kill -9, a warehouse it cannot write) reruns without paying
again. Calls are counted at the loopback server, whose OpenAI-compatible route the real SDK calls."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from tests.conftest import LOOPBACK_KEY, assert_one_line_error, run_msm

N_ITEMS = 100  # 200 scored prompts (both A/B orders), one scoring call each (servers take one prompt a request)
CALLS = 2 * N_ITEMS
IN_FLIGHT = 16  # an eval's scoring calls at once
DOMAINS = ("travel", "art", "fashion", "housing")


def items(n: int = N_ITEMS, ids=None) -> list[dict]:
    return [{"id": (ids[i] if ids else f"c-{i}"), "domain": DOMAINS[i % 4],
             "prompt": f"Which option suits errand number {i}?",
             "options": {"A": f"A plain choice costing {i + 10} euros.", "B": f"A lavish choice costing {i * 40 + 900} euros."},
             "consistent_with": {"affordability": "A" if i % 2 else "B"}, "split": "held_out"} for i in range(n)]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def args(loopback, *banks: Path) -> list[str]:
    out = ["eval", "run", "preferences", "--model", "loopback-model", "--backend", "openai", "--base-url",
           f"{loopback.url}/v1", "--target", "affordability"]
    for bank in banks:
        out += ["--items", str(bank)]
    return out


ENV = {"OPENAI_API_KEY": LOOPBACK_KEY}


def answered(loopback) -> int:
    return loopback.stats.requests["completions_answered"]


def eval_rows(home: Path) -> tuple[int, int]:
    con = duckdb.connect(str(home / "msm.duckdb"), read_only=True)
    try:
        return con.execute("SELECT (SELECT count(*) FROM eval_runs), (SELECT count(*) FROM eval_samples)").fetchone()
    finally:
        con.close()


def test_duplicate_ids_in_one_bank_are_refused_before_any_call(tmp_path, isolated_home, loopback):
    rows = items(6)
    rows[4]["id"] = "c-1"
    bank = write(tmp_path / "dup.jsonl", rows)
    assert run_msm("warehouse", "init").returncode == 0
    before = snapshot(tmp_path)
    assert_one_line_error(run_msm(*args(loopback, bank), env=ENV), "dup.jsonl:5", "item id 'c-1' is already used on line 2",
                          "its own id")
    assert loopback.stats.requests["completions"] == 0  # no model call at all
    assert snapshot(tmp_path) == before  # the warehouse file, and no call cache made
    assert eval_rows(isolated_home) == (0, 0)


def test_duplicate_ids_across_banks_are_refused_before_any_call(tmp_path, isolated_home, loopback):
    one = write(tmp_path / "one.jsonl", items(3))
    two = write(tmp_path / "two.jsonl", items(3, ids=["x-0", "c-2", "x-2"]))
    before = snapshot(tmp_path)
    assert_one_line_error(run_msm(*args(loopback, one, two), env=ENV),
                          "item id 'c-2' appears twice (bank one and two)", "nothing was asked of the model")
    assert loopback.stats.requests["completions"] == 0
    assert snapshot(tmp_path) == before and not isolated_home.exists()


def start_eval(loopback, bank: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "msm.cli", *args(loopback, bank)], env={**os.environ, **ENV, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def cached_scores(home: Path) -> int:
    import sqlite3

    con = sqlite3.connect(str(home / "cache" / "calls.sqlite"))
    try:
        return con.execute("SELECT count(*) FROM calls WHERE stop_reason = 'score' AND purpose = 'eval'").fetchone()[0]
    finally:
        con.close()


def test_a_run_that_cannot_record_after_its_calls_reruns_without_paying(tmp_path, isolated_home, loopback):
    bank = write(tmp_path / "bank.jsonl", items())
    assert run_msm("warehouse", "init").returncode == 0
    db = isolated_home / "msm.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys
        sys.stdin.readline()
        con = duckdb.connect({str(db)!r})
        print("held", flush=True)
        sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    loopback.latency = 0.4
    try:
        run = start_eval(loopback, bank, MSM_LOAD_LOCK_WAIT="1")  # the results wait 1 s for the lock, not an hour
        wait_for(lambda: answered(loopback) >= 1)  # the model is being asked: the warehouse check is behind it
        holder.stdin.write("lock\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "held"
        out, err = run.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert run.returncode == 1 and len(lines) == 2 and "Traceback" not in err, err  # the notice, then the error
        assert "waiting for the warehouse" in lines[0] and f"PID {holder.pid}" in lines[0]
        assert "is in use by another process" in lines[1] and "still after waiting 1 s to record eval run" in lines[1]
        assert "rerun" in lines[1]
        assert answered(loopback) == CALLS  # every scoring call was made and paid for ...
        assert cached_scores(isolated_home) == 2 * N_ITEMS  # ... and every answer kept
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert eval_rows(isolated_home) == (0, 0)  # nothing recorded, nothing half-written
    rerun = run_msm(*args(loopback, bank), env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert answered(loopback) == CALLS and loopback.stats.requests["completions"] == CALLS  # no new paid call
    assert eval_rows(isolated_home) == (1, N_ITEMS)


@pytest.mark.heavy
def test_kill_minus_nine_mid_run_pays_at_most_the_calls_in_flight_twice(tmp_path, isolated_home, loopback):
    bank = write(tmp_path / "bank.jsonl", items())
    loopback.latency = 0.4
    run = start_eval(loopback, bank)
    wait_for(lambda: answered(loopback) >= 2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    at_kill = answered(loopback)
    assert run.returncode == -signal.SIGKILL and 2 <= at_kill < CALLS  # really killed, really mid-run
    assert not (isolated_home / "msm.duckdb").exists() or eval_rows(isolated_home) == (0, 0)
    loopback.latency = 0.0
    rerun = run_msm(*args(loopback, bank), env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert CALLS <= answered(loopback) <= CALLS + IN_FLIGHT  # only the calls in flight at the kill are paid twice
    again = run_msm(*args(loopback, bank), env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr
    assert answered(loopback) <= CALLS + IN_FLIGHT and eval_rows(isolated_home) == (1, N_ITEMS)
    assert "all" in again.stdout


def test_a_served_model_is_scored_in_the_chat_template_it_was_given(tmp_path, isolated_home, loopback):
    """/v1/completions applies no template: with --chat-template the contexts a server scores are
    framed exactly as the local backend frames the same model's (system turn, user turn,
    generation prompt); without it, a plain question-and-answer frame."""
    import json as _json
    import sqlite3

    bank = write(tmp_path / "bank.jsonl", items(4))
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    done = run_msm(*args(loopback, bank), "--chat-template", str(template), env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    plain = run_msm(*args(loopback, bank), env=ENV, timeout=300)
    assert plain.returncode == 0, plain.stderr
    con = sqlite3.connect(isolated_home / "cache" / "calls.sqlite")
    contexts = [_json.loads(r)["score"]["context"] for (r,) in con.execute("SELECT request FROM calls")]
    con.close()
    framed = [c for c in contexts if c.startswith("<|im_start|>user\n")]
    assert len(framed) == 8 and all(c.endswith("<|im_end|>\n<|im_start|>assistant\n") for c in framed)
    assert len([c for c in contexts if c.startswith("Question: ") and c.endswith("\nAnswer:")]) == 8
