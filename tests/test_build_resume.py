"""A corpus build killed at any moment resumes to exactly what an uninterrupted build makes.

Kill points are chosen by the number of requests the loopback server has answered (not by time),
and each kill is checked to have landed mid-run. Calls are counted at the server: only the calls
in flight at a kill may be paid twice.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from msm.llm.testing import LoopbackServer
from tests.conftest import LOOPBACK_KEY, REPO

SPEC = REPO / "specs" / "value_augmented.md"
MODEL = "claude-sonnet-4-6"
DOCS, TASKS, CONCURRENCY = 24, 2, 2


def _server() -> LoopbackServer:
    server = LoopbackServer(api_key=LOOPBACK_KEY, min_cache_tokens=256, latency=0.1, output_tokens=400)
    return server.start()


def _command(server) -> list[str]:
    return [sys.executable, "-m", "msm.cli", "corpus", "build", str(SPEC), "--docs", str(DOCS), "--tasks", str(TASKS),
            "--backend", "anthropic", "--model", MODEL, "--base-url", server.url, "--concurrency", str(CONCURRENCY),
            "--dedup", "minhash", "--no-progress"]


def _env(home: Path) -> dict:
    env = {**os.environ, "ANTHROPIC_API_KEY": LOOPBACK_KEY, "MSM_HOME": str(home)}
    env.pop("MSM_DB", None)
    return env


def _answered(server) -> int:
    with server.lock:
        return sum(server.stats.answered.values())


def _cached_purposes(home: Path) -> list[str]:
    path = home / "cache" / "calls.sqlite"
    if not path.exists():
        return []
    con = sqlite3.connect(path)
    try:
        return [p for (p,) in con.execute("SELECT purpose FROM calls ORDER BY created_at, rowid")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def _query(home: Path, sql: str):
    con = duckdb.connect(str(home / "msm.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _assert_resumed(reference_home: Path, home: Path, reference, server, kills: list, total: int) -> int:
    """The resumed home equals the uninterrupted one (documents, texts, kept set, judgments, calls),
    the server answered the same requests, and each kill paid twice at most the calls it had in
    flight; returns the calls paid twice."""
    want, got = _state(reference_home), _state(home)
    for key in want:
        assert got[key] == want[key], key
    assert want["builds"][0][1] == "complete" and want["kept"]
    assert set(server.stats.answered) == set(reference.stats.answered)
    paid_twice = _answered(server) - total
    final_counts = dict(server.stats.answered)
    for kill, after in zip(kills, [k["snapshot"] for k in kills[1:]] + [final_counts]):
        kill["paid_twice"] = sum(1 for key, n in kill["snapshot"].items() if after.get(key, 0) > n)
    assert sum(k["paid_twice"] for k in kills) == paid_twice
    for kill in kills:
        assert kill["paid_twice"] <= kill["in_flight"] <= CONCURRENCY, kills
    return paid_twice


def _state(home: Path) -> dict:
    """What a finished build leaves in the warehouse, in a form two homes can be compared in."""
    q = lambda sql: sorted(_query(home, sql))  # noqa: E731
    return {
        "builds": q("SELECT id, status FROM builds"),
        "documents": q("SELECT id, plan_row_id, status, drop_reason, text_hash, n_tokens FROM documents"),
        "distinct_texts": q("SELECT count(DISTINCT text_hash) FROM documents"),
        "kept": q("SELECT id FROM documents WHERE status = 'kept'"),
        "corpora": q("SELECT c.name, c.corpus_id, v.n_docs, v.n_tokens FROM corpora c "
                     "JOIN corpus_versions v ON v.id = c.corpus_id"),
        "plan_rows": q("SELECT id, status, reason FROM plan_rows"),
        "judgments": q("SELECT subject_id, judge, criterion, verdict, rationale FROM judgments"),
        "calls": q("SELECT key, purpose, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens "
                   "FROM llm_calls"),
        "call_uses": q("SELECT call_key, subject_id, purpose FROM call_uses"),
    }


def _start(server, home: Path) -> subprocess.Popen:
    return subprocess.Popen(_command(server), env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_until(proc: subprocess.Popen, ready, what: str, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the build ended (exit {proc.returncode}) before {what}: {err[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _requests(server) -> int:
    with server.lock:
        return server.stats.requests["messages"]


def _kill(proc: subprocess.Popen, server, home: Path, sig: int, at_start: tuple[int, int],
          frozen: bool = False) -> dict:
    """Signal the build's process group mid-run (a frozen group, stopped with SIGSTOP, is continued
    after the signal). In flight: requests this run sent whose answers it had not stored in the call
    cache when it died (they are what a rerun may pay again)."""
    assert proc.poll() is None, "the build had already ended: the kill would not be mid-run"
    answered = _answered(server)
    os.killpg(proc.pid, sig)
    if frozen:
        os.killpg(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    time.sleep(3 * server.latency)  # handlers still running finish (or fail on the closed socket)
    sent, stored = _requests(server) - at_start[0], len(_cached_purposes(home)) - at_start[1]
    with server.lock:
        snapshot = dict(server.stats.answered)
    return {"signal": signal.Signals(sig).name, "answered": answered, "in_flight": sent - stored,
            "exit": proc.returncode, "stderr": err, "stdout": out, "snapshot": snapshot}


def _mark(server, home: Path) -> tuple[int, int]:
    return _requests(server), len(_cached_purposes(home))


def _reference_build(reference, reference_home: Path) -> tuple[list[str], int]:
    """The uninterrupted build every kill test compares with: (call purposes in answer order, calls)."""
    done = subprocess.run(_command(reference), env=_env(reference_home), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    order = _cached_purposes(reference_home)
    return order, _answered(reference)


@pytest.mark.heavy
def test_killed_in_generation_judging_and_load_resumes_to_the_uninterrupted_build(tmp_path):
    started = time.monotonic()
    reference_home, home = tmp_path / "reference", tmp_path / "killed"
    reference, server = _server(), _server()
    try:
        order, total = _reference_build(reference, reference_home)  # purposes in the order answered
        assert total == len(order) and order.count("generate") >= DOCS and order.count("judge") >= DOCS // 2
        generate_total, judge_total = order.count("generate"), order.count("judge")
        # kill 1: halfway through the first task's generation; kill 2: three quarters through judging
        first_gen = [i for i, p in enumerate(order, 1) if p == "generate"]
        judges = [i for i, p in enumerate(order, 1) if p == "judge"]
        kill_1, kill_2 = first_gen[len(first_gen) // 4], judges[(3 * len(judges)) // 4]
        kills = []

        # 1. SIGKILL during generation
        proc = _start(server, home)
        _wait_until(proc, lambda: _answered(server) >= kill_1, f"{kill_1} answers")
        kills.append(_kill(proc, server, home, signal.SIGKILL, (0, 0)))
        assert kills[-1]["exit"] == -signal.SIGKILL
        cached = _cached_purposes(home)
        assert 0 < cached.count("generate") < generate_total, "not killed during generation"

        # 2. SIGTERM during judging: the build stops cleanly, says so in one line, and is marked interrupted
        at_start = _mark(server, home)
        proc = _start(server, home)
        _wait_until(proc, lambda: _answered(server) >= kill_2, f"{kill_2} answers")
        kills.append(_kill(proc, server, home, signal.SIGTERM, at_start))
        assert kills[-1]["exit"] == 128 + signal.SIGTERM, kills[-1]["stderr"][-2000:]
        lines = [ln for ln in kills[-1]["stderr"].splitlines() if ln.strip()]
        assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0] and "rerun" in lines[0], lines
        cached = _cached_purposes(home)
        assert 0 < cached.count("judge") < judge_total, "not killed during judging"
        assert _query(home, "SELECT status FROM builds") == [("interrupted",)]
        assert _query(home, "SELECT count(*) FROM documents") == [(0,)]

        # 3. SIGKILL during the load: every call is made, and the load is held at the warehouse lock
        #    (taken here), so the kill lands after the calls and before the load's transaction.
        at_start = _mark(server, home)
        proc = _start(server, home)
        _wait_until(proc, lambda: len(server.stats.answered) >= len(reference.stats.answered), "every answer")
        holder = None
        deadline = time.monotonic() + 120
        while holder is None:
            try:
                holder = duckdb.connect(str(home / "msm.duckdb"))
            except duckdb.IOException:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        try:
            waiting = proc.stderr.readline()
            assert "waiting for the warehouse" in waiting, waiting
            stage = next((home / "builds").glob("*/logs/stage")).read_text().strip()
            assert stage == "load", stage
            kills.append(_kill(proc, server, home, signal.SIGKILL, at_start))
            assert kills[-1]["exit"] == -signal.SIGKILL
        finally:
            holder.close()
        assert _query(home, "SELECT status, (SELECT count(*) FROM documents) FROM builds") == [("running", 0)]

        # one rerun finishes it
        final = subprocess.run(_command(server), env=_env(home), capture_output=True, text=True, timeout=600)
        assert final.returncode == 0, final.stderr
        assert "complete" in final.stdout

        # the same home as the uninterrupted build: documents, texts, kept set, judgments, calls
        # the same home as the uninterrupted build; calls counted at the server
        paid_twice = _assert_resumed(reference_home, home, reference, server, kills, total)
        assert kills[-1]["in_flight"] == 0  # at the load every call was already made
        print(f"\nreference {total} calls ({generate_total} generate, {judge_total} judge); killed at "
              + ", ".join(f"{k['signal']} after {k['answered']} answers ({k['in_flight']} in flight, "
                        f"{k['paid_twice']} paid twice)" for k in kills)
              + f"; {paid_twice} call(s) paid twice; {time.monotonic() - started:.0f} s")
    finally:
        reference.stop()
        server.stop()


def test_an_unreadable_shard_is_redone_from_the_cache(loopback, monkeypatch, isolated_home):
    """A 0-byte or cut-off shard (an older msm, a full disk) never blocks a rerun: its task runs
    again, all from the call cache, whatever datatrove's completion marker says."""
    from pipelines.build import BuildOptions, build_corpus

    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    loopback.output_tokens = 400
    opts = BuildOptions(docs=8, tasks=2, backend="anthropic", model=MODEL, base_url=loopback.url, progress=False,
                        concurrency=4, dedup=("minhash",))
    first = build_corpus(str(SPEC), opts)
    assert first.complete
    staged = isolated_home / "builds" / first.build_id / "staged"
    assert sorted(p.name for p in staged.iterdir()) == ["00000.parquet", "00001.parquet"]  # no .partial left
    (staged / "00000.parquet").write_bytes(b"")
    cut = (staged / "00001.parquet").read_bytes()
    (staged / "00001.parquet").write_bytes(cut[: len(cut) // 2])
    (staged / "00001.parquet.partial").write_bytes(b"PAR1")
    calls = loopback.stats.requests["messages"]
    again = build_corpus(str(SPEC), opts)
    assert again.complete and again.corpus_id == first.corpus_id
    assert loopback.stats.requests["messages"] == calls
    assert sorted(p.name for p in staged.iterdir()) == ["00000.parquet", "00001.parquet"]


def test_sigint_stops_the_build_in_one_line_and_marks_it_interrupted(loopback, isolated_home):
    loopback.latency, loopback.output_tokens = 0.1, 400
    proc = _start(loopback, isolated_home)
    _wait_until(proc, lambda: _answered(loopback) >= 4, "4 answers")
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)  # Ctrl-C reaches the main process
    out, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130 and len(lines) == 1, err
    assert "interrupted by SIGINT" in lines[0] and "rerun the same command" in lines[0]
    assert _query(isolated_home, "SELECT status FROM builds") == [("interrupted",)]
    for shard in (isolated_home / "builds").glob("*/staged/*.parquet"):  # whatever is there can be read
        import pyarrow.parquet as pq

        pq.read_table(shard)
    assert "Traceback" in next((isolated_home / "builds").glob("*/logs/build.log")).read_text()


# ---- the slow sweep: ten kill points over every stage ------------------------------------------

SWEEP_SHARES = {"generate": (0.1, 0.35, 0.6, 0.85), "judge": (0.3, 0.6, 0.9)}  # of each purpose's answers


def _stage_of(home: Path) -> str | None:
    found = list((home / "builds").glob("*/logs/stage"))
    return found[0].read_text().strip() if found else None


def _kill_in_stage(proc: subprocess.Popen, server, home: Path, stage: str, sig: int, at_start) -> dict:
    """Every call made, wait for the build to enter `stage` (the stage file, written as each stage
    starts), freeze its process group there (SIGSTOP), check it is still in that stage, then signal it."""
    _wait_until(proc, lambda: _stage_of(home) == stage, f"the {stage} stage", limit=300)
    os.killpg(proc.pid, signal.SIGSTOP)
    frozen = _stage_of(home)
    assert frozen == stage, f"the build had left {stage} for {frozen} before it was frozen"
    kill = _kill(proc, server, home, sig, at_start, frozen=True)
    kill["stage"] = stage
    return kill


@pytest.mark.slow
def test_ten_kill_points_over_every_stage_resume_to_the_uninterrupted_build(tmp_path):
    """Seven kills chosen by answers (four in generation, three in judging), then one each in
    near-duplicate detection (MinHash), decontamination and the load, alternating SIGKILL and SIGTERM,
    all in one home; one rerun then equals an uninterrupted reference, and only the calls in flight
    at a kill are paid twice."""
    started = time.monotonic()
    reference_home, home = tmp_path / "reference", tmp_path / "killed"
    reference, server = _server(), _server()
    try:
        order, total = _reference_build(reference, reference_home)  # purposes in the order answered
        assert total == len(order)
        totals = {p: order.count(p) for p in SWEEP_SHARES}
        points = sorted({[i for i, p in enumerate(order, 1) if p == purpose][int(share * totals[purpose])]: purpose
                         for purpose, shares in SWEEP_SHARES.items() for share in shares}.items())
        assert len(points) == 7 and all(b - a > CONCURRENCY for (a, _), (b, _) in zip(points, points[1:])), points
        signals = [signal.SIGKILL, signal.SIGTERM]
        kills = []
        for n, (answers, purpose) in enumerate(points):
            at_start = _mark(server, home)
            before = _cached_purposes(home)
            proc = _start(server, home)
            _wait_until(proc, lambda: _answered(server) >= answers, f"{answers} answers")
            sig = signals[n % 2]
            kills.append(_kill(proc, server, home, sig, at_start))
            kills[-1]["stage"] = purpose
            assert kills[-1]["exit"] == (-sig if sig == signal.SIGKILL else 128 + sig), kills[-1]["stderr"][-2000:]
            if sig == signal.SIGTERM:
                lines = [ln for ln in kills[-1]["stderr"].splitlines() if ln.strip()]
                assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0], lines
                assert _query(home, "SELECT status FROM builds") == [("interrupted",)]
            cached = _cached_purposes(home)
            assert 0 < cached.count(purpose) < totals[purpose], f"not killed during {purpose}"
            assert len(cached) > len(before), "the run was killed before it did any work"
        assert _query(home, "SELECT count(*) FROM documents") == [(0,)]

        # every call made: near-duplicates, decontamination (frozen in the stage, then signalled) and the load
        for stage, sig in (("near-dup", signal.SIGKILL), ("decontaminate", signal.SIGTERM)):
            at_start = _mark(server, home)
            for stale in (home / "builds").glob("*/logs/stage"):
                stale.unlink()  # the last run's stage, so the wait sees this run's
            proc = _start(server, home)
            kills.append(_kill_in_stage(proc, server, home, stage, sig, at_start))
            assert len(server.stats.answered) == len(reference.stats.answered), "a call was still to be made"
            assert kills[-1]["exit"] == (-sig if sig == signal.SIGKILL else 128 + sig), kills[-1]["stderr"][-2000:]
        # the load: frozen as it enters it; the warehouse lock taken then makes it wait, and it is killed
        # waiting (or, when it already holds the warehouse, inside the load's transaction)
        at_start = _mark(server, home)
        for stale in (home / "builds").glob("*/logs/stage"):
            stale.unlink()
        proc = _start(server, home)
        _wait_until(proc, lambda: _stage_of(home) == "load", "the load stage", limit=300)
        os.killpg(proc.pid, signal.SIGSTOP)
        assert _stage_of(home) == "load"
        try:
            holder = duckdb.connect(str(home / "msm.duckdb"))
        except duckdb.IOException:
            holder = None
        try:
            if holder is not None:
                os.killpg(proc.pid, signal.SIGCONT)
                waiting = proc.stderr.readline()
                assert "waiting for the warehouse" in waiting, waiting
            kills.append(_kill(proc, server, home, signal.SIGKILL, at_start))
            kills[-1]["stage"] = "load (waiting for the lock)" if holder is not None else "load (in its transaction)"
        finally:
            if holder is not None:
                holder.close()
        assert len(kills) == 10
        assert _query(home, "SELECT count(*) FROM documents") == [(0,)]

        final = subprocess.run(_command(server), env=_env(home), capture_output=True, text=True, timeout=600)
        assert final.returncode == 0, final.stderr
        paid_twice = _assert_resumed(reference_home, home, reference, server, kills, total)
        assert all(k["in_flight"] == 0 for k in kills[-3:])  # after the calls, nothing is paid again
        print(f"\nreference {total} calls ({totals}); killed in "
              + ", ".join(f"{k['stage']} by {k['signal']} after {k['answered']} answers ({k['paid_twice']} paid twice)"
                          for k in kills)
              + f"; {paid_twice} call(s) paid twice; {time.monotonic() - started:.0f} s")
    finally:
        reference.stop()
        server.stop()


