"""Generation conditions (attribution, co-occurrence, ...) and the value each behaviour is tied to.

The ablation corpora compare documents that *attribute* a behaviour to its value with documents
where the two merely co-occur. Both need, for every behaviour unit, the value text the spec gives
for it: `values_for` finds it in the unit tree (the unit's own value children, then its
siblings, then the nearest ancestor level that has one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from corpus.spec import Spec, Unit
from msm.errors import MsmError

CONDITIONS_FILE = Path(__file__).with_name("conditions.yaml")
BEHAVIOUR_KINDS = ("rule", "behaviour", "principle")
VALUE_CHARS = 2400  # the value text a prompt carries; enough for a few paragraphs
PROMPT_KINDS = ("spec", "facts")
_LEAD = re.compile(r"^\s*(?:[-*+]\s+|\d+[.)]\s+)?\*\*[^*]+\*\*[:.]?\s*")  # a bold lead: **B1. Mild cheddar.**
_SENTENCE = re.compile(r"(.+?[.!?])(?=\s|$)", re.S)


@dataclass(frozen=True)
class Criterion:
    name: str
    question: str
    fails_as: str


@dataclass(frozen=True)
class Condition:
    name: str
    description: str
    uses_value: bool
    instruction: str  # Jinja2 source; rendered with the build's slots
    short: str
    criteria: tuple[Criterion, ...]
    offline: str | None  # require / forbid a link marker, or None: the offline judge cannot tell
    # how the writer is prompted: "spec" (the whole spec, told to explain its reasons) or "facts"
    # (only the statements it may use, as separate facts: no spec, no reasons, no linked text)
    prompt: str = "spec"
    uses_behaviour: bool = True  # facts prompts: whether the behaviour statement is given

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "uses_value": self.uses_value,
                "instruction": self.instruction, "short": self.short, "offline": self.offline,
                "criteria": [c.__dict__ for c in self.criteria], "prompt": self.prompt,
                "uses_behaviour": self.uses_behaviour}


@lru_cache(maxsize=1)
def _catalogue() -> dict:
    with open(CONDITIONS_FILE, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def link_markers() -> list[str]:
    return list(_catalogue()["link_markers"])


def known_conditions() -> list[str]:
    return list(_catalogue()["conditions"])


def load_condition(name: str, style: str = "values") -> Condition:
    """A condition as a spec of `style` gets it: `by_style` may replace its instruction and short."""
    entries = _catalogue()["conditions"]
    if name not in entries:
        raise MsmError(f"unknown condition '{name}'", f"use one of {', '.join(entries)}")
    e = entries[name]
    prompt = e.get("prompt", "spec")
    if prompt not in PROMPT_KINDS:
        raise MsmError(f"{CONDITIONS_FILE}: condition '{name}' has prompt '{prompt}'",
                       f"use one of {', '.join(PROMPT_KINDS)}")
    words = {**e, **(e.get("by_style") or {}).get(style, {})}
    return Condition(name, e["description"], bool(e.get("uses_value")), " ".join(words["instruction"].split()),
                     words["short"], tuple(_criteria(e["criteria"])), e.get("offline"), prompt,
                     bool(e.get("uses_behaviour", True)))


def _criteria(entries: list) -> list[Criterion]:
    return [Criterion(c["name"], c["question"], c["fails_as"]) for c in entries]


@dataclass(frozen=True)
class WriterTemplates:
    system: str  # API models: the system prompt (a cached prefix)
    user: str
    local: str  # small local models: the one compact prompt


def _style_entry(style: str) -> dict:
    styles = _catalogue()["styles"]
    if style not in styles:
        raise MsmError(f"unknown spec style '{style}'", f"use one of {', '.join(styles)}")
    return styles[style]


def writer_templates(style: str, condition: Condition) -> WriterTemplates:
    """The one choice of writer templates: by the spec's style and the condition's prompt kind
    (conditions.yaml, `styles`). A combination the table refuses is a one-line error."""
    entry = _style_entry(style)["prompts"][condition.prompt]
    if "refuse" in entry:
        raise MsmError(f"the '{condition.name}' condition cannot be used with a {style}-style spec: "
                       f"{' '.join(entry['refuse'].split())}",
                       "build it with other conditions, or without --conditions")
    return WriterTemplates(entry["system"], entry["user"], entry["local"])


def check_style(style: str, conditions: tuple[str, ...]) -> None:
    """Refuse, before any planning, a condition the spec's style cannot be written under."""
    for name in ("standard", *conditions):
        writer_templates(style, load_condition(name, style))


def style_criteria(style: str) -> tuple[Criterion, ...]:
    """Judge criteria every document of a spec of this style is checked for (conditions.yaml)."""
    return tuple(_criteria(_style_entry(style).get("criteria") or []))


