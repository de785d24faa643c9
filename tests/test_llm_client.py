"""The client against the loopback server, through the real anthropic and openai SDKs."""

from __future__ import annotations

import asyncio
import time

import pytest

from msm.llm.anthropic_backend import AnthropicBackend
from msm.llm.base import FatalError, ScoreItem
from msm.llm.cache import CallCache
from msm.llm.client import LLMClient, RetryPolicy
from msm.llm.openai_backend import OpenAIBackend
from msm.llm.testing import Faults
from msm.llm.types import Request
from tests.conftest import LOOPBACK_KEY, assert_one_line_error, run_msm

FAST_RETRY = RetryPolicy(max_attempts=6, base_delay=0.02, max_delay=0.2)
MODEL = "claude-sonnet-4-6"


def anthropic_client(server, cache=None, key=LOOPBACK_KEY, idle_timeout=5.0, **kw) -> LLMClient:
    backend = AnthropicBackend(api_key=key, base_url=server.url, idle_timeout=idle_timeout)
    return LLMClient(backend, model=MODEL, cache=cache, retry=kw.pop("retry", FAST_RETRY), **kw)


def docs(n: int, **kw) -> list[Request]:
    return [Request.user(f"Write document {i}.", max_tokens=100, purpose="generate", **kw) for i in range(n)]


def test_completion_usage_and_cost(loopback):
    [r] = anthropic_client(loopback).complete([Request.user("hello", max_tokens=200)])
    assert r.ok and r.text and r.stop_reason == "end_turn" and not r.truncated
    assert r.usage.output_tokens > 0 and r.backend == "anthropic" and r.model == MODEL and len(r.key) == 64
    assert r.cost_usd == pytest.approx((r.usage.input_tokens * 3 + r.usage.output_tokens * 15) / 1e6)


def test_rerun_is_served_from_cache_with_zero_calls(loopback, tmp_path):
    requests = docs(20)
    first = anthropic_client(loopback, cache=CallCache(tmp_path)).complete(requests)
    made = loopback.stats.requests["messages"]
    client = anthropic_client(loopback, cache=CallCache(tmp_path))
    second = client.complete(requests)
    assert loopback.stats.requests["messages"] == made
    assert client.stats.calls == 0 and client.stats.cache_hits == 20
    assert [r.text for r in first] == [r.text for r in second] and all(r.cached for r in second)


def test_mixed_faults_lose_nothing_and_duplicate_nothing(loopback, tmp_path):
    loopback.faults = Faults(rate=0.3, retry_after=0.05, hang_s=10)
    client = anthropic_client(loopback, cache=CallCache(tmp_path), idle_timeout=0.5, concurrency=16)
    requests = docs(60)
    results = client.complete(requests)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert len({r.key for r in results}) == 60
    assert max(loopback.stats.answered.values()) == 1  # no request answered twice
    assert sum(loopback.stats.faults.values()) > 0 and client.stats.retries > 0


def test_hung_connection_is_cut_and_retried(loopback):
    loopback.faults = Faults(rate=1.0, kinds=("hang",), hang_s=10)
    client = anthropic_client(loopback, idle_timeout=0.3, retry=RetryPolicy(max_attempts=2, base_delay=0.01))
    start = time.monotonic()
    [r] = client.complete([Request.user("x")])
    assert time.monotonic() - start < 5
    assert not r.ok and "gave up after 2 attempts" in r.error and "timed out" in r.error.lower()
    loopback.faults = Faults()
    [again] = anthropic_client(loopback).complete([Request.user("x")])
    assert again.ok  # a stored error is not served: the retry makes the call


def test_refusal_and_truncation_are_recorded_not_retried(loopback, tmp_path):
    cache = CallCache(tmp_path)
    client = anthropic_client(loopback, cache=cache)
    refused, cut = client.complete([Request.user("please [refuse] this"), Request.user("long", max_tokens=5)])
    assert refused.refused and refused.ok and refused.text == ""
    assert cut.truncated and cut.ok
    assert client.stats.calls == 2 and client.stats.retries == 0
    assert cache.get(refused.key).stop_reason == "refusal"


def test_auth_failure_fails_fast_without_leaking_the_key(loopback):
    secret = "sk-ant-very-secret-value"
    client = anthropic_client(loopback, key=secret)
    start = time.monotonic()
    with pytest.raises(FatalError) as info:
        client.complete(docs(10))
    assert time.monotonic() - start < 5 and loopback.stats.requests["messages"] <= 10
    assert "refused the key" in str(info.value) and secret not in str(info.value)


