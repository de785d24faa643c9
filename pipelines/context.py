"""Everything a pipeline step needs, written once per build as JSON so steps stay picklable."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from msm.errors import MsmError
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
    compact: bool = False  # small models (local or served): short prompt, no scratchpad, no whole spec
    scratchpad: bool = True
    max_tokens: int = 4096
    regrow: float = 1.5
    # A cut-off answer: "regrow" asks once more with `regrow` times the room, then drops it;
    # "trim" keeps it up to its last whole paragraph or sentence, and marks it trimmed.
    truncation: str = "regrow"
    temperature: float = 1.0
    judge: str = "llm"  # or "offline"
    revise: bool = False  # critique, then rewrite, before the filters
    offline_min_similarity: float = 0.25
    wrong_names: list = field(default_factory=list)
    max_cost: float | None = None
    concurrency: int | None = None  # None: the server's slots (llama.cpp's /slots), else 16
    workers: int = 1
    batch: bool = False
    batch_poll_s: float = 30.0
    idle_timeout: float = 120.0
    first_byte_timeout: float = 600.0
    progress: bool = True
    n_planned: int = 0  # plan rows in the whole build (a task has every world_size-th one)
    executor: str = "local"  # cluster workers write their own call-cache shard
    # condition name -> rendered instruction, short, criteria, offline check (corpus/conditions.yaml)
    conditions: dict = field(default_factory=dict)
    style: str = "values"  # the spec's style (front matter `style:`): values or rules
    # the writer's templates, by prompt kind ("spec", "facts") -> {system, user, local}: the
    # style x prompt-kind table of corpus/conditions.yaml, resolved for this build
    templates: dict = field(default_factory=dict)
    style_criteria: list = field(default_factory=list)  # judge criteria every document of the style gets
    embed: bool = False  # the Embed step computes judged documents' vectors (embedding dedup is on)
    known_vectors: str | None = None  # a file of the text hashes the warehouse held vectors for at the start

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(asdict(self), fh, ensure_ascii=False)

    def _slots(self, row: dict) -> dict:
        return {"genre": self.genres[row["genre"]], "audience": self.audiences[row["audience"]],
                "unit": self.units[row["unit_id"]], "model_name": self.spec["model_name"],
                "provider_name": self.spec["provider_name"], "idea": row.get("idea"),
                "doc_type": row.get("doc_type"), "assertion": row.get("assertion"),
                "condition": self.condition(row), "value_text": self.units[row["unit_id"]].get("value_text", ""),
                "statement": self.units[row["unit_id"]].get("statement", ""),
                "value_statements": self.units[row["unit_id"]].get("value_statements", [])}

    def condition(self, row: dict) -> dict:
        return self.conditions[row.get("condition") or "standard"]

    def extra_criteria(self, row: dict) -> list[dict]:
        """The judge criteria beyond the standard four: the style's, then the condition's."""
        return [*self.style_criteria, *self.condition(row)["criteria"]]

    def judge_criteria(self, row: dict) -> tuple[str, ...]:
        from corpus.prompting import JUDGE_CRITERIA

        return JUDGE_CRITERIA + tuple(c["name"] for c in self.extra_criteria(row))

    def generate_request(self, row: dict, grow: bool = False) -> Request:
        from corpus.prompting import render

        slots = self._slots(row)
        kind = slots["condition"].get("prompt", "spec")
        facts = kind == "facts"  # only the statements, never the spec
        templates = self.templates[kind]
        if self.compact and facts:
            max_tokens = self.max_tokens
            request = dict(messages=[("user", render(templates["local"], **slots))])
        elif facts:
            max_tokens = min(self.max_tokens, answer_room(slots["genre"]["words"][1], self.scratchpad))
            request = dict(system_prefix=render(templates["system"], **slots),
                           messages=[("user", render(templates["user"], scratchpad=self.scratchpad, **slots))])
        elif self.compact:
            unit_text = slots["unit"]["text"]
            slots.update(unit_text=unit_text if len(unit_text) <= 700 else unit_text[:700].rsplit(" ", 1)[0] + " ...",
                         spec_summary=self.spec["summary"])
            max_tokens = self.max_tokens
            request = dict(messages=[("user", render(templates["local"], **slots))])
        else:
            words_max = slots["genre"]["words"][1]
            max_tokens = min(self.max_tokens, answer_room(words_max, self.scratchpad))
            request = dict(system_prefix=render(templates["system"], spec_name=self.spec["name"],
                                                spec_text=self.spec["text"], **slots),
                           messages=[("user", render(templates["user"], scratchpad=self.scratchpad, **slots))])
        if grow:
            max_tokens = int(max_tokens * self.regrow)
        from msm.llm.types import Message

        return Request(messages=tuple(Message(r, c) for r, c in request.pop("messages")), max_tokens=max_tokens,
                       temperature=self.temperature, seed=row["seed"], purpose="generate", **request)

    def critique_request(self, row: dict, document: str) -> Request:
        from corpus.prompting import render
        from msm.llm.types import Message

        text = render("revise_critique.j2", document=document, **self._slots(row))
        return Request(messages=(Message("user", text),), max_tokens=400, temperature=0.0, seed=row["seed"],
                       purpose="revise")

    def rewrite_request(self, row: dict, document: str, critique: str) -> Request:
        from corpus.prompting import render
        from msm.llm.types import Message

        slots = self._slots(row)
        text = render("revise_rewrite.j2", document=document, critique=critique.strip(), tagged=self.scratchpad,
                      **slots)
        room = self.max_tokens if self.compact else min(self.max_tokens, int(slots["genre"]["words"][1] * 1.6) + 100)
        return Request(messages=(Message("user", text),), max_tokens=room, temperature=self.temperature,
                       seed=row["seed"], purpose="revise")

    def judge_request(self, row: dict, document: str, retry: bool = False) -> Request:
        from corpus.prompting import render
        from msm.llm.types import Message

        text = render("judge.j2", document=document, criteria=self.extra_criteria(row), **self._slots(row))
        return Request(messages=(Message("user", text),), max_tokens=600, temperature=0.0 if not retry else 0.7,
                       seed=row["seed"] + (1 if retry else 0), purpose="judge")


OTHER_ASSISTANTS = ("ChatGPT", "Gemini", "Claude", "Copilot", "Bard", "Llama", "Grok", "Mistral")


def make_context(spec, units_for_summary, genres, audiences, backend: str, model: str, base_url: str | None, *,
                 max_tokens: int | None = None, judge: str | None = None, truncation: str | None = None,
                 conditions: tuple[str, ...] = (), prompt_style: str | None = None, doc_words: int | None = None,
                 **run) -> BuildContext:
    """The one place that decides how a build prompts: small models get a compact prompt
    without scratchpad or whole spec; API models get the spec as a cached prefix. The writer's
    templates come from the spec's style and each condition's prompt kind (`writer_templates`).

    `doc_words` (the genres were rescaled to it by `load_genres`) is refused with the compact
    prompt: that prompt asks for about 150 words in 384 tokens of room whatever the genre says,
    so a document length would be silently ignored and the token target's plan would be wrong."""
    from corpus.conditions import ablation_units, behaviour_statement, check_facts, load_condition, style_criteria, \
        value_statements, value_text, writer_templates
    from corpus.prompting import prompt_hash, render_string

    # small models, local or served, get the compact prompt (pipelines.build.prompt_style decides)
    compact = (prompt_style or ("compact" if backend == "local" else "full")) == "compact"
    if compact and doc_words is not None:
        raise MsmError(f"doc_words ({doc_words}) cannot be used with the compact prompt ({backend}:{model}): it "
                       "writes short documents of about 150 words whatever the genres ask",
                       "drop doc_words (--doc-words), or use a full-prompt model (--prompt-style full)")
    model_name, provider_name = spec.names["model_name"], spec.names["provider_name"]
    style = spec.style
    names = ("standard", *[c for c in conditions if c != "standard"])
    rendered, templates = {}, {}
    for name in names:
        condition = load_condition(name, style)
        templates[condition.prompt] = writer_templates(style, condition).__dict__  # refuses what the table refuses
        cond = condition.to_json()
        for key in ("instruction", "short"):
            cond[key] = render_string(cond[key], model_name=model_name, provider_name=provider_name)
        rendered[name] = cond
    if style == "rules" and run.get("revise"):
        raise MsmError(f"--revise cannot be used with {spec.name}, a rules-style spec: its editor asks for "
                       "the reasons behind the behaviour, which a rules document must not add", "drop --revise")
    judge = judge or ("offline" if compact else "llm")
    if judge == "offline":
        blind = [n for n in names if rendered[n]["criteria"] and not rendered[n]["offline"]]
        if blind:
            raise MsmError(f"the offline judge cannot check the '{blind[0]}' condition",
                           "use an LLM judge (--judge llm with a capable backend), or other conditions")
    units = {u.id: {"id": u.id, "kind": u.kind, "title": u.title, "text": u.text} for u in spec.units}
    facts = [n for n in names if rendered[n]["prompt"] == "facts"]
    if facts and run.get("revise"):
        raise MsmError(f"--revise cannot be used with the '{facts[0]}' condition: its editor asks for the "
                       "spec's reasons, which that condition withholds", "drop --revise for this ablation")
    if conditions:
        behaviours = ablation_units(spec)
        if facts:
            check_facts(spec, behaviours)
        for unit in behaviours:
            units[unit.id].update(value_text=value_text(spec, unit), statement=behaviour_statement(unit),
                                  value_statements=value_statements(spec, unit))
    titles = "; ".join(u.title for u in units_for_summary[:10])
    used = [name for t in templates.values() for name in ((t["local"],) if compact else (t["system"], t["user"]))]
    defaults = dict(build_id="preview", plan_path="", staged_dir="", cache_dir="")
    return BuildContext(
        **{**defaults, **run}, backend=backend, model=model, base_url=base_url,
        spec={"name": spec.name, "text": spec.text, "model_name": model_name,
              "provider_name": provider_name,
              "summary": f"{spec.front_matter.get('description') or spec.name}. Main points: {titles}."},
        units=units, conditions=rendered, style=style, templates=templates,
        # the offline judge cannot read a document for invented reasons, any more than for
        # faithfulness: it checks topic and names only, so style criteria go to LLM judges
        style_criteria=[c.__dict__ for c in style_criteria(style)] if judge == "llm" else [],
        genres={g.name: {"name": g.name, "description": g.description, "words": list(g.words), "style": list(g.style)}
                for g in genres},
        audiences={a.name: {"name": a.name, "description": a.description} for a in audiences},
        prompt_hash=prompt_hash(*used, "judge.j2", "revise_critique.j2", "revise_rewrite.j2",
                                "brainstorm_assertions.j2", "brainstorm_ideas.j2"),
        compact=compact, scratchpad=not compact, max_tokens=max_tokens or default_room(genres, compact),
        temperature=0.8 if compact else 1.0, truncation=truncation or ("trim" if compact else "regrow"),
        judge=judge,
        wrong_names=[n for n in OTHER_ASSISTANTS if n.lower() not in model_name.lower()])


def answer_room(words_max: int, scratchpad: bool) -> int:
    """Tokens a document of up to `words_max` words needs: ~1.6 a word, plus the scratchpad."""
    return int(words_max * 1.6) + (600 if scratchpad else 0)


def default_room(genres, compact: bool) -> int:
    """The default cap on a document's answer: 384 for the compact prompt; else 4096, or more when
    the longest genre needs it (a long `doc_words`), so the default never cuts a document off."""
    if compact:
        return 384
    return max([4096] + [answer_room(g.words[1], True) for g in genres])


def load_context(path: str) -> BuildContext:
    """Read once per process and file version: a rerun with new settings rewrites the file."""
    import os

    return _load_context(path, os.stat(path).st_mtime_ns)


@lru_cache(maxsize=4)
def _load_context(path: str, mtime_ns: int) -> BuildContext:
    with open(path, encoding="utf-8") as fh:
        return BuildContext(**json.load(fh))