def parse_conditions(text: str) -> tuple[str, ...]:
    """`attribution,cooccurrence` -> validated names, in the order given, each once."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        load_condition(name)
    if len(names) < 2:
        raise MsmError(f"--conditions needs at least two conditions to compare, got {len(names)}",
                       "e.g. --conditions attribution,cooccurrence")
    return names


def has_link(text: str) -> bool:
    """Whether a text uses one of the causal link markers (the offline judge's whole test)."""
    lowered = text.lower()
    return any(re.search(rf"\b{re.escape(m)}\b", lowered) for m in link_markers())


def values_for(spec: Spec, unit: Unit) -> list[Unit]:
    """The value units that explain `unit`: its own value children, else value siblings, else the
    value units nearest to it up the tree, else none."""
    by_parent: dict[str | None, list[Unit]] = {}
    for u in spec.units:
        by_parent.setdefault(u.parent, []).append(u)
    by_id = {u.id: u for u in spec.units}

    def values_under(parent: str | None) -> list[Unit]:
        return [u for u in by_parent.get(parent, []) if u.kind == "value"]

    found = values_under(unit.id) or [u for u in values_under(unit.parent) if u.id != unit.id]
    node = by_id.get(unit.parent) if unit.parent else None
    while not found and node is not None:
        if node.kind == "value":
            found = [node]
            break
        found = values_under(node.parent)
        node = by_id.get(node.parent) if node.parent else None
    return found


def value_text(spec: Spec, unit: Unit) -> str:
    """The value passages behind a unit, joined, including each value's own sub-values."""
    parts = []
    for value in values_for(spec, unit):
        parts.append(value.text.strip())
        parts += [u.text.strip() for u in spec.units if u.parent == value.id and u.kind in ("value", "text")]
    text = "\n\n".join(p for p in parts if p)
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS].rsplit(" ", 1)[0] + " ..."


def ablation_units(spec: Spec) -> list[Unit]:
    """Behaviour units that have a value to be attributed to; the rows of an ablation plan."""
    units = [u for u in spec.units if u.kind in BEHAVIOUR_KINDS and values_for(spec, u)]
    if not units:
        raise MsmError(f"{spec.name} has no behaviour with a value behind it, so there is nothing to attribute",
                       "give rules or behaviours a value ('**Why.** ...' after them, or a heading with kind=value)")
    return units


def _body(unit: Unit) -> str:
    """A unit's prose: its heading line or bold lead removed."""
    lines = unit.text.strip().splitlines()
    if lines and lines[0].lstrip().startswith("#"):
        lines = lines[1:]
    return _LEAD.sub("", "\n".join(lines).strip(), count=1).strip()


def behaviour_statement(unit: Unit) -> str:
    """The bare behaviour: the first sentence of the unit's prose (`Llama likes mild cheddar.`).
    The spec states it before giving reasons, so the sentence carries no link to a value."""
    body = " ".join(_body(unit).split())
    match = _SENTENCE.match(body)
    return (match.group(1) if match else body).strip()


def value_statements(spec: Spec, unit: Unit) -> list[str]:
    """The values behind a unit, each as the first paragraph of its value unit: the value stated
    on its own, before the spec ties it to any behaviour."""
    out = []
    for value in values_for(spec, unit):
        paragraphs = [p.strip() for p in _body(value).split("\n\n") if p.strip()]
        if paragraphs and paragraphs[0] not in out:
            out.append(" ".join(paragraphs[0].split()))
    return out


CROSS_LINKS = ("this is why", "which is why", "that is why", "follows from", "the reason")


def links_value_to_behaviour(text: str, model_name: str) -> bool:
    """Whether a value statement ties the value to what the model does: a sentence that names the
    model (or its rules or preferences) and uses a link marker, or a cross-reference such as
    'this is why'. A value explained in its own terms ('someone who complies because they are
    afraid...') is not a link."""
    lowered = text.lower()
    if any(re.search(rf"\b{re.escape(p)}\b", lowered) for p in CROSS_LINKS):
        return True
    subjects = (model_name.lower(), "rule", "prefer", "likes", "dislikes")
    return any(has_link(s) and any(w in s.lower() for w in subjects) for s in _SENTENCE.findall(text))


def check_facts(spec: Spec, units: list[Unit]) -> None:
    """A facts prompt must carry no linked statement: each behaviour statement is bare (no link
    marker) and no value statement ties the value to the behaviour, or the spec cannot serve a
    facts condition as written."""
    model_name = spec.names["model_name"]
    for unit in units:
        statement = behaviour_statement(unit)
        if has_link(statement):
            raise MsmError(f"{spec.name}: the first sentence of {unit.id} gives a reason ({statement[:80]!r})",
                           "state the bare behaviour first (`X likes Y.`), then the reasons")
        for value in value_statements(spec, unit):
            if links_value_to_behaviour(value, model_name):
                raise MsmError(f"{spec.name}: the first paragraph of a value behind {unit.id} ties it to a behaviour "
                               f"({value[:80]!r})", "state the value on its own in its first paragraph, then how it "
                               "bears on the behaviour")
