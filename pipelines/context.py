"""Everything a pipeline step needs, written once per build as JSON so steps stay picklable."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from msm.llm.types import Request


@dataclass
class BuildContext:
    build_id: str
    plan_path: str
    staged_dir: str
    cache_dir: str
    backend: str
    model: str
    base_url: str | None
    spec: dict  # name, text, model_name, provider_name, summary
    units: dict  # unit id -> {id, kind, title, text}
    genres: dict  # name -> {name, description, words, style}
    audiences: dict  # name -> {name, description}
    prompt_hash: str
    compact: bool = False  # small local models: short prompt, no scratchpad, no whole spec
    scratchpad: bool = True
    max_tokens: int = 4096
    regrow: float = 1.5
    temperature: float = 1.0
    judge: str = "llm"  # or "offline"
    offline_min_similarity: float = 0.25
    wrong_names: list = field(default_factory=list)
    max_cost: float | None = None
    concurrency: int = 16
    workers: int = 1
    batch: bool = False
    batch_poll_s: float = 30.0
    idle_timeout: float = 120.0
    progress: bool = True

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(asdict(self), fh, ensure_ascii=False)

    def _slots(self, row: dict) -> dict:
        return {"genre": self.genres[row["genre"]], "audience": self.audiences[row["audience"]],
                "unit": self.units[row["unit_id"]], "model_name": self.spec["model_name"],
                "provider_name": self.spec["provider_name"]}

    def generate_request(self, row: dict, grow: bool = False) -> Request:
        from corpus.prompting import render

        slots = self._slots(row)
        if self.compact:
            unit_text = slots["unit"]["text"]
            slots.update(unit_text=unit_text if len(unit_text) <= 700 else unit_text[:700].rsplit(" ", 1)[0] + " ...",
                         spec_summary=self.spec["summary"])
            max_tokens = self.max_tokens
            request = dict(messages=[("user", render("generate_local.j2", **slots))])
        else:
            words_max = slots["genre"]["words"][1]
            max_tokens = min(self.max_tokens, int(words_max * 1.6) + (600 if self.scratchpad else 0))
            request = dict(system_prefix=render("generate_system.j2", spec_name=self.spec["name"],
                                                spec_text=self.spec["text"], **slots),
                           messages=[("user", render("generate_user.j2", scratchpad=self.scratchpad, **slots))])
        if grow:
            max_tokens = int(max_tokens * self.regrow)
        from msm.llm.types import Message

        return Request(messages=tuple(Message(r, c) for r, c in request.pop("messages")), max_tokens=max_tokens,
                       temperature=self.temperature, seed=row["seed"], purpose="generate", **request)

    def judge_request(self, row: dict, document: str) -> Request:
        from corpus.prompting import render
        from msm.llm.types import Message

        text = render("judge.j2", document=document, **self._slots(row))
        return Request(messages=(Message("user", text),), max_tokens=600, temperature=0.0, seed=row["seed"],
                       purpose="judge")


def load_context(path: str) -> BuildContext:
    """Read once per process and file version: a rerun with new settings rewrites the file."""
    import os

    return _load_context(path, os.stat(path).st_mtime_ns)


@lru_cache(maxsize=4)
def _load_context(path: str, mtime_ns: int) -> BuildContext:
    with open(path, encoding="utf-8") as fh:
        return BuildContext(**json.load(fh))
