"""The hooks benchmarks pin the loopback and scale the client with (issue 23): a fixed fault
schedule, rejections before the latency, a stalled Messages stream, the judge's pinned condition-check
pass rate, and one time scale for the client's timeouts and backoff."""

from __future__ import annotations

import json
import time

from msm.llm.anthropic_backend import AnthropicBackend
from msm.llm.client import LLMClient, RetryPolicy
from msm.llm.testing import Faults, LINK_CHECKS, fake_verdicts
from msm.llm.types import Request
from tests.conftest import LOOPBACK_KEY

MODEL = "claude-sonnet-4-6"


def client(server, scale: float = 1.0, concurrency: int = 4) -> LLMClient:
    backend = AnthropicBackend(api_key=LOOPBACK_KEY, base_url=server.url, time_scale=scale)
    return LLMClient(backend, model=MODEL, concurrency=concurrency, retry=RetryPolicy(time_scale=scale))


def test_retry_policy_time_scale_divides_backoff_but_not_retry_after():
    scaled = RetryPolicy(time_scale=100)
    assert all(scaled.delay(6, None) <= 30.0 / 100 for _ in range(200))
    assert scaled.delay(1, 0.7) >= 0.7  # the server's retry-after is already in the run's time
    assert RetryPolicy().time_scale == 1.0 and RetryPolicy().max_delay == 30.0


def test_a_fault_schedule_injects_exactly_its_counts(loopback):
    loopback.faults = Faults(schedule=("429", None, "500", None, None), retry_after=0.01)
    results = client(loopback, scale=100).complete([Request.user(f"q{i}", max_tokens=8) for i in range(8)])
    assert all(r.ok for r in results)
    arrivals = loopback.stats.requests["messages"]
    assert arrivals == 8 + sum(loopback.stats.faults.values())
    assert dict(loopback.stats.faults) == {"429": -(-arrivals // 5), "500": -(-(arrivals - 2) // 5)}


def test_rejections_come_before_the_latency_and_other_faults_after(loopback):
    loopback.latency = 0.5
    loopback.faults = Faults(schedule=("429",), reject_first=("429",), retry_after=0.01)
    backend = AnthropicBackend(api_key=LOOPBACK_KEY, base_url=loopback.url)
    import asyncio

    started = time.monotonic()
    try:
        asyncio.run(backend.call(Request.user("q", max_tokens=8), MODEL))
    except Exception as exc:  # noqa: BLE001
        assert "429" in str(exc)
    assert time.monotonic() - started < 0.4


def test_a_stalled_stream_is_cut_by_the_scaled_idle_timeout_and_retried(loopback):
    loopback.faults = Faults(schedule=("stall", None), stall_after=0.05, stall_s=30)
    c = client(loopback, scale=60)  # idle timeout 120 s / 60 = 2 s
    started = time.monotonic()
    [result] = c.complete([Request.user("write a long answer", max_tokens=256)])
    took = time.monotonic() - started
    assert result.ok and c.stats.retries == 1 and loopback.stats.faults["stall"] == 1
    assert 2.0 <= took < 5.0
    assert sum(loopback.stats.answered.values()) == 1


def test_the_judge_passes_condition_checks_at_the_pinned_rate():
    criteria = list(LINK_CHECKS)[:2]
    passed = total = 0
    for i in range(2000):
        verdicts = json.loads(fake_verdicts(f"<document>doc {i} because</document>", criteria, 0.0, None, 0.9))
        passed += sum(v["verdict"] for v in verdicts.values())
        total += len(verdicts)
    assert abs(passed / total - 0.9) < 0.015


def test_vary_repeats_gives_a_prompt_asked_again_another_sample(loopback):
    """Off (the default), a prompt gets one answer, which exact-duplicate tests rely on; on, the
    second asking gets another text, as a real model at temperature 1 would write."""
    prompt = "Write a memo.\n<document>"
    first, again = loopback.answer(prompt, 500, [])[0], loopback.answer(prompt, 500, [])[0]
    assert first == again
    loopback.vary_repeats = True
    samples = [loopback.answer(prompt, 500, [])[0] for _ in range(3)]
    assert len(set(samples)) == 3 and samples[0] == first


def test_a_retry_after_is_a_floor_spread_so_waiters_do_not_return_together():
    policy = RetryPolicy()
    waits = [policy.delay(1, 10.0) for _ in range(400)]
    assert min(waits) >= 10.0 and max(waits) <= 12.5
    # spread through the window: a quarter of the draws in each quarter of it, roughly
    quarters = [sum(10 + 0.625 * q <= w < 10 + 0.625 * (q + 1) for w in waits) for q in range(4)]
    assert all(60 <= n <= 140 for n in quarters), quarters
