"""Token counting with one named tokenizer, so every token figure says what counted it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

APPROX_NAME = "approx-chars/4"


@dataclass
class TokenCounter:
    name: str
    count_many: Callable[[list[str]], list[int]]

    @property
    def exact(self) -> bool:
        return not self.name.startswith(APPROX_NAME)


def _approx(texts: list[str]) -> list[int]:
    return [(len(t) + 3) // 4 for t in texts]


def default_counter() -> TokenCounter:
    """SmolLM2's tokenizer once `msm models prepare` has run; an approximation before that.

    Uses the `tokenizers` library directly, so counting never imports transformers or torch.
    """
    from msm.models import default_alias, prepared_dir

    alias = default_alias("causal-lm")
    tok_file = prepared_dir(alias) / "tokenizer.json"
    if not tok_file.is_file():
        return TokenCounter(APPROX_NAME, _approx)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tok_file))

    def count(texts: list[str]) -> list[int]:
        return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return TokenCounter(alias, count)


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def local_tokenizer_file(name: str) -> Path | None:
    """`name`'s tokenizer.json on this machine, never downloaded: a directory or file, a local
    alias that `msm models prepare` has prepared, or a snapshot in the Hugging Face hub cache."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".json":
        return path
    if (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    from msm.models import prepared_dir, registry

    if name in registry()["models"]:
        found = prepared_dir(name) / "tokenizer.json"
        return found if found.is_file() else None
    if "/" not in name:
        return None
    repo = _hub_cache() / ("models--" + name.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip() / "tokenizer.json").is_file():
        return repo / "snapshots" / ref.read_text().strip() / "tokenizer.json"
    found = sorted((repo / "snapshots").glob("*/tokenizer.json"))
    return found[0] if found else None


def fallback_name(base: str, wanted: str) -> str:
    """The counter's name when `wanted` is not here: it says so in every figure that quotes it."""
    return f"{base} (fallback: {wanted} not available locally)"


def counter_name(wanted: str | None) -> str:
    """The name `counter_for(wanted)` would give, without loading a tokenizer (for plans)."""
    from msm.models import default_alias, prepared_dir

    alias = default_alias("causal-lm")
    base = alias if (prepared_dir(alias) / "tokenizer.json").is_file() else APPROX_NAME
    if wanted is None or wanted == alias:
        return base
    return wanted if local_tokenizer_file(wanted) is not None else fallback_name(base, wanted)


def counter_for(wanted: str | None) -> TokenCounter:
    """Count with the trained model's tokenizer when it is on this machine (offline: a directory,
    a prepared alias or the HF cache); otherwise SmolLM2's, named as a fallback for `wanted`, so a
    missing tokenizer is stated in every figure, never an error."""
    from msm.models import default_alias

    if wanted is None or wanted == default_alias("causal-lm"):
        return default_counter()
    found = local_tokenizer_file(wanted)
    if found is None:
        base = default_counter()
        return TokenCounter(fallback_name(base.name, wanted), base.count_many)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(found))

    def count(texts: list[str]) -> list[int]:
        return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return TokenCounter(wanted, count)
