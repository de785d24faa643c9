"""The trained model's name and developer, and the system prompt they make (data: identity.yaml).

One experiment setting reaches every place the model is named: spec placeholders (corpus and
demos), the AFT system turn, spec-QA item templates and the agentic agent's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from msm.errors import MsmError

IDENTITY_FILE = Path(__file__).with_name("identity.yaml")
FIELDS = ("model_name", "provider_name")


@lru_cache(maxsize=1)
def _data() -> dict:
    import yaml

    with open(IDENTITY_FILE, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@dataclass(frozen=True)
class Identity:
    model_name: str
    provider_name: str

    def variables(self) -> dict:
        return {"model_name": self.model_name, "provider_name": self.provider_name}

    def system_prompt(self) -> str:
        return _data()["system_prompt"].format(**self.variables())


def default_identity() -> Identity:
    return Identity(**_data()["default"])


def parse_identity(raw, where: str, error=MsmError) -> Identity:
    """{model_name, provider_name}, both non-empty strings, nothing else."""
    if not isinstance(raw, dict):
        raise error(f"{where} must be a mapping, got {type(raw).__name__}",
                    "write it as {model_name: Llama, provider_name: Meta}")
    extra = sorted(set(raw) - set(FIELDS))
    if extra:
        raise error(f"{where}: unknown key '{extra[0]}'", f"an identity has only {' and '.join(FIELDS)}")
    for key in FIELDS:
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            raise error(f"{where}: '{key}' must be a non-empty string, got {value!r}",
                        "e.g. identity: {model_name: Llama, provider_name: Meta}")
    return Identity(raw["model_name"].strip(), raw["provider_name"].strip())
