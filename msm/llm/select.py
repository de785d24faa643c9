"""Which backend: --backend/--model flags, then msm.toml's [llm] table, then ANTHROPIC_API_KEY, then local."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from msm.config import load_settings, read_config
from msm.llm.base import Backend, FatalError
from msm.llm.cache import CallCache

BACKENDS = ("anthropic", "openai", "local")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def choose(backend: str | None = None, model: str | None = None, base_url: str | None = None) -> tuple[str, str | None, str | None]:
    cfg = read_config().get("llm", {})
    name = backend or cfg.get("backend") or ("anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "local")
    if name not in BACKENDS:
        raise FatalError(f"unknown backend '{name}'", f"choose one of {', '.join(BACKENDS)}")
    same = name == cfg.get("backend")
    return name, model or (cfg.get("model") if same else None), base_url or (cfg.get("base_url") if same else None)


DEFAULT_CONCURRENCY = 16


def make_backend(backend: str | None = None, model: str | None = None, base_url: str | None = None,
                 idle_timeout: float = 120.0, first_byte_timeout: float = 600.0) -> tuple[Backend, str]:
    """`idle_timeout`: silence mid-answer before a call is cut and retried; `first_byte_timeout`: the
    wait for an answer to start (queued behind others on a busy server), on OpenAI-compatible servers."""
    name, model, base_url = choose(backend, model, base_url)
    if os.environ.get("MSM_NO_SPEND") == "1" and name != "local":
        host = urlparse(base_url or "").hostname
        if host not in LOOPBACK_HOSTS:
            raise FatalError(f"MSM_NO_SPEND=1 forbids the {name} backend except on a loopback server",
                             "use --backend local or a 127.0.0.1 --base-url")
    if name == "anthropic":
        from msm.llm.anthropic_backend import AnthropicBackend

        made: Backend = AnthropicBackend(base_url=base_url, idle_timeout=idle_timeout)
    elif name == "openai":
        from msm.llm.openai_backend import OpenAIBackend

        made = OpenAIBackend(base_url=base_url, model=model, idle_timeout=idle_timeout,
                             first_byte_timeout=first_byte_timeout)
    else:
        from msm.llm.local_backend import LocalBackend
        from msm.models import model_entry

        if model and not Path(model).is_dir():
            model_entry(model)  # unknown alias: one clear error now
        made = LocalBackend(model=model)
    return made, model or made.default_model


def effective_concurrency(requested: int | None, slots: int | None) -> int:
    """Calls in flight toward one server: what was asked (None: not asked), never more than the slots the
    server runs at once (llama.cpp's /slots), since requests beyond them only queue there, and their
    wait counts against the first-byte timeout. Unasked, the slots are the default."""
    if requested is None:
        return slots or DEFAULT_CONCURRENCY
    return max(1, min(requested, slots) if slots else requested)


def default_cache() -> CallCache:
    return CallCache(load_settings().home / "cache")
