"""Matched ablation corpora: every plan cell generated under each condition, verified, then
token-matched.

A cell (unit, genre, audience, idea, seed) enters the matched corpora only if its document was kept
under *every* condition: a co-occurrence document that leaked a link, or an attribution document
that made none, removes the whole cell, so the conditions differ only in what they were asked to
do. Kept tokens are then matched within a tolerance by dropping whole cells (never by cutting a
document), greedily, the cell whose removal narrows the gap most first, giving up at most half of
the cells. When the tolerance cannot be met that way the ablation stops with how close it got,
and registers nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

from msm.errors import MsmError

DEFAULT_TOLERANCE = 0.02
MAX_LOSS = 0.5  # matching may give up at most this share of the cells kept under every condition


@dataclass
class ConditionReport:
    condition: str
    planned: int
    kept: int
    checked: int  # documents whose condition check got a verdict
    failed_check: int  # dropped for what the condition guards against (attribution_leak, ...)
    guard: str | None  # that drop reason
    matched_docs: int
    matched_tokens: int
    corpus_name: str | None = None
    corpus_id: str | None = None

    @property
    def failure_rate(self) -> float | None:
        return self.failed_check / self.checked if self.checked else None


@dataclass
class AblationResult:
    ablation_id: str
    name: str
    conditions: tuple[str, ...]
    cells: int
    cells_kept_everywhere: int
    matched_cells: int
    token_error: float
    tolerance: float
    reports: list[ConditionReport]
    builds: list[str]
    cost_usd: float
    seconds: float
    stop: str = "cells built"
    rounds: list = field(default_factory=list)

    @property
    def lost_to_matching(self) -> int:
        return self.cells_kept_everywhere - self.matched_cells


def relative_gap(totals) -> float:
    """(largest - smallest) / smallest: the token-match error of per-condition totals."""
    low, high = min(totals), max(totals)
    if low <= 0:
        return math.inf if high > 0 else 0.0
    return (high - low) / low


def match_cells(tokens: dict[str, list[int]], tolerance: float, min_keep: int = 1) -> tuple[list[str], float]:
    """Cells (id -> kept tokens per condition) to keep so that per-condition totals lie within
    `tolerance` of each other. Drops whole cells greedily; returns (kept ids, reached gap). The
    order of the ids is stable, and ties break on the cell id, so the result is deterministic."""
    import numpy as np

    ids = sorted(tokens)
    if not ids:
        return [], 0.0
    matrix = np.array([tokens[i] for i in ids], dtype=np.float64)
    alive = np.ones(len(ids), dtype=bool)
    totals = matrix.sum(axis=0)
    gap = relative_gap(totals)
    while gap > tolerance and alive.sum() > max(1, min_keep):
        after = totals[None, :] - matrix  # totals if each cell were dropped
        low = after.min(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            gaps = np.where(low > 0, (after.max(axis=1) - low) / np.where(low > 0, low, 1), np.inf)
        gaps[~alive] = np.inf
        best = int(np.argmin(gaps))  # argmin takes the first (lowest id) among equal gaps
        if not gaps[best] < gap:
            break  # no single drop narrows the gap: stuck
        alive[best] = False
        totals = after[best]
        gap = float(gaps[best])
    return [i for i, a in zip(ids, alive) if a], float(gap)


def build_ablation(spec_path: str, opts, conditions: tuple[str, ...], tolerance: float = DEFAULT_TOLERANCE,
                   target_tokens: int | None = None, max_rounds: int = 5) -> AblationResult:
    """Build every cell under each condition (in rounds when a token target is set), match, record."""
    import time

    from corpus.spec import load_spec
    from msm.config import load_settings
    from pipelines.build import build_corpus

    if not 0 < tolerance < 1:
        raise MsmError(f"--tolerance {tolerance} is not a fraction between 0 and 1", "e.g. --tolerance 0.02")
    started = time.monotonic()
    spec = load_spec(spec_path, opts.variables)
    if target_tokens is not None and opts.max_cost is not None:
        from pipelines.target import refuse_short_budget

        refuse_short_budget(spec_path, opts, target_tokens, tuple(conditions))
    name = opts.name or f"{spec.spec_id}-ablation"
    db = load_settings(opts.db).db
    base = dataclasses.replace(opts, conditions=tuple(conditions), register=False)
    rounds = []
    stop = "cells built"
    if target_tokens is None:
        rounds.append(build_corpus(spec_path, base))
    else:
        from pipelines.target import ROUND_SEED_STEP

        from corpus.catalog import load_genres
        from msm.llm.select import choose
        from pipelines.target import first_guess_tokens_per_doc

        local = choose(opts.backend, opts.model, opts.base_url)[0] == "local"
        # the share of cells kept under every condition and matched (corpus/cost_model.yaml)
        from corpus.cost import cost_model

        per_cell = first_guess_tokens_per_doc(load_genres(opts.genres, opts.doc_words), local) * \
            cost_model()["ablation_cell_share"]
        cells_wanted = base.docs or max(1, math.ceil(target_tokens / per_cell))
        spent = 0.0
        stop = "round limit"
        for r in range(max_rounds):
            budget = None if opts.max_cost is None else opts.max_cost - spent
            if budget is not None and budget <= 0:
                stop = "budget reached"
                break
            result = build_corpus(spec_path, dataclasses.replace(
                base, docs=cells_wanted, seed=opts.seed + r * ROUND_SEED_STEP, max_cost=budget))
            rounds.append(result)
            spent += result.cost_usd
            matched_tokens = _matched_tokens_now(db, [b.build_id for b in rounds], conditions, tolerance)
            if matched_tokens >= target_tokens:
                stop = "target reached"
                break
            if not result.complete:
                stop = "incomplete round (rerun to resume)"
                break
            if matched_tokens == 0:  # nothing matched yet, so no yield to size from: grow the round
                if result.status_counts.get("kept", 0) == 0 and cells_wanted >= 64:
                    stop = "no progress (a round of 64 or more cells kept nothing)"
                    break
                cells_wanted *= 4
                continue
            per_cell = matched_tokens / sum(b.planned for b in rounds) * len(conditions)
            cells_wanted = max(1, math.ceil((target_tokens - matched_tokens) / per_cell * 1.2))
    builds = [b.build_id for b in rounds]
    if any(not b.complete for b in rounds):
        missing = next(b for b in rounds if not b.complete)
        raise MsmError(f"build {missing.build_id} did not finish every plan row, so cells cannot be matched yet",
                       "rerun the same command to resume it")
    result = _match_and_record(db, spec.version, name, builds, tuple(conditions), tolerance, target_tokens)
    result.cost_usd = sum(b.cost_usd for b in rounds)
    result.seconds = time.monotonic() - started
    result.stop = stop
    result.rounds = rounds
    return result


def _cell_tokens(con, builds: list[str], conditions: tuple[str, ...]):
    """cell -> {condition: (document id, status, tokens)} over the builds' plan rows."""
    rows = con.execute(
        "SELECT p.cell_id, p.condition, d.id, coalesce(d.status, p.status), d.n_tokens FROM plan_rows p "
        "LEFT JOIN documents d ON d.build_id = p.build_id AND d.plan_row_id = p.id "
        "WHERE p.build_id IN (SELECT unnest(?::VARCHAR[])) AND p.cell_id IS NOT NULL", [builds]).fetchall()
    cells: dict[str, dict[str, tuple]] = {}
    for cell, condition, doc_id, status, n_tokens in rows:
        if condition in conditions:
            cells.setdefault(cell, {})[condition] = (doc_id, status, n_tokens or 0)
    return cells