@pytest.mark.slow
def test_sigterm_at_every_fourth_answer_ends_promptly_in_one_line(tmp_path):
    """The hang guard: SIGTERM (Slurm's time limit) at every fourth answer, generation and judging
    alike, each time in the same home; every run ends on its own with one line and the interrupted
    exit code, well inside a scheduler's kill grace period, and the last rerun finishes the build."""
    reference_home, home = tmp_path / "reference", tmp_path / "home"
    reference, server = _server(), _server()
    try:
        order, total = _reference_build(reference, reference_home)
        points = list(range(3, total - CONCURRENCY, 4))
        waits = []
        for answers in points:
            if _answered(server) >= answers:
                continue  # a previous run's in-flight calls already got this far
            proc = _start(server, home)
            _wait_until(proc, lambda: _answered(server) >= answers, f"{answers} answers")
            signalled = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                out, err = proc.communicate(timeout=60)  # a hang would be killed by the scheduler after its grace
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"the build hung after SIGTERM at {answers} answers")
            waits.append(time.monotonic() - signalled)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
            assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0], lines
        assert len(waits) >= len(points) // 2
        final = subprocess.run(_command(server), env=_env(home), capture_output=True, text=True, timeout=600)
        assert final.returncode == 0, final.stderr
        want, got = _state(reference_home), _state(home)
        for key in want:
            assert got[key] == want[key], key
        assert _answered(server) - total <= CONCURRENCY * len(waits)  # at most the calls in flight at each
        print(f"\n{len(waits)} SIGTERMs over {total} answers: exit after {min(waits):.2f}-{max(waits):.2f} s "
              f"(median {sorted(waits)[len(waits) // 2]:.2f} s); {_answered(server) - total} call(s) paid twice")
    finally:
        reference.stop()
        server.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs (root only), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["generate", "judge"])
