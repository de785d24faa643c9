"""The openai backend against the loopback server behaving like llama.cpp's where they differ, through
the real `openai` SDK: scoring one prompt per request from next-token top log-probs, `echo` only where
a self-check shows it aligned, streamed chat answers under an idle limit that measures silence, and
the server's slots as the concurrency cap."""

from __future__ import annotations

import asyncio
import math
import time
from types import SimpleNamespace

import openai
import pytest

from msm.errors import MsmError
from msm.llm.base import FatalError, ScoreItem
from msm.llm.cache import CallCache
from msm.llm.client import LLMClient, RetryPolicy
from msm.llm.openai_backend import OpenAIBackend
from msm.llm.select import effective_concurrency
from msm.llm.testing import Faults, LoopbackServer, next_logprob, tokenize
from msm.llm.types import Request
from tests.conftest import LOOPBACK_KEY

FAST_RETRY = RetryPolicy(max_attempts=6, base_delay=0.02, max_delay=0.2)
MODEL = "served-model"


@pytest.fixture
def server():
    """llama.cpp-like by default: one prompt per request, logprobs capped at 20."""
    with LoopbackServer(api_key=LOOPBACK_KEY) as srv:
        yield srv


def client_for(srv, cache=None, retry=FAST_RETRY, concurrency=8, **backend_kw) -> LLMClient:
    backend = OpenAIBackend(base_url=srv.url + "/v1", api_key=LOOPBACK_KEY, model=MODEL, **backend_kw)
    return LLMClient(backend, cache=cache, retry=retry, concurrency=concurrency)


def run(client: LLMClient, work):
    async def go():
        try:
            return await work
        finally:
            await client.backend.aclose()
    return asyncio.run(go())


def letters(n: int) -> list[ScoreItem]:
    return [ScoreItem(f"Question: which option for errand {i}?\nA) walk\nB) drive\nAnswer:", ("A", "B"))
            for i in range(n)]


def expected(context: str, letter: str) -> float:
    """The server model's log-prob of the letter, with or without a leading space, whichever is higher."""
    return max(next_logprob(context, letter), next_logprob(context, " " + letter))


def wait_until(condition, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit  # detects a hang, measures nothing
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---- scoring ----------------------------------------------------------------------------------
def test_the_loopback_refuses_a_list_of_prompts_like_llama_cpp(server):
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=LOOPBACK_KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        sdk.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=1, logprobs=5)
    sdk.close()


def test_letters_are_scored_one_prompt_per_request_and_cached(server, tmp_path):
    items = letters(12)
    client = client_for(server, cache=CallCache(tmp_path))
    scores = run(client, client.score_many(items))
    for item, (a, b) in zip(items, scores):
        assert a.ok and b.ok
        assert a.total == pytest.approx(expected(item.context, "A"))
        assert b.total == pytest.approx(expected(item.context, "B"))
        assert a.per_token == [a.total] and a.tokens[0].strip() == "A"
    assert len({round(a.total, 6) for a, _ in scores}) > 1  # the scores follow the context
    assert server.stats.requests["completions"] == 12 == server.stats.requests["completions_answered"]
    again = client_for(server, cache=CallCache(tmp_path))
    assert [[s.total for s in pair] for pair in run(again, again.score_many(items))] == \
           [[s.total for s in pair] for pair in scores]
    assert server.stats.requests["completions"] == 12 and again.stats.cache_hits == 12


def test_a_logprobs_cap_is_met_by_asking_for_fewer_and_remembered():
    with LoopbackServer(api_key=LOOPBACK_KEY, max_logprobs=5) as srv:
        client = client_for(srv, concurrency=1)
        scores = run(client, client.score_many(letters(4)))
        assert all(s.ok for pair in scores for s in pair)
        assert client.backend.top_k == 5
        assert srv.stats.requests["completions"] == 2 + 4  # 20 and 10 refused once, then 5 for every item