def _kept_everywhere(cells, conditions) -> dict[str, list[int]]:
    return {cell: [per[c][2] for c in conditions] for cell, per in cells.items()
            if all(c in per and per[c][1] == "kept" for c in conditions)}


def _matched_tokens_now(db, builds, conditions, tolerance) -> int:
    from warehouse.db import connect

    con = connect(db, read_only=True)
    try:
        tokens = _kept_everywhere(_cell_tokens(con, builds, conditions), conditions)
    finally:
        con.close()
    kept, gap = match_cells(tokens, tolerance, min_keep=math.ceil(len(tokens) * (1 - MAX_LOSS)))
    if not kept or gap > tolerance:  # corpora that cannot be matched yet hold nothing usable
        return 0
    return int(min(sum(tokens[c][k] for c in kept) for k in range(len(conditions))))


def _smallest_matched_prefix(tokens: dict[str, list[int]], tolerance: float, target: int) -> list[str]:
    """The shortest prefix of the cells, in a fixed shuffled order, whose matched corpora each hold
    the target (binary search over the prefix length); all cells when none does."""
    order = sorted(tokens, key=lambda c: hashlib.sha256(c.encode()).hexdigest())

    def holds(n: int) -> bool:
        pool = {c: tokens[c] for c in order[:n]}
        kept, gap = match_cells(pool, tolerance, min_keep=math.ceil(n * (1 - MAX_LOSS)))
        return gap <= tolerance and min(sum(pool[c][k] for c in kept) for k in range(len(pool[kept[0]]))) >= target

    low, high, best = 1, len(order), len(order)
    while low <= high:
        mid = (low + high) // 2
        if holds(mid):
            best, high = mid, mid - 1
        else:
            low = mid + 1
    return order[:best]


