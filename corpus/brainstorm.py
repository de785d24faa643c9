"""LLM-brainstormed planning, after the paper's chain: unit -> assertions -> document ideas.

The balanced cells (unit x genre x audience) stay the skeleton, so coverage stays balanced; a
capable model fills each cell with a concrete idea. Two guards keep the model honest:

- an assertion must quote the unit word for word (three words or more), else it is dropped as
  inventing spec content;
- ideas are deduplicated against everything already proposed for the unit (normalised text,
  then word-set overlap), and top-up rounds list what exists so the model proposes something new.

An idea the model marks unsuitable is dropped with its reason; a cell that ends a round limit
without an idea keeps the plain cell prompt, and the record says so.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from corpus.prompting import items_per_call

ASSERTION_KINDS = ("behaviour", "value", "belief", "preference")
MAX_ASSERTIONS = 6
TOP_UP_ROUNDS = 2
NEAR_COPY = 0.8  # word-set Jaccard at or above which two ideas count as the same
# plan slots per ideas request and its answer room (corpus/list_requests.yaml): a unit with 1,500
# slots at 40M tokens is asked in many lists, never one answer too long to finish
IDEAS_PER_CALL, IDEA_TOKENS = items_per_call("ideas")
MAX_EXISTING_SHOWN = 40  # ideas listed back to the model in a top-up request, per unit


@dataclass
class Assertion:
    unit_id: str
    ord: int
    kind: str
    text: str
    quote: str
    status: str  # kept or dropped
    reason: str | None = None


@dataclass
class Idea:
    unit_id: str
    round: int
    plan_row_id: str | None
    doc_type: str
    idea: str
    status: str  # used, dropped
    reason: str | None = None


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _json_list(text: str) -> list | None:
    from corpus.prompting import find_json

    data = find_json(text, "list")
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else None


def parse_assertions(unit: dict, answer: str) -> list[Assertion]:
    unit_words = " ".join(_words(unit["text"]))
    out = []
    for i, item in enumerate(_json_list(answer) or []):
        kind, text, quote = str(item.get("kind", "")), str(item.get("text", "")).strip(), str(item.get("quote", ""))
        quoted = " ".join(_words(quote))
        if kind not in ASSERTION_KINDS:
            out.append(Assertion(unit["id"], i, kind, text, quote, "dropped", f"unknown kind {kind!r}"))
        elif len(quoted.split()) < 3 or f" {quoted} " not in f" {unit_words} ":
            out.append(Assertion(unit["id"], i, kind, text, quote, "dropped",
                                 "not grounded: the quote is not in the unit (invents spec content?)"))
        else:
            out.append(Assertion(unit["id"], i, kind, text, quote, "kept"))
    return out


def _near_copy(idea: str, existing: list[frozenset]) -> bool:
    """`existing`: the word sets of the ideas kept so far (built once each: a unit may hold 1,500)."""
    words = set(_words(idea))
    for theirs in existing:
        if words and theirs and len(words & theirs) / len(words | theirs) >= NEAR_COPY:
            return True
    return False


def brainstorm(plan: list, ctx, complete) -> tuple[list, list[Assertion], list[Idea]]:
    """(plan rows with ideas, assertions, every idea proposed with what became of it).

    `complete(requests) -> responses` makes the calls (through the call cache, so a rerun
    brainstorms nothing twice and reproduces the same plan)."""
    from corpus.prompting import render
    from msm.llm.types import Message, Request

    def request(template: str, purpose_seed: int, **slots) -> Request:
        text = render(template, model_name=ctx.spec["model_name"], provider_name=ctx.spec["provider_name"], **slots)
        return Request(messages=(Message("user", text),), max_tokens=IDEA_TOKENS, temperature=1.0, seed=purpose_seed,
                       purpose="brainstorm")

    by_unit: dict[str, list] = {}
    for row in plan:
        by_unit.setdefault(row.unit_id, []).append(row)
    units = [ctx.units[u] for u in by_unit]
    answers = complete([request("brainstorm_assertions.j2", 0, unit=u, limit=MAX_ASSERTIONS) for u in units])
    assertions = [a for u, r in zip(units, answers) for a in parse_assertions(u, r.text if r.ok else "")]
    kept = {u["id"]: [a for a in assertions if a.unit_id == u["id"] and a.status == "kept"] for u in units}

    chosen: dict[str, tuple[str, str, str | None]] = {}
    ideas: list[Idea] = []
    existing: dict[str, list[str]] = {u: [] for u in by_unit}
    word_sets: dict[str, list[frozenset]] = {u: [] for u in by_unit}
    for round_no in range(1 + TOP_UP_ROUNDS):
        open_units = [u for u, rows in by_unit.items() if kept[u] and any(r.id not in chosen for r in rows)]
        if not open_units:
            break
        requests, slots_of = [], []
        for unit_id in open_units:
            rows = [r for r in by_unit[unit_id] if r.id not in chosen]
            for start in range(0, len(rows), IDEAS_PER_CALL):  # a unit's slots in lists that fit the answer
                slots = [{"number": i + 1, "row": r, "genre": r.genre, "audience": r.audience}
                         for i, r in enumerate(rows[start:start + IDEAS_PER_CALL])]
                slots_of.append((unit_id, slots))
                requests.append(request("brainstorm_ideas.j2", round_no, unit=ctx.units[unit_id],
                                        assertions=[dataclasses.asdict(a) for a in kept[unit_id]],
                                        existing=existing[unit_id][-MAX_EXISTING_SHOWN:], slots=slots))
        for (unit_id, slots), response in zip(slots_of, complete(requests)):
            by_number = {s["number"]: s for s in slots}
            for item in _json_list(response.text if response.ok else "") or []:
                slot = by_number.get(item.get("slot"))
                idea, doc_type = str(item.get("idea", "")).strip(), str(item.get("doc_type", "")).strip()
                row_id = slot["row"].id if slot else None
                if slot is None or row_id in chosen:
                    ideas.append(Idea(unit_id, round_no, None, doc_type, idea, "dropped", "no such open slot"))
                elif item.get("suitable") is False:
                    ideas.append(Idea(unit_id, round_no, row_id, doc_type, idea, "dropped",
                                      f"unsuitable: {item.get('why') or 'no reason given'}"))
                elif not idea:
                    ideas.append(Idea(unit_id, round_no, row_id, doc_type, idea, "dropped", "empty idea"))
                elif _near_copy(idea, word_sets[unit_id]):
                    ideas.append(Idea(unit_id, round_no, row_id, doc_type, idea, "dropped",
                                      "duplicate of an existing idea"))
                else:
                    claim = item.get("claim")
                    claims = kept[unit_id]
                    assertion = claims[claim - 1].text if isinstance(claim, int) and 0 < claim <= len(claims) else None
                    chosen[row_id] = (doc_type, idea, assertion)
                    existing[unit_id].append(idea)
                    word_sets[unit_id].append(frozenset(_words(idea)))
                    ideas.append(Idea(unit_id, round_no, row_id, doc_type, idea, "used"))
    rows = [dataclasses.replace(r, doc_type=chosen[r.id][0], idea=chosen[r.id][1], assertion=chosen[r.id][2])
            if r.id in chosen else r for r in plan]
    return rows, assertions, ideas
