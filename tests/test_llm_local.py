"""The local backend on a tiny random Llama: batched generation and prefix-shared scoring."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from msm.llm.base import ScoreItem
from msm.llm.cache import CallCache
from msm.llm.client import LLMClient
from msm.llm.local_backend import LocalBackend
from msm.llm.types import Request
from msm.tiny import tiny_causal_lm


@pytest.fixture(scope="module")
def tiny():
    return tiny_causal_lm(seed=1)


def test_batched_generation_keeps_order_and_caches(tiny, tmp_path):
    backend = LocalBackend(loaded=tiny, batch_size=3)
    client = LLMClient(backend, cache=CallCache(tmp_path))
    requests = [Request.user("hi " * (i % 4 + 1), max_tokens=6, temperature=0.0) for i in range(7)]
    results = client.complete(requests)
    assert len(results) == 7 and all(r.ok for r in results)
    assert all(r.backend == "local" and r.cost_usd == 0 and r.usage.output_tokens <= 6 for r in results)
    assert all(r.stop_reason in ("max_tokens", "end_turn", "empty") for r in results)
    # greedy decoding is deterministic, so the same prompt gives the same text in any batch
    assert results[0].text == results[4].text
    again = LLMClient(LocalBackend(loaded=tiny), cache=CallCache(tmp_path))
    assert [r.text for r in again.complete(requests)] == [r.text for r in results]
    assert again.stats.calls == 0


def test_stop_strings_cut_the_text(tiny):
    backend = LocalBackend(loaded=tiny)
    [free] = LLMClient(backend).complete([Request.user("x", max_tokens=12, temperature=0.0)])
    assert len(free.text) > 2
    stop = free.text[len(free.text) // 2:][:2]
    [cut] = LLMClient(LocalBackend(loaded=tiny)).complete([Request.user("x", max_tokens=12, temperature=0.0, stop=(stop,))])
    assert cut.stop_reason == "stop_sequence" and stop not in cut.text and free.text.startswith(cut.text)


def naive_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Reference: one full forward over context + continuation, no cache tricks."""
    ctx = tokenizer(context.rstrip(" "), add_special_tokens=False).input_ids
    moved = " " * (len(context) - len(context.rstrip(" ")))
    cont = tokenizer(moved + continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(ctx) + j - 1, tok]) for j, tok in enumerate(cont))


def test_prefix_shared_scoring_matches_a_full_forward(tiny):
    model, tokenizer = tiny
    items = [ScoreItem("I prefer cream cheese over", (" Brie", " the affordable item, always", " a")),
             ScoreItem("The assistant should ", ("tell the truth.", "lie."))]
    scores = asyncio.run(LocalBackend(loaded=tiny).score(items, "tiny"))
    for item, item_scores in zip(items, scores):
        assert len(item_scores) == len(item.continuations)
        for cont, score in zip(item.continuations, item_scores):
            assert score.total == pytest.approx(naive_logprob(model, tokenizer, item.context, cont), abs=1e-3)
            assert score.total == pytest.approx(sum(score.per_token)) and all(p <= 0 for p in score.per_token)
            assert math.isfinite(score.total)


def score_counting_passes(tiny, items, monkeypatch) -> list[tuple[int, int]]:
    """Score the items, check every score against a full forward, return each pass's (rows, tokens)."""
    model, tokenizer = tiny
    passes = []
    original = model.forward

    def counting(*args, **kwargs):
        passes.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    scores = asyncio.run(LocalBackend(loaded=tiny).score(items, "tiny"))
    monkeypatch.setattr(model, "forward", original)
    for item, item_scores in zip(items, scores):
        for cont, score in zip(item.continuations, item_scores):
            assert score.total == pytest.approx(naive_logprob(model, tokenizer, item.context, cont), abs=1e-3)
    return passes


