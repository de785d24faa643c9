"""Request keys, prices and backend selection."""

from __future__ import annotations

import pytest

from msm.errors import MsmError
from msm.llm.base import FatalError
from msm.llm.pricing import PriceError, estimate, load_prices
from msm.llm.select import choose, make_backend
from msm.llm.types import Message, Request, Usage


def test_request_key_covers_every_parameter_but_the_purpose():
    base = Request.user("hello", max_tokens=10, temperature=0.5, purpose="generate")
    key = base.key("anthropic", "m")
    assert key == Request.user("hello", max_tokens=10, temperature=0.5, purpose="judge").key("anthropic", "m")
    variants = [
        Request.user("hello!", max_tokens=10, temperature=0.5),
        Request.user("hello", max_tokens=11, temperature=0.5),
        Request.user("hello", max_tokens=10, temperature=0.6),
        Request.user("hello", max_tokens=10, temperature=0.5, seed=1),
        Request.user("hello", max_tokens=10, temperature=0.5, stop=("x",)),
        Request.user("hello", max_tokens=10, temperature=0.5, system="s"),
        Request.user("hello", max_tokens=10, temperature=0.5, system_prefix="p"),
        Request(messages=(Message("user", "hello"), Message("assistant", "hi")), max_tokens=10, temperature=0.5),
    ]
    keys = {v.key("anthropic", "m") for v in variants}
    assert key not in keys and len(keys) == len(variants)
    assert base.key("openai", "m") != key and base.key("anthropic", "n") != key


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        Request.user("x", max_tokens=0)
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        Request.user("x", max_tokens=-5)
    with pytest.raises(ValueError, match="unknown purpose"):
        Request.user("x", purpose="vibes")


def test_cost_with_cache_and_batch_discount():
    table = load_prices()
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_read_tokens=1_000_000, cache_write_tokens=1_000_000)
    assert table.cost("anthropic", "claude-sonnet-4-5", usage) == pytest.approx(3 + 15 + 0.30 + 3.75)
    assert table.cost("anthropic", "claude-sonnet-4-5-20250929", usage, batch=True) == pytest.approx((3 + 15 + 0.30 + 3.75) / 2)
    assert table.cost("local", "anything", usage) == 0.0
    with pytest.raises(PriceError, match="no price for model 'gpt-9'"):
        table.cost("anthropic", "gpt-9", usage)


def test_estimate_counts_a_shared_prefix_once_as_a_write():
    table = load_prices()
    prefix = "x" * 40_000
    requests = [Request.user(f"doc {i}", max_tokens=1000, system_prefix=prefix) for i in range(10)]
    est = estimate(requests, "anthropic", "claude-sonnet-4-5", table)
    assert est["usage"].cache_write_tokens == 10_000 and est["usage"].cache_read_tokens == 90_000
    assert est["usage"].output_tokens == 10_000
    assert estimate(requests, "anthropic", "claude-sonnet-4-5", table, batch=True)["cost_usd"] == pytest.approx(est["cost_usd"] / 2)


@pytest.mark.parametrize("content, message", [
    ("models: [1, 2", "not valid YAML"),
    ("batch_discount: 0.5\n", "has no 'models:' mapping"),
    ("models:\n  m: {input: 1, output: 2}\n", "needs input, output, cache_write, cache_read"),
    ("models:\n  m: {input: one, output: 2, cache_write: 1, cache_read: 1}\n", "non-numeric"),
    ("models:\n  m: {input: -1, output: 2, cache_write: 1, cache_read: 1}\n", "negative"),
    ("batch_discount: 3\nmodels:\n  m: {input: 1, output: 2, cache_write: 1, cache_read: 1}\n", "batch_discount"),
])
def test_malformed_price_files(tmp_path, content, message):
    path = tmp_path / "prices.yaml"
    path.write_text(content)
    with pytest.raises(PriceError, match=message):
        load_prices(path)
    with pytest.raises(PriceError, match="not found"):
        load_prices(tmp_path / "missing.yaml")


def test_selection_order(monkeypatch, tmp_path):
    assert choose()[0] == "local"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-something")
    assert choose()[0] == "anthropic"
    (tmp_path / "msm.toml").write_text('[llm]\nbackend = "openai"\nmodel = "qwen"\nbase_url = "http://127.0.0.1:1/v1"\n')
    assert choose() == ("openai", "qwen", "http://127.0.0.1:1/v1")
    assert choose("local")[0] == "local"
    with pytest.raises(FatalError, match="unknown backend 'gemini'"):
        choose("gemini")


def test_missing_key_and_no_spend_guard(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("MSM_NO_SPEND", "0")
    with pytest.raises(FatalError, match="needs an API key.*ANTHROPIC_API_KEY"):
        make_backend("anthropic")
    monkeypatch.setenv("MSM_NO_SPEND", "1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-real-looking")
    with pytest.raises(FatalError, match="MSM_NO_SPEND=1 forbids"):
        make_backend("anthropic")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("MSM_NO_SPEND", "0")
    with pytest.raises(FatalError, match="needs a server URL"):
        make_backend("openai")


def test_unknown_local_model():
    with pytest.raises(MsmError, match="unknown model 'smollm9'"):
        make_backend("local", model="smollm9")
