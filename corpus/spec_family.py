"""Spec families: several specs that share anchored core rules and differ in what surrounds them.

The spec-science comparisons (rules only, rules plus values, rules plus sub-rules) are only fair
when every variant states the same core rules. A core rule is a heading with an explicit anchor
and `kind=rule` (`### SP1. Support oversight {#SP1 kind=rule}`); the family check compares the
rendered text of each such unit across the specs, byte for byte (trailing blank lines aside).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from corpus.spec import Spec, Unit
from corpus.spec_parse import ANCHOR
from msm.errors import MsmError


@dataclass
class Member:
    spec: Spec
    words: int
    core: dict[str, str]  # anchor -> rule text
    adds: Counter = field(default_factory=Counter)  # kinds of the units outside the core rules

    @property
    def core_words(self) -> int:
        return sum(len(text.split()) for text in self.core.values())


@dataclass
class Mismatch:
    anchor: str
    reference: str  # spec name holding the reference text
    other: str
    line: int  # 1-based line within the rule unit
    column: int
    expected: str
    found: str


@dataclass
class FamilyReport:
    members: list[Member]
    shared: list[str]
    mismatches: list[Mismatch]
    partial: dict[str, list[str]]  # anchor -> names of the specs that lack it

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.partial


def body_words(spec: Spec) -> int:
    """Words of the rendered body (front matter excluded), the length measure specs quote."""
    return len(spec.text.split())


def anchored_rules(spec: Spec) -> dict[str, str]:
    """Rule units whose heading carries an explicit {#anchor}, keyed by that anchor."""
    found = {}
    for unit in spec.units:
        if unit.kind == "rule" and _explicit_anchor(unit) == unit.id:
            found[unit.id] = unit.text.rstrip()
    return found


def _explicit_anchor(unit: Unit) -> str | None:
    first = unit.text.split("\n", 1)[0]
    m = ANCHOR.search(first) if first.lstrip().startswith("#") else None
    return m.group(1) if m else None


def compare_family(specs: list[Spec]) -> FamilyReport:
    if len(specs) < 2:
        raise MsmError("a family needs at least two specs", "pass two or more spec files")
    members = [Member(s, body_words(s), anchored_rules(s)) for s in specs]
    everywhere = set.intersection(*(set(m.core) for m in members))
    if not everywhere:
        raise MsmError(
            "these specs share no anchored rule",
            "mark each core rule with the same anchored heading in every spec, e.g. '### SP1. Title {#SP1 kind=rule}'",
        )
    order = [a for a in members[0].core if a in everywhere]
    seen_in: dict[str, list[str]] = {}
    for m in members:
        for anchor in m.core:
            seen_in.setdefault(anchor, []).append(m.spec.name)
    partial = {
        anchor: [m.spec.name for m in members if anchor not in m.core]
        for anchor, names in seen_in.items()
        if 1 < len(names) < len(members)
    }
    shared = set(order) | set(partial)
    mismatches = []
    for anchor in order:
        ref = members[0]
        for other in members[1:]:
            if other.core[anchor] != ref.core[anchor]:
                mismatches.append(_mismatch(anchor, ref, other))
    for m in members:
        m.adds = Counter(u.kind for u in m.spec.units if u.id not in shared and u.kind != "section")
    return FamilyReport(members, order, mismatches, partial)


def _mismatch(anchor: str, ref: Member, other: Member) -> Mismatch:
    a, b = ref.core[anchor], other.core[anchor]
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    line = a.count("\n", 0, i) + 1
    column = i - (a.rfind("\n", 0, i) + 1) + 1
    return Mismatch(anchor, ref.spec.name, other.spec.name, line, column, _excerpt(a, i), _excerpt(b, i))


def _excerpt(text: str, i: int, width: int = 24) -> str:
    piece = text[max(0, i - width) : i + width].replace("\n", "⏎")
    return piece or "(end of rule)"
