"""The model a suite asks: a local alias, model folder or adapter folder, or a model on a server.

Every suite reaches it the same way (`complete`, `score`), through the backends layer, so a suite
never cares whether the weights are on this CPU or behind vLLM or Anthropic.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from msm.errors import MsmError


def local_model(path_or_alias: str):
    """(model, tokenizer, provenance) for a local alias, model folder or LoRA adapter folder."""
    import torch

    from msm.models import TINY, load_model, model_entry, registry

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(path_or_alias)
    if (path / "card.json").is_file():  # a whole run folder: its last stage is the model
        last = json.loads((path / "card.json").read_text())["config"]["stages"][-1]["name"]
        for kind in ("adapter", "model"):
            if (path / last / kind).is_dir():
                return local_model(str(path / last / kind))
        raise MsmError(f"{path}: the run's last stage '{last}' has no adapter/ or model/ folder",
                       "finish the run with `msm train run`, or pass a stage folder")
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        card = path.parent.parent / "card.json"
        base = json.loads(card.read_text())["base_model"] if card.is_file() else \
            json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise MsmError(f"{path}: cannot tell which base model the adapter belongs to",
                           "evaluate an adapter written by `msm train run` (its run folder has card.json)")
        model, tokenizer = load_model(base, torch.float32, device)
        import warnings

        with warnings.catch_warnings():  # peft asks transformers a deprecated question; the answer is fine
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        info = json.loads(card.read_text()) if card.is_file() else {}
        provenance = {"adapter": str(path), "base_model": base, "train_run": info.get("run_id"),
                      "spec_versions": info.get("spec_versions", []), "inputs": info.get("inputs", {}),
                      **_framing(info)}
        model.eval()
        return model, tokenizer, provenance
    if path.is_dir() or path_or_alias in registry()["models"] or path_or_alias == TINY:
        model, tokenizer = load_model(path_or_alias, torch.float32, device)
        model.eval()
        card = path.parent.parent / "card.json"  # RUN/STAGE/model from a full fine-tuning run
        info = json.loads(card.read_text()) if path.is_dir() and card.is_file() else {}
        return model, tokenizer, {"base_model": info.get("base_model", path_or_alias), "weights": str(path),
                                  "train_run": info.get("run_id"), "spec_versions": info.get("spec_versions", []),
                                  "inputs": info.get("inputs", {}), **_framing(info)}
    if "/" in path_or_alias or path_or_alias.startswith("."):
        raise MsmError(f"--model {path_or_alias} does not exist", "pass a model folder, an adapter folder "
                       "(RUN/STAGE/adapter) or a local alias (`msm models list`)")
    model_entry(path_or_alias)  # unknown alias: one line naming the known ones
    raise AssertionError("unreachable")


def _framing(card: dict) -> dict:
    """How a trained model was framed in AFT (its card): the system turn and the chat template."""
    return {k: card[k] for k in ("system_prompt", "chat_template") if card.get(k)}


@dataclass
class ModelUnderTest:
    client: object  # an LLMClient
    backend: str  # local, openai, anthropic
    provenance: dict
    context_of: Callable[[str], str]  # a user turn as the text a scorer continues
    system: str | None = None  # the system turn every prompt gets (the model's identity), or none

    @property
    def has_logprobs(self) -> bool:
        return self.backend != "anthropic"

    def complete(self, requests: list) -> list:
        if self.system:
            import dataclasses

            requests = [r if (r.system or r.system_prefix) else dataclasses.replace(r, system=self.system)
                        for r in requests]
        return ask(self.client, requests)

    def score(self, items: list) -> list:
        return asyncio.run(_closing(self.client, self.client.score_many(items)))


async def _closing(client, work):
    try:
        return await work
    finally:
        await client.backend.aclose()


def open_model(model: str, backend: str | None = None, base_url: str | None = None, system: str | None = None,
               chat_template: str | None = None, idle_timeout: float = 120.0) -> ModelUnderTest:
    """`system` and `chat_template` (template text) frame every prompt; a trained run's card supplies
    both by default, so a model is asked the way its AFT framed it. A served model is scored on raw
    text (`/v1/completions` applies no template): with `chat_template` its contexts are framed by it,
    exactly as the local backend frames the same model's; without one, as a plain question and answer."""
    from msm.llm.client import LLMClient
    from msm.llm.select import default_cache, effective_concurrency, make_backend

    if backend in (None, "local"):
        from msm.llm.local_backend import LocalBackend

        loaded_model, tokenizer, provenance = local_model(model)
        system = system or provenance.get("system_prompt")
        chat_template = chat_template or provenance.get("chat_template")
        if chat_template:
            tokenizer.chat_template = chat_template
        if not tokenizer.chat_template:
            raise MsmError(f"{model} has no chat template, so its prompts cannot be framed",
                           "give the experiment (or `msm eval run --chat-template`) a Jinja template file")
        made = LocalBackend(model=model, loaded=(loaded_model, tokenizer))
        provenance = {**provenance, "system_prompt": system, "chat_template": chat_template}

        def context_of(text: str) -> str:
            turns = [{"role": "system", "content": system}] if system else []
            return tokenizer.apply_chat_template([*turns, {"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        # no call cache: a folder's weights can change under the same path (a retrained RUN/aft/adapter)
        return ModelUnderTest(LLMClient(made, made.default_model, cache=None, concurrency=16), "local", provenance,
                              context_of, system)
    made, name = make_backend(backend, model, base_url, idle_timeout=idle_timeout)
    slots = asyncio.run(made.slots()) if hasattr(made, "slots") else None  # llama.cpp: requests it runs at once

    def plain(text: str) -> str:  # servers score raw text: a plain question-and-answer frame
        return f"{system}\n\n" * bool(system) + f"Question: {text}\nAnswer:"

    def templated(text: str) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        turns = [{"role": "system", "content": system}] if system else []
        rendered, _ = render_jinja_template([[*turns, {"role": "user", "content": text}]],
                                            chat_template=chat_template, add_generation_prompt=True)
        return rendered[0]
    return ModelUnderTest(LLMClient(made, name, cache=default_cache(), concurrency=effective_concurrency(None, slots)),
                          made.name,
                          {"base_model": name, "base_url": base_url, "system_prompt": system,
                           "chat_template": chat_template}, templated if chat_template else plain, system)


def open_judge(judge: dict):
    """An LLMClient for a grader given as {backend, model, base_url[, idle_timeout]}; its calls are cached."""
    from msm.llm.client import LLMClient
    from msm.llm.select import default_cache, make_backend

    made, judge_model = make_backend(judge.get("backend"), judge.get("model"), judge.get("base_url"),
                                     idle_timeout=judge.get("idle_timeout", 120.0))
    return LLMClient(made, judge_model, cache=default_cache(), concurrency=16)


def ask(client, requests: list) -> list:
    """complete_many on any client, closing its connections before the event loop ends."""
    return asyncio.run(_closing(client, client.complete_many(requests)))
