"""Prices from a data file, the cost of a response, and a pre-flight estimate."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from msm.errors import MsmError
from msm.llm.types import Request, Usage

DEFAULT_PRICES = Path(__file__).with_name("prices.yaml")
FIELDS = ("input", "output", "cache_write", "cache_read")


class PriceError(MsmError):
    """The price file is missing, malformed, or lacks the model."""


@dataclass(frozen=True)
class Price:
    input: float
    output: float
    cache_write: float
    cache_read: float


@dataclass(frozen=True)
class PriceTable:
    prices: dict[str, Price]
    batch_discount: float
    free_backends: frozenset[str]
    source: str

    def price(self, backend: str, model: str) -> Price | None:
        """None for free backends; the longest matching model-name prefix otherwise."""
        if backend in self.free_backends:
            return None
        if model in self.prices:
            return self.prices[model]
        matches = [name for name in self.prices if model.startswith(name)]
        if not matches:
            raise PriceError(f"no price for model '{model}' in {self.source}",
                             "add it to the price file (MSM_PRICES points at your own)")
        return self.prices[max(matches, key=len)]

    def cost(self, backend: str, model: str, usage: Usage, batch: bool = False) -> float:
        price = self.price(backend, model)
        if price is None:
            return 0.0
        total = (usage.input_tokens * price.input + usage.output_tokens * price.output
                 + usage.cache_write_tokens * price.cache_write + usage.cache_read_tokens * price.cache_read) / 1e6
        return total * (self.batch_discount if batch else 1.0)


def load_prices(path: str | os.PathLike | None = None) -> PriceTable:
    path = Path(path or os.environ.get("MSM_PRICES") or DEFAULT_PRICES)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PriceError(f"price file not found: {path}", "set MSM_PRICES to an existing file") from None
    except yaml.YAMLError as exc:
        raise PriceError(f"price file {path} is not valid YAML ({str(exc).splitlines()[0]})", "fix the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise PriceError(f"price file {path} has no 'models:' mapping", "see msm/llm/prices.yaml for the format")
    prices = {}
    for name, entry in data["models"].items():
        if not isinstance(entry, dict) or set(FIELDS) - set(entry):
            raise PriceError(f"price file {path}: model '{name}' needs {', '.join(FIELDS)}", "fix the entry")
        try:
            values = {f: float(entry[f]) for f in FIELDS}
        except (TypeError, ValueError):
            raise PriceError(f"price file {path}: model '{name}' has a non-numeric price", "use numbers (USD per million tokens)") from None
        if any(v < 0 for v in values.values()):
            raise PriceError(f"price file {path}: model '{name}' has a negative price", "use prices >= 0")
        prices[str(name)] = Price(**values)
    discount = data.get("batch_discount", 0.5)
    if not isinstance(discount, (int, float)) or not 0 < discount <= 1:
        raise PriceError(f"price file {path}: batch_discount must be a number in (0, 1]", "fix the file")
    return PriceTable(prices, float(discount), frozenset(data.get("free_backends") or ()), str(path))


def rough_tokens(text: str) -> int:
    """Pre-flight token guess; the API's own count is what gets billed."""
    return max(1, len(text) // 4)


def estimate(requests: list[Request], backend: str, model: str, table: PriceTable, batch: bool = False,
             expected_output_share: float = 1.0) -> dict:
    """Upper-bound cost: every request uses its full max_tokens; a repeated system prefix is read from cache."""
    seen_prefixes: set[str] = set()
    usage = Usage()
    for req in requests:
        body = rough_tokens("".join(m.content for m in req.messages) + (req.system or ""))
        if req.system_prefix:
            if req.system_prefix in seen_prefixes:
                usage.cache_read_tokens += rough_tokens(req.system_prefix)
            else:
                seen_prefixes.add(req.system_prefix)
                usage.cache_write_tokens += rough_tokens(req.system_prefix)
        usage.input_tokens += body
        usage.output_tokens += int(req.max_tokens * expected_output_share)
    return {"requests": len(requests), "usage": usage, "cost_usd": table.cost(backend, model, usage, batch=batch)}