def test_unknown_model_fails_fast(loopback):
    loopback.models = ("claude-sonnet-4-6",)
    backend = AnthropicBackend(api_key=LOOPBACK_KEY, base_url=loopback.url)
    client = LLMClient(backend, model="claude-sonnet-4-6-20990101", retry=FAST_RETRY)
    with pytest.raises(FatalError, match="HTTP 404"):
        client.complete([Request.user("x")])


def test_budget_stops_new_calls_and_a_rerun_finishes(loopback, tmp_path):
    requests = docs(30)
    client = anthropic_client(loopback, cache=CallCache(tmp_path), max_cost=0.004, concurrency=2)
    results = client.complete(requests)
    pending = [r for r in results if r.stop_reason == "pending"]
    finished = [r for r in results if r.ok]
    assert pending and finished and len(pending) + len(finished) == 30
    assert all("max-cost" in r.error for r in pending)
    assert client.stats.spent_usd >= 0.004
    rerun = anthropic_client(loopback, cache=CallCache(tmp_path))
    assert all(r.ok for r in rerun.complete(requests))
    assert rerun.stats.calls == len(pending) and rerun.stats.cache_hits == len(finished)


def test_a_cache_that_cannot_store_stops_every_further_call(loopback, tmp_path):
    """A full disk: the first answer the cache cannot store stops the client, so no call after it
    is paid for and lost (the rerun would pay it again); only the calls already in flight are."""
    from msm.llm.cache import CacheError

    cache = CallCache(tmp_path)
    pages = cache._writer.execute("PRAGMA page_count").fetchone()[0]
    cache._writer.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own 'database or disk is full'
    client = anthropic_client(loopback, cache=cache, concurrency=2)

    async def streamed():  # as the pipeline's steps call it: each request on its own, all under one gate
        try:
            return await asyncio.gather(*(client.complete_one(r) for r in docs(30)), return_exceptions=True)
        finally:
            await client.backend.aclose()

    results = asyncio.run(streamed())
    failed = [r for r in results if isinstance(r, CacheError)]
    assert failed and all(isinstance(r, CacheError) or r.ok for r in results)
    assert "full" in failed[0].problem and "free some space" in failed[0].fix
    stored = cache._writer.execute("SELECT count(*) FROM calls").fetchone()[0]
    unstored = sum(loopback.stats.answered.values()) - stored
    assert stored < 30 and 1 <= unstored <= 2  # the one that failed to store, and the one beside it


def test_prompt_caching_bills_the_shared_prefix_as_reads(loopback):
    spec = "The assistant explains its values. " * 400  # ~3.5k tokens
    requests = [Request.user(f"doc {i}", system_prefix=spec, system=f"genre {i % 3}") for i in range(24)]
    results = anthropic_client(loopback, concurrency=8).complete(requests)
    reads = sum(r.usage.cache_read_tokens for r in results)
    writes = sum(r.usage.cache_write_tokens for r in results)
    billed = reads + writes + sum(r.usage.input_tokens for r in results)
    assert sum(1 for r in results if r.usage.cache_write_tokens) == 1  # the first request warms the cache alone
    assert reads / billed > 0.9


def test_batch_persists_its_id_and_a_restart_resumes_it(loopback, tmp_path):
    loopback.batch_latency = 1.0
    requests = docs(8)

    async def interrupted():
        client = anthropic_client(loopback, cache=CallCache(tmp_path), batch_poll_s=0.05)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.complete_many(requests, batch=True), timeout=0.5)

    asyncio.run(interrupted())
    assert loopback.stats.batches_created == 1
    assert len(CallCache(tmp_path).open_batches("anthropic", MODEL)) == 1
    client = anthropic_client(loopback, cache=CallCache(tmp_path), batch_poll_s=0.05)
    results = client.complete(requests, batch=True)
    assert loopback.stats.batches_created == 1  # polled the same batch, did not pay twice
    assert all(r.ok and r.batch for r in results)
    usage = results[0].usage
    assert results[0].cost_usd == pytest.approx((usage.input_tokens * 3 + usage.output_tokens * 15) / 1e6 * 0.5)
    assert CallCache(tmp_path).open_batches("anthropic", MODEL) == []


def test_failed_batch_items_fall_back_to_streaming(loopback, tmp_path):
    loopback.faults = Faults(batch_item_rate=0.5)
    client = anthropic_client(loopback, cache=CallCache(tmp_path), batch_poll_s=0.02)
    results = client.complete(docs(20), batch=True)
    assert all(r.ok for r in results)
    streamed = [r for r in results if not r.batch]
    assert streamed and loopback.stats.requests["messages"] == len(streamed)