def test_a_disk_filled_mid_build_then_freed_resumes_to_the_uninterrupted_build(tmp_path, small_disk, stage):
    """The home on a small tmpfs; mid-generation (or mid-judging) a ballast file fills the disk. The
    build stops by itself with one line naming the full disk and the log, and makes no call after
    the first answer it could not store; once the ballast is gone one rerun equals an uninterrupted
    build, paying again at most the calls in flight."""
    import errno

    reference_home, home = tmp_path / "reference", small_disk / "home"
    reference, server = _server(), _server()
    try:
        done = subprocess.run(_command(reference), env=_env(reference_home), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        order = _cached_purposes(reference_home)
        answers = [i for i, p in enumerate(order, 1) if p == stage]
        fill_at = answers[len(answers) // 4]
        proc = _start(server, home)
        _wait_until(proc, lambda: _answered(server) >= fill_at, f"{fill_at} answers")
        ballast = small_disk / "ballast"
        with open(ballast, "wb", buffering=0) as fh:
            with pytest.raises(OSError) as full:
                while True:
                    fh.write(b"\0" * (1 << 20))
        assert full.value.errno == errno.ENOSPC
        assert proc.poll() is None, "the build ended before the disk was full"
        out, err = proc.communicate(timeout=300)  # it stops by itself
        ballast.unlink()
        cached = _cached_purposes(home)
        assert proc.returncode not in (0, 75) and 0 < len(cached) < len(order), err[-2000:]
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert ("no space left on device" in lines[-1] or "disk is full" in lines[-1]) and "build.log" in lines[-1], \
            lines[-1]  # a shard or the call cache, whichever met the full disk first
        # the mark itself is a write: on the full disk the warehouse may not take it (the rerun resumes either way)
        assert _query(home, "SELECT status FROM builds") in ([("failed",)], [("running",)])

        final = subprocess.run(_command(server), env=_env(home), capture_output=True, text=True, timeout=600)
        assert final.returncode == 0, final.stderr
        want, got = _state(reference_home), _state(home)
        for key in want:
            assert got[key] == want[key], key
        paid_twice = _answered(server) - _answered(reference)
        assert set(server.stats.answered) == set(reference.stats.answered)
        print(f"\nfilled after {fill_at} of {len(order)} answers ({stage}); exit {proc.returncode}, "
              f"{len(lines)} stderr line(s); {paid_twice} call(s) paid twice")
        assert len(lines) == 1, lines[:6]  # datatrove's log sink says nothing of its own on the full disk
        assert paid_twice <= CONCURRENCY, f"{paid_twice} calls paid twice, more than the {CONCURRENCY} in flight"
    finally:
        reference.stop()
        server.stop()