def test_an_option_missing_from_the_top_logprobs_is_an_error_never_a_guess(tmp_path):
    from eval.bank import ChoiceItem
    from eval.suites.preferences import score_logprobs

    with LoopbackServer(api_key=LOOPBACK_KEY, hidden_tokens=(" B", "B")) as srv:
        client = client_for(srv, cache=CallCache(tmp_path))
        [[a, b]] = run(client, client.score_many(letters(1)))
        assert a.ok and not b.ok and math.isnan(b.total) and "'B' is not among the server's top 20" in b.error
        item = ChoiceItem("c-1", "travel", "Which way?", {"A": "walk", "B": "drive"}, {"thrift": "A"}, "held_out")
        client = client_for(srv, cache=CallCache(tmp_path))
        [sample] = score_logprobs([item], "thrift", lambda xs: run(client, client.score_many(xs)),
                                  lambda text: f"Question: {text}\nAnswer:")
        assert sample.score is None and sample.consistent_p is None and "not scored" in sample.error
        asked = srv.stats.requests["completions"]
        client = client_for(srv, cache=CallCache(tmp_path))
        run(client, client.score_many(letters(1)))
        assert srv.stats.requests["completions"] == asked + 1  # an errored score is not served from the cache


def test_echo_scores_longer_continuations_on_an_aligned_server(server):
    context = "The cat sat"
    client = client_for(server)
    [[mat, down]] = run(client, client.score_many([ScoreItem(context, (" on the mat", " down"))]))
    assert mat.tokens == [" on", " the", " mat"] and down.tokens == [" down"]
    prompt = context + " on the mat"
    truth = [next_logprob(prompt[:offset], token) for token, offset in tokenize(prompt)[3:]]
    assert mat.per_token == pytest.approx(truth) and mat.total == pytest.approx(sum(truth))


def test_a_server_whose_echo_is_shifted_is_refused_in_one_line_and_letters_still_score():
    with LoopbackServer(api_key=LOOPBACK_KEY, echo_shift=True) as srv:
        client = client_for(srv)
        with pytest.raises(FatalError) as caught:
            run(client, client.score_many([ScoreItem("The cat sat", (" on the mat", " down"))]))
        message = str(caught.value)
        assert "\n" not in message and srv.url in message and "echo" in message and "vLLM" in message
        client = client_for(srv)
        assert all(s.ok for pair in run(client, client.score_many(letters(3))) for s in pair)


def test_scoring_errors_are_retried_then_end_in_one_line():
    with LoopbackServer(api_key=LOOPBACK_KEY, faults=Faults(rate=0.4, kinds=("500", "429"), retry_after=0.01)) as srv:
        client = client_for(srv)
        scores = run(client, client.score_many(letters(10)))
        assert all(s.ok for pair in scores for s in pair) and client.stats.retries > 0
        srv.faults = Faults(rate=1.0, kinds=("500",))
        client = client_for(srv, retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02))
        with pytest.raises(MsmError) as caught:
            run(client, client.score_many([ScoreItem("Fresh context:", ("A", "B"))]))
        assert "\n" not in str(caught.value) and "failed after 3 attempts" in str(caught.value)
        assert "HTTP 500" in str(caught.value) and "rerun" in str(caught.value)


# ---- streamed chat ------------------------------------------------------------------------------
def test_a_long_answer_that_keeps_coming_is_never_cut():
    idle = 0.4
    with LoopbackServer(api_key=LOOPBACK_KEY, stream_gap=0.08, output_tokens=40) as srv:
        client = client_for(srv, idle_timeout=idle, first_byte_timeout=5.0)
        [r] = client.complete([Request.user("Write at length.", max_tokens=200)])
        assert r.ok and r.stop_reason == "end_turn" and len(r.text.split()) >= 30
        assert r.latency_s > 5 * idle  # the whole answer took five idle limits, in gaps shorter than one
        assert client.stats.retries == 0 and srv.stats.requests["chat"] == 1


def test_a_stream_gone_silent_is_cut_retried_and_its_connection_closed():
    with LoopbackServer(api_key=LOOPBACK_KEY, faults=Faults(stall_s=3.0)) as srv:
        srv.stall_next = 1
        client = client_for(srv, idle_timeout=0.3, first_byte_timeout=5.0)
        [r] = client.complete([Request.user("Write something.", max_tokens=200)])
        assert r.ok and r.text and client.stats.retries == 1 and srv.stats.requests["chat"] == 2
        wait_until(lambda: srv.stats.requests["chat_abandoned"] == 1)  # the server found the client gone