def test_openai_backend_chat_and_scoring(loopback):
    backend = OpenAIBackend(base_url=loopback.url + "/v1", api_key=LOOPBACK_KEY, model="served-model")
    client = LLMClient(backend, retry=FAST_RETRY)
    [r] = client.complete([Request.user("hi", max_tokens=20, seed=3)])  # the sync wrapper closes its backend
    assert r.ok and r.text and r.cost_usd == 0.0 and r.model == "served-model"
    backend = OpenAIBackend(base_url=loopback.url + "/v1", api_key=LOOPBACK_KEY, model="served-model")
    client = LLMClient(backend, retry=FAST_RETRY)

    async def score():
        try:
            return await client.score_many([ScoreItem("The cat sat", (" on the mat", " down"))])
        finally:
            await backend.aclose()

    [[mat, down]] = asyncio.run(score())
    assert mat.tokens == [" on", " the", " mat"] and len(mat.per_token) == 3
    assert mat.total == pytest.approx(sum(mat.per_token)) and down.tokens == [" down"]


def test_anthropic_cannot_score(loopback):
    client = anthropic_client(loopback)
    with pytest.raises(FatalError, match="cannot score"):
        asyncio.run(client.score_many([ScoreItem("a", ("b",))]))


def test_ping_cli_against_loopback(loopback):
    env = {"ANTHROPIC_API_KEY": LOOPBACK_KEY}
    out = run_msm("llm", "ping", "--backend", "anthropic", "--model", MODEL, "--base-url", loopback.url, env=env)
    assert out.returncode == 0, out.stderr
    assert "backend: anthropic" in out.stdout and "answer:" in out.stdout
    loopback.models, loopback.slots = ("served-model",), 3
    out = run_msm("llm", "ping", "--backend", "openai", "--base-url", loopback.url + "/v1", "--model", "served-model",
                  env={"OPENAI_API_KEY": LOOPBACK_KEY})
    assert out.returncode == 0 and "answer:" in out.stdout and "slots: 3" in out.stdout, out.stderr
    assert loopback.stats.requests["chat"] == 1  # a real completion, not a listing of names
    wrong = run_msm("llm", "ping", "--backend", "openai", "--base-url", loopback.url + "/v1", "--model", "m",
                    env={"OPENAI_API_KEY": LOOPBACK_KEY})
    assert_one_line_error(wrong, "does not serve model 'm'", "it serves: served-model", "--model")
    # a one-model server that answers under any name (llama-cpp-python) lists its one name
    loopback.models, chats = (), loopback.stats.requests["chat"]
    lenient = run_msm("llm", "ping", "--backend", "openai", "--base-url", loopback.url + "/v1", "--model", "m",
                      env={"OPENAI_API_KEY": LOOPBACK_KEY})
    assert_one_line_error(lenient, "does not serve model 'm'", "it serves: loopback-model")
    assert loopback.stats.requests["chat"] == chats  # refused before any completion


def test_unreachable_server_is_a_bounded_clear_error():
    start = time.monotonic()
    result = run_msm("llm", "ping", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                     "--timeout", "1")
    assert time.monotonic() - start < 30
    assert_one_line_error(result, "did not answer after 3 tries", "check the URL")


def test_missing_key_cli():
    result = run_msm("llm", "ping", "--backend", "anthropic", env={"MSM_NO_SPEND": "0"})
    assert_one_line_error(result, "needs an API key", "ANTHROPIC_API_KEY")


def test_a_batch_over_the_size_limit_is_split_into_batches_the_api_accepts(loopback, tmp_path, monkeypatch):
    """Requests are split by count and by bytes (the API refuses over 100,000 requests or 256 MB);
    every part is submitted and every answer comes back once."""
    import msm.llm.client as client_module
    from msm.llm.client import batch_parts, request_bytes

    requests = docs(30)
    weight = max(request_bytes(r) for r in requests)
    monkeypatch.setattr(client_module, "MAX_BATCH_BYTES", weight * 8)
    parts = batch_parts({str(i): r for i, r in enumerate(requests)})
    assert len(parts) == 4 and sum(len(p) for p in parts) == 30
    assert all(sum(request_bytes(r) for r in p.values()) <= weight * 8 for p in parts)
    client = anthropic_client(loopback, cache=CallCache(tmp_path), batch_poll_s=0.02)
    results = client.complete(requests, batch=True)
    assert loopback.stats.batches_created == 4
    assert sorted(len(b["results"]) for b in loopback.batches.values()) == sorted(len(p) for p in parts)
    assert all(r.ok and r.batch for r in results) and len({r.key for r in results}) == 30