def _match_and_record(db, spec_version: str, name: str, builds: list[str], conditions: tuple[str, ...],
                      tolerance: float, target_tokens: int | None) -> AblationResult:
    from warehouse.corpus_load import register_corpus
    from warehouse.db import connect, insert_rows

    con = connect(db)
    try:
        cells = _cell_tokens(con, builds, conditions)
        everywhere = _kept_everywhere(cells, conditions)
        pool = everywhere
        if target_tokens is not None and everywhere:
            pool = {c: everywhere[c] for c in _smallest_matched_prefix(everywhere, tolerance, target_tokens)}
        kept, gap = match_cells(pool, tolerance, min_keep=math.ceil(len(pool) * (1 - MAX_LOSS)))
        if not everywhere:
            raise MsmError(f"no cell was kept under every condition ({len(cells)} cells built)",
                           "build more cells (--docs), or see why with "
                           "`msm warehouse sql 'SELECT * FROM drops_by_reason'`")
        if gap > tolerance:
            totals = [sum(pool[c][k] for c in pool) for k in range(len(conditions))]
            detail = ", ".join(f"{c} {t:,}" for c, t in zip(conditions, totals))
            raise MsmError(f"kept tokens could not be matched within {tolerance:.1%}: the closest was {gap:.1%} "
                           f"with {len(kept)} of {len(pool)} cells, dropping at most {MAX_LOSS:.0%} of them "
                           f"(all cells: {detail} tokens)", "build more cells (--docs) or allow a wider --tolerance")
        keep = set(kept)
        ablation_id = "a" + hashlib.sha256(json.dumps([builds, conditions, tolerance, target_tokens]).encode()
                                           ).hexdigest()[:15]
        records, reports = [], []
        guards = _guards(conditions)
        for k, condition in enumerate(conditions):
            for cell, per in sorted(cells.items()):
                if condition not in per:
                    continue
                doc_id, status, n = per[condition]
                state = "matched" if cell in keep else "lost_to_matching" if cell in everywhere else "unmatched"
                records.append({"ablation_id": ablation_id, "cell_id": cell, "condition": condition,
                                "document_id": doc_id, "status": state, "n_tokens": n})
            reports.append(_report(con, builds, condition, guards[condition],
                                   [cells[c][condition][0] for c in kept], sum(pool[c][k] for c in kept)))
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM ablation_cells WHERE ablation_id = ?", [ablation_id])
            con.execute("DELETE FROM ablations WHERE id = ?", [ablation_id])
            con.execute("INSERT INTO ablations (id, name, spec_version, conditions, builds, tolerance, token_error, "
                        "cells, matched) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [ablation_id, name, spec_version, json.dumps(conditions), json.dumps(builds), tolerance,
                         gap, len(cells), len(kept)])
            insert_rows(con, "INSERT INTO ablation_cells", records)
            for report in reports:
                report.corpus_name = f"{name}-{report.condition}"
                report.corpus_id = register_corpus(con, report.corpus_name, builds[-1],
                                                   [cells[c][report.condition][0] for c in kept])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    return AblationResult(ablation_id, name, conditions, len(cells), len(everywhere), len(kept), gap, tolerance,
                          reports, builds, 0.0, 0.0)


def _guards(conditions) -> dict[str, tuple[str, str] | None]:
    """condition -> (criterion, drop reason) of its check, or None for a condition without one."""
    from corpus.conditions import load_condition

    out = {}
    for name in conditions:
        criteria = load_condition(name).criteria
        out[name] = (criteria[0].name, criteria[0].fails_as) if criteria else None
    return out


def _report(con, builds, condition, guard, matched_ids, matched_tokens) -> ConditionReport:
    planned, kept = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'kept') FROM plan_rows "
        "WHERE build_id IN (SELECT unnest(?::VARCHAR[])) AND condition = ?", [builds, condition]).fetchone()
    checked = failed = 0
    if guard:
        checked, failed = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE NOT j.verdict) FROM judgments j JOIN documents d "
            "ON j.subject_kind = 'document' AND j.subject_id = d.id WHERE d.build_id IN "
            "(SELECT unnest(?::VARCHAR[])) AND d.condition = ? AND j.criterion = ?",
            [builds, condition, guard[0]]).fetchone()
    return ConditionReport(condition, planned, kept, checked, failed, guard[1] if guard else None,
                           len(matched_ids), int(matched_tokens))
