"""Prompt style follows the model, not the backend: a small model served behind the openai backend
gets the compact prompt (the model table, or --prompt-style), and the context window is checked
for both styles before any call."""

from __future__ import annotations

import json
import sqlite3

import pytest

from pipelines.build import BuildOptions, build_corpus, prompt_style
from tests.conftest import LOOPBACK_KEY, REPO, assert_one_line_error, run_msm

SPEC = REPO / "specs" / "value_augmented.md"


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", LOOPBACK_KEY)


def test_the_model_table_chooses_the_style_on_any_backend():
    assert prompt_style("openai", "smollm2") == "compact"  # a served small model, by its table entry
    assert prompt_style("openai", "SmolLM2-135M-Instruct.Q4_1.gguf") == "compact"  # llama.cpp's file name
    assert prompt_style("openai", "Qwen/Qwen3-32B") == "full"
    assert prompt_style("local", "some-unlisted-local-model") == "compact"
    assert prompt_style("anthropic", "claude-sonnet-4-6") == "full"
    assert prompt_style("openai", "smollm2", "full") == "full"  # the user's choice wins


def _requests(home) -> list[dict]:
    con = sqlite3.connect(home / "cache" / "calls.sqlite")
    try:
        return [json.loads(r) for (r,) in con.execute("SELECT request FROM calls WHERE purpose = 'generate'")]
    finally:
        con.close()


@pytest.mark.parametrize("model, chosen, compact", [("smollm2", None, True), ("qwen3-32b", None, False),
                                                     ("qwen3-32b", "compact", True)])
def test_a_served_model_is_prompted_by_its_style(loopback, isolated_home, model, chosen, compact):
    result = build_corpus(str(SPEC), BuildOptions(docs=2, backend="openai", model=model, base_url=loopback.url + "/v1",
                                                  progress=False, dedup=(), prompt_style=chosen))
    assert sum(result.status_counts.values()) == 2
    requests = _requests(isolated_home)
    assert len(requests) == 2
    for request in requests:
        # the full prompt carries the whole spec as its cached prefix; the compact one does not
        assert bool(request.get("system_prefix")) is not compact, request.keys()
        assert (request["max_tokens"] == 384) is compact, request["max_tokens"]  # full: sized to the genre


def test_a_compact_prompt_that_does_not_fit_the_window_is_refused_before_any_call(loopback, isolated_home):
    before = sum(loopback.stats.requests.values())
    result = run_msm("corpus", "build", str(SPEC), "--docs", "2", "--backend", "openai", "--model", "smollm2",
                     "--base-url", loopback.url + "/v1", "--max-tokens", "8192", "--no-progress")
    assert_one_line_error(result, "compact generation prompt", "8,192-token context window", "--max-tokens")
    assert sum(loopback.stats.requests.values()) == before
    assert not (isolated_home / "msm.duckdb").exists() or "build" not in result.stdout


def test_the_full_prompt_for_a_small_window_names_the_compact_style(loopback, isolated_home, tmp_path):
    table = tmp_path / "windows.yaml"  # a server started with a 4k context (llama.cpp's --n_ctx 4096)
    table.write_text("models:\n  smollm2: 4096\n")
    result = run_msm("corpus", "build", str(SPEC), "--docs", "2", "--backend", "openai", "--model", "smollm2",
                     "--base-url", loopback.url + "/v1", "--prompt-style", "full", "--no-progress",
                     env={"MSM_CONTEXT_WINDOWS": str(table)})
    assert_one_line_error(result, "context window", "--prompt-style compact")
    assert sum(loopback.stats.requests.values()) == 0
