"""The design matrix: spec unit x genre x audience x condition x replicate, with balanced quotas.

Every unit gets its share (counts differ by at most one), and so does every genre and every
audience. Each row has an id derived from what it asks for, and a seed derived from its id,
so the same plan comes out on every machine.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, replace

from corpus.catalog import Audience, Genre
from corpus.spec import Spec, Unit
from msm.errors import MsmError

PLAN_KINDS = ("principle", "rule", "value", "behaviour")


@dataclass(frozen=True)
class PlanRow:
    id: str
    spec_version: str
    unit_id: str
    unit_kind: str
    genre: str
    audience: str
    condition: str
    replicate: int
    seed: int
    doc_type: str | None = None  # from brainstorming, when a capable model planned the cell
    idea: str | None = None
    assertion: str | None = None
    cell_id: str | None = None  # in an ablation, the cell this row generates under its condition

    def to_json(self) -> dict:
        return asdict(self)


def plan_units(spec: Spec) -> list[Unit]:
    """Units documents are written about: principles, rules, values and behaviours; else sections."""
    units = [u for u in spec.units if u.kind in PLAN_KINDS]
    if not units:
        parents = {u.parent for u in spec.units}
        units = [u for u in spec.units if u.kind == "section" and (u.id not in parents or len(u.text) > 400)]
    return units or list(spec.units)


def _balanced(names: list[str], n: int, rng: random.Random) -> list[str]:
    """n names in which each appears floor(n/k) or ceil(n/k) times, shuffled."""
    out: list[str] = []
    while len(out) < n:
        block = list(names)
        rng.shuffle(block)
        out.extend(block)
    return out[:n]


def make_plan(spec: Spec, genres: list[Genre], audiences: list[Audience], docs: int, seed: int = 0,
              condition: str = "standard", units: list[Unit] | None = None) -> list[PlanRow]:
    if docs <= 0:
        raise MsmError(f"--docs must be at least 1, got {docs}", "pass a positive number of documents")
    units = units or plan_units(spec)
    rng = random.Random(f"{spec.version}:{seed}:{condition}")
    genre_seq = _balanced([g.name for g in genres], docs, rng)
    audience_seq = _balanced([a.name for a in audiences], docs, rng)
    rows = []
    for i in range(docs):
        unit = units[i % len(units)]
        replicate = i // len(units)
        ident = hashlib.sha256(
            f"{spec.version}|{unit.id}|{genre_seq[i]}|{audience_seq[i]}|{condition}|{replicate}|{seed}".encode()
        ).hexdigest()[:16]
        rows.append(PlanRow(ident, spec.version, unit.id, unit.kind, genre_seq[i], audience_seq[i], condition,
                            replicate, int(ident[:8], 16)))
    return rows


def expand_conditions(rows: list[PlanRow], conditions: tuple[str, ...]) -> list[PlanRow]:
    """Every cell under every condition: the same unit, genre, audience, idea and seed, so that
    documents differ only by what the condition asks; the row id adds the condition."""
    out = []
    for row in rows:
        for condition in conditions:
            ident = hashlib.sha256(f"{row.id}|{condition}".encode()).hexdigest()[:16]
            out.append(replace(row, id=ident, condition=condition, cell_id=row.id))
    return out
