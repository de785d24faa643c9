"""The call cache: answers served, errors never served, shards, concurrent writers, maintenance."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from msm.llm.cache import CacheError, CallCache
from msm.llm.types import Request, Response, Usage
from tests.conftest import run_msm


def answer(req: Request, text="ok", error=None) -> Response:
    return Response(text=text, stop_reason="error" if error else "end_turn", usage=Usage(10, 5), cost_usd=0.01,
                    backend="anthropic", model="m", key=req.key("anthropic", "m"), error=error)


def test_answers_are_served_and_errors_are_not(tmp_path):
    cache = CallCache(tmp_path)
    req = Request.user("a", purpose="generate")
    key = req.key("anthropic", "m")
    assert cache.get(key) is None
    cache.put(req, answer(req, error="HTTP 500"))
    assert cache.get(key) is None  # stored as an error, never served
    cache.put(req, answer(req, text="real"))
    hit = cache.get(key)
    assert hit.text == "real" and hit.cached and hit.usage == Usage(10, 5) and hit.error is None
    cache.put(req, answer(req, error="later failure"))  # an error never overwrites an answer
    assert cache.get(key).text == "real"


def test_shards_are_read_together_and_merged(tmp_path):
    reqs = [Request.user(f"q{i}") for i in range(3)]
    for rank, req in enumerate(reqs):
        shard = CallCache(tmp_path, shard=str(rank))
        shard.put(req, answer(req, text=f"from {rank}"))
        shard.close()
    reader = CallCache(tmp_path)
    assert [reader.get(r.key("anthropic", "m")).text for r in reqs] == ["from 0", "from 1", "from 2"]
    assert reader.merge_shards() == 3
    main_only = CallCache(tmp_path)
    row = main_only._writer.execute("SELECT count(*) FROM calls").fetchone()[0]
    assert row == 3


def test_a_shared_prefix_is_stored_once(tmp_path):
    spec = "The whole spec. " * 2000
    reqs = [Request.user(f"document {i}", system_prefix=spec) for i in range(5)]
    shard = CallCache(tmp_path, shard="0")
    for req in reqs:
        shard.put(req, answer(req))
    shard.close()
    cache = CallCache(tmp_path)
    assert cache.merge_shards() == 5
    con = cache._writer
    assert con.execute("SELECT count(*) FROM prefixes").fetchone()[0] == 1
    assert con.execute("SELECT max(length(request)) FROM calls").fetchone()[0] < 1000  # not 32 kB a row
    stored = cache.request(reqs[3].key("anthropic", "m"))
    assert stored["system_prefix"] == spec and stored["messages"][0]["content"] == "document 3"


def test_many_processes_write_at_once(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from msm.llm.cache import CallCache
        from msm.llm.types import Request, Response, Usage
        cache = CallCache({str(tmp_path)!r})
        worker = sys.argv[1]
        for i in range(150):
            req = Request.user(f"w{{worker}}-{{i}}")
            cache.put(req, Response(text="x", stop_reason="end_turn", usage=Usage(1, 1), backend="b", model="m",
                                    key=req.key("b", "m")))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w)]) for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    assert CallCache(tmp_path).stats()["calls"] == 600


def test_stats_and_prune(tmp_path):
    cache = CallCache(tmp_path)
    good, bad = Request.user("good", purpose="judge"), Request.user("bad")
    cache.put(good, answer(good))
    cache.put(bad, answer(bad, error="gave up"))
    stats = cache.stats()
    assert stats["calls"] == 2 and stats["errors"] == 1 and stats["cost_usd"] == pytest.approx(0.02)
    assert {row["purpose"] for row in stats["by"]} == {"judge", "other"}
    assert cache.prune(errors=True) == 1
    assert cache.prune(older_than_s=3600) == 0
    time.sleep(0.05)
    assert cache.prune(older_than_s=0.01) == 1
    assert cache.stats()["calls"] == 0


def test_read_only_location_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="cannot open the call cache"):
        CallCache(blocker / "cache")
    with pytest.raises(CacheError, match="writable"):
        CallCache("/proc/msm-cache")


def test_cache_cli(tmp_path, isolated_home):
    cache = CallCache(isolated_home / "cache")
    req = Request.user("x", purpose="generate")
    cache.put(req, answer(req))
    cache.close()
    out = run_msm("cache", "stats").stdout
    assert "calls: 1  errors: 0" in out and "generate" in out
    assert run_msm("cache", "prune", "--older-than", "30d").stdout.strip() == "removed 0 entries"
    bad = run_msm("cache", "prune", "--older-than", "soon")
    assert bad.returncode != 0 and "30d" in bad.stderr
    assert run_msm("cache", "prune").returncode != 0
    ro = run_msm("cache", "stats", env={"MSM_HOME": "/proc/msm-home"})
    assert ro.returncode != 0 and "cannot open the call cache" in ro.stderr and "Traceback" not in ro.stderr


def test_processes_opening_a_fresh_cache_together_all_succeed(tmp_path):
    """Two workers switching one new file to WAL at the same moment used to fail with 'database is locked'."""
    script = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from msm.llm.cache import CallCache
        root, rounds, start = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
        for r in range(rounds):
            while time.time() < start + 0.05 * r:
                pass
            CallCache(root / f"round{r}").close()
    """)
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), "30", str(start)],
                              stderr=subprocess.PIPE, text=True) for _ in range(5)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 5, "\n".join(errors)
    assert len(list(tmp_path.glob("round*/calls.sqlite"))) == 30