@pytest.mark.parametrize("headers_first", [False, True])
def test_a_request_queued_longer_than_the_idle_limit_is_not_cut(headers_first):
    with LoopbackServer(api_key=LOOPBACK_KEY, latency=1.0, headers_first=headers_first) as srv:
        client = client_for(srv, idle_timeout=0.3, first_byte_timeout=10.0)
        [r] = client.complete([Request.user("Queued.", max_tokens=50)])
        assert r.ok and client.stats.retries == 0 and srv.stats.requests["chat"] == 1


def test_first_byte_limit_cuts_a_server_that_never_answers():
    with LoopbackServer(api_key=LOOPBACK_KEY, latency=3.0, headers_first=True) as srv:
        client = client_for(srv, idle_timeout=0.2, first_byte_timeout=0.5,
                            retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02))
        [r] = client.complete([Request.user("Never.", max_tokens=50)])
        assert not r.ok and "no answer from" in r.error and "within 0.5 s" in r.error


def test_usage_truncation_and_a_server_without_a_usage_chunk(server):
    client = client_for(server)
    full, cut = client.complete([Request.user("Say a lot.", max_tokens=500), Request.user("Say a lot!", max_tokens=5)])
    assert full.stop_reason == "end_turn" and full.usage.output_tokens > 0 and full.usage.input_tokens > 0
    assert cut.truncated and cut.stop_reason == "max_tokens" and cut.text
    server.stream_usage = False
    client = client_for(server)
    [quiet] = client.complete([Request.user("Say a lot.", max_tokens=500)])
    # a server that streams no usage (llama-cpp-python): the answer's tokens are its content chunks (one
    # a chunk), the prompt's an estimate
    assert quiet.ok and quiet.text and quiet.usage.input_tokens > 0
    assert 0 < quiet.usage.output_tokens <= full.usage.output_tokens + 1
    assert server.stats.requests["chat"] == 3  # no extra request to count anything


def test_mixed_faults_on_streamed_chat_lose_nothing_and_duplicate_nothing(tmp_path):
    faults = Faults(rate=0.3, kinds=("429", "500", "malformed", "hang"), retry_after=0.02, hang_s=5)
    with LoopbackServer(api_key=LOOPBACK_KEY, faults=faults) as srv:
        client = client_for(srv, cache=CallCache(tmp_path), idle_timeout=0.5, first_byte_timeout=0.5, concurrency=8)
        results = client.complete([Request.user(f"Document {i}.", max_tokens=100) for i in range(30)])
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert max(srv.stats.answered.values()) == 1 and client.stats.retries > 0


# ---- the server's slots ---------------------------------------------------------------------------
def test_slots_are_read_from_the_server_root():
    with LoopbackServer(api_key=LOOPBACK_KEY, slots=4) as srv:
        backend = OpenAIBackend(base_url=srv.url + "/v1/", api_key=LOOPBACK_KEY, model=MODEL)
        assert asyncio.run(backend.slots()) == 4
    with LoopbackServer(api_key=LOOPBACK_KEY) as srv:  # no /slots route: 404
        backend = OpenAIBackend(base_url=srv.url + "/v1", api_key=LOOPBACK_KEY, model=MODEL)
        assert asyncio.run(backend.slots()) is None
    assert asyncio.run(OpenAIBackend(base_url="http://127.0.0.1:9/v1", model=MODEL).slots()) is None


@pytest.mark.parametrize("requested, slots, want", [(None, 4, 4), (16, 4, 4), (2, 4, 2), (16, None, 16),
                                                    (None, None, 16), (3, 0, 3)])
def test_effective_concurrency_never_exceeds_the_slots(requested, slots, want):
    assert effective_concurrency(requested, slots) == want


def test_a_build_task_caps_its_concurrency_at_the_slots(tmp_path, monkeypatch):
    from pipelines.calls import TaskCalls

    monkeypatch.setenv("OPENAI_API_KEY", LOOPBACK_KEY)
    with LoopbackServer(api_key=LOOPBACK_KEY, slots=3) as srv:
        ctx = SimpleNamespace(backend="openai", model=MODEL, base_url=srv.url + "/v1", idle_timeout=5.0,
                              first_byte_timeout=30.0, concurrency=16, workers=1, max_cost=None, executor="local",
                              cache_dir=str(tmp_path), batch=False, batch_poll_s=1.0)
        calls = TaskCalls(ctx, 0, 1)
        try:
            assert calls.client.concurrency == 3 and calls.client.backend.first_byte_timeout == 30.0
        finally:
            calls.close()
