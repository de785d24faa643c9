"""Token counting with one named tokenizer, so every token figure says what counted it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

APPROX_NAME = "approx-chars/4"


@dataclass
class TokenCounter:
    name: str
    count_many: Callable[[list[str]], list[int]]

    @property
    def exact(self) -> bool:
        return self.name != APPROX_NAME


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