def test_items_that_share_a_long_prefix_run_it_once_and_score_the_same(tiny, monkeypatch):
    model, tokenizer = tiny
    question = ("We have a long weekend away with the whole family next month, two children and a dog, and "
                "my parents are coming too. We have never done this trip before and want it to be easy on "
                "everyone, including the dog. The drive is about six hours, and there is a train that takes "
                "four with one change. Which of these would you choose for getting there? ")
    items = [ScoreItem(question + "A) the train B) the plane. Answer:", (" A", " B", " the plane")),
             ScoreItem(question + "A) the plane B) the train. Answer:", (" A", " B")),
             ScoreItem("Something else entirely:", (" yes", " no"))]
    passes = score_counting_passes(tiny, items, monkeypatch)
    shared = len(tokenizer(question, add_special_tokens=False).input_ids)
    full = [len(tokenizer(i.context, add_special_tokens=False).input_ids) for i in items]
    # the long common prefix runs once, as one row; then the two questions' tails (four rows: the
    # multi-token ending needs a row per ending) in one pass; then the unrelated item alone
    assert passes[0][0] == 1 and passes[0][1] >= shared - 2
    assert passes[1][0] == 4 and passes[1][1] <= max(full[:2]) - passes[0][1] + 3
    assert passes[2] == (1, full[2]) and len(passes) == 3


def test_a_prefix_every_item_shares_runs_once_per_call(tiny, monkeypatch):
    model, tokenizer = tiny
    system = "Answer with the letter of the option you choose. "
    items = [ScoreItem(system + f"Question {q}: would you take option {q}? Answer:", (" A", " B"))
             for q in ("one", "two", "three", "four", "five")]
    passes = score_counting_passes(tiny, items, monkeypatch)
    shared = len(tokenizer(system + "Question", add_special_tokens=False).input_ids)
    assert passes[0] == (1, shared - 1) or passes[0] == (1, shared)  # the shared words, once
    assert [rows for rows, _ in passes[1:]] == [5]  # every tail in one batch


def test_distinct_seeds_share_one_batch(tiny, monkeypatch):
    model, tokenizer = tiny
    calls = []
    original = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    requests = [Request.user(f"doc {i}", max_tokens=4, temperature=0.8, seed=1000 + i) for i in range(6)]
    results = LLMClient(LocalBackend(loaded=tiny, batch_size=8)).complete(requests)
    assert all(r.ok for r in results) and calls == [6]


def test_samples_of_one_prompt_attend_to_one_shared_copy_and_match_the_unshared_path(tiny):
    import copy

    from msm.llm import shared_prefix

    model, tokenizer = tiny
    prompt = "the long shared inbox " * 12
    # greedy, so every sample is the same text: batched on one shared prompt copy == alone
    requests = [Request.user(prompt, max_tokens=12, temperature=0.0, seed=k) for k in range(5)]
    alone = asyncio.run(LocalBackend(loaded=tiny, batch_size=1).call_many(requests[:1], "tiny"))
    shared = asyncio.run(LocalBackend(loaded=tiny, batch_size=8).call_many(requests, "tiny"))
    assert {r.text for r in shared} == {alone[0].text} and alone[0].usage.output_tokens == 12
    assert model.config._attn_implementation != shared_prefix.NAME  # restored after the batch
    # logits, teacher-forced over several new tokens at once (the causal part), against copies
    ids = tokenizer([prompt] * 3, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        prompt_cache = model(input_ids=ids[:1, :-1], use_cache=True).cache
        copied = copy.deepcopy(prompt_cache)
        copied.batch_repeat_interleave(3)
        tail = torch.cat([ids[:, -1:], torch.randint(5, 100, (3, 4))], dim=1)
        expected = model(input_ids=tail, cache=copied, use_cache=True).logits
        cache = shared_prefix.shared_prefix_cache(prompt_cache)
        assert shared_prefix.shareable(prompt_cache) and cache.get_seq_length() == ids.shape[1] - 1
        with shared_prefix.sharing(model, cache):
            got = model(input_ids=tail, cache=cache, use_cache=True,
                        cache_position=torch.arange(ids.shape[1] - 1, ids.shape[1] + 4)).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
