"""`msm eval run`: a suite against a model, recorded in the warehouse with intervals on every rate.

Suites are registered by name in `eval/suites/` (a module each: dataset, solver, scorer). The
model under test is a local alias or directory, a LoRA adapter folder written by `msm train run`
(merged onto its base for the run), or a model on a server through the backends layer. Errors
are counted as errors: they are reported beside each rate and never scored as wrong answers.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field

from msm.errors import MsmError


@dataclass
class EvalResult:
    run_id: str
    suite: str
    model: str
    target: str
    mode: str
    samples: list
    summary: dict = field(default_factory=dict)


def parse_options(suite, pairs: dict | None) -> dict:
    """A suite's options from `key=value` strings (or values), typed by the suite's table."""
    options = {name: default for name, (_, default, _) in suite.options.items()}
    for key, value in (pairs or {}).items():
        if key not in suite.options:
            known = ", ".join(suite.options) or "none"
            raise MsmError(f"the {suite.name} suite has no option '{key}'", f"its options: {known}")
        kind = suite.options[key][0]
        try:
            options[key] = kind(value) if value is not None else None
        except ValueError:
            article = "an" if kind is int else "a"
            raise MsmError(f"option {key}={value} is not {article} {kind.__name__}",
                           f"give {key} as {article} {kind.__name__}") from None
    return options


def run_eval(suite: str, model: str, target: str | None = None, items: list[str] | None = None,
             mode: str | None = None, backend: str | None = None, base_url: str | None = None,
             limit: int | None = None, seed: int = 0, db=None, log=print, judge: dict | None = None,
             options: dict | None = None, identity: dict | None = None,
             chat_template: str | None = None, idle_timeout: float = 120.0) -> EvalResult:
    """Run a suite, record eval_runs and eval_samples, return the per-group summary. `judge`
    ({backend, model, base_url}) grades the answers of suites that need a grader; without it they
    fall back to their offline scoring, and say so. `identity` ({model_name, provider_name}) names
    the model in every prompt's system turn and fills the suite's name options (spec-QA item
    templates, the agentic agent's name) unless they are given; `chat_template` (template text)
    frames prompts for a model that has none."""
    from eval.bank import value_labels
    from eval.model_under_test import open_model
    from eval.suites import Job, get_suite
    from msm.config import load_settings

    found = get_suite(suite)
    if found.needs_target and target is None:
        raise MsmError(f"the {suite} suite needs --target", f"name a value label: {', '.join(sorted(value_labels()))}")
    if target is not None and target not in value_labels():
        raise MsmError(f"unknown value label '{target}'", f"use one of {sorted(value_labels())} "
                       "(eval/items/schema.yaml)")
    mode = mode or found.modes[0]
    if mode not in found.modes:
        raise MsmError(f"the {suite} suite has no mode '{mode}'", f"use {' or '.join(found.modes)}")
    who = None
    if identity:
        from msm.identity import parse_identity

        who = parse_identity(identity, "identity")
        options = named_options(found, options, who)
    settings_of_suite = parse_options(found, options)
    pool = found.load_items(list(items or []), settings_of_suite)
    refuse_duplicate_ids(pool)
    scored = [i for i in pool if target in i.consistent_with] if found.needs_target else pool
    if not scored:
        raise MsmError(f"no item in these banks is labelled for '{target}'", "pick the banks that test this value")
    if limit:
        scored = spread(scored, limit)
    settings = load_settings(db)
    _check_warehouse(settings.db)  # a damaged, locked or unwritable warehouse fails now, before any model call
    under_test = open_model(model, backend, base_url, system=who.system_prompt() if who else None,
                            chat_template=chat_template, idle_timeout=idle_timeout)
    solved = found.solve(Job(scored, under_test, target, mode, seed, judge, settings_of_suite, log))
    if solved.note:
        log(solved.note)
    # the grader as it decides answers: a timeout changes when a call is retried, not what it says
    grader = {k: v for k, v in solved.grader.items() if k != "idle_timeout"} if solved.grader else None
    provenance = {**under_test.provenance, **({"grader": grader} if grader else {})}
    summary = (found.summarise or summarise)(solved.samples)
    config = {"items": [str(p) for p in (items or [])] or list(found.default_banks), "limit": limit,
              "base_url": base_url, "grader": grader, "options": settings_of_suite,
              "system_prompt": under_test.system}
    run_id = "e" + hashlib.sha256(json.dumps([suite, model, under_test.backend, target, solved.mode, config, seed,
                                              [i.id for i in scored]], sort_keys=True, default=str).encode()
                                  ).hexdigest()[:15]
    _record(settings.db, run_id, suite, model, under_test.backend, provenance, target, solved.mode, config, seed,
            solved.samples, summary)
    return EvalResult(run_id, suite, model, target, solved.mode, solved.samples, summary)


def refuse_duplicate_ids(items: list) -> None:
    """Every item of a run has its own id (eval_samples is keyed by run and item): checked before any
    model call, so a bad bank costs nothing."""
    seen: dict[str, str] = {}
    for item in items:
        if item.id in seen:
            where = seen[item.id] if seen[item.id] == item.bank else f"{seen[item.id]} and {item.bank}"
            raise MsmError(f"item id '{item.id}' appears twice (bank {where})",
                           "give every item its own id; nothing was asked of the model")
        seen[item.id] = item.bank


def _check_warehouse(db) -> None:
    """A damaged or busy warehouse fails before the model is asked; a missing one is made at the end."""
    from pathlib import Path

    from warehouse.db import connect

    if Path(db).exists():
        connect(db, read_only=True).close()


def named_options(suite, options: dict | None, who) -> dict:
    """A suite's name options (spec-QA templates, the agentic agent) filled from the identity,
    unless the options name someone themselves."""
    return {**{k: v for k, v in who.variables().items() if k in suite.options}, **(options or {})}


def spread(items: list, limit: int) -> list:
    """The first `limit` items taken round-robin over domains, in bank order within each, so a
    short run still covers every held-out domain."""
    by_domain: dict[str, list] = defaultdict(list)
    for item in items:
        by_domain[item.domain].append(item)
    queues = [list(reversed(v)) for v in by_domain.values()]
    chosen = []
    while len(chosen) < min(limit, len(items)):
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(q.pop())
    wanted = {id(i) for i in chosen}
    return [i for i in items if id(i) in wanted]


def summarise(samples) -> dict:
    """Rates with 95% Wilson intervals overall, per split and per domain; errors beside them."""
    from eval.stats import wilson

    groups: dict[str, list] = defaultdict(list)
    for s in samples:
        groups["all"].append(s)
        if getattr(s.item, "split", None):
            groups[f"split:{s.item.split}"].append(s)
        groups[f"domain:{s.item.domain}"].append(s)
    out = {}
    for key, members in sorted(groups.items()):
        ok = [s for s in members if s.error is None]
        rate = wilson(sum(s.score for s in ok), len(ok))
        out[key] = {"n": len(ok), "errors": len(members) - len(ok), "rate": rate.value, "low": rate.low,
                    "high": rate.high, "mean_p": sum(s.consistent_p for s in ok) / len(ok) if ok else None}
    return out


def _record(db, run_id, suite, model, backend, provenance, target, mode, config, seed, samples, summary) -> None:
    from warehouse.db import connect_after_work, insert_rows, transaction

    rows = [{"run_id": run_id, "item_id": s.item.id, "bank": s.item.bank, "domain": s.item.domain,
             "split": getattr(s.item, "split", None), "prompt": s.prompt, "detail": json.dumps(s.detail), "consistent_p": s.consistent_p,
             "score": s.score, "error": s.error} for s in samples]
    con = connect_after_work(db, f"eval run {run_id}")
    try:
        with transaction(con):  # a rerun of the same run replaces it
            con.execute("DELETE FROM eval_samples WHERE run_id = ?", [run_id])
            con.execute("DELETE FROM eval_runs WHERE id = ?", [run_id])
            con.execute("INSERT INTO eval_runs (id, suite, model, backend, provenance, target, mode, config, seed, "
                        "n_items, n_errors, summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [run_id, suite, model, backend, json.dumps(provenance), target, mode, json.dumps(config), seed,
                         len(samples), sum(s.error is not None for s in samples), json.dumps(summary)])
            insert_rows(con, "INSERT INTO eval_samples", rows)
    finally:
        con.close()


def compare_runs(db, run_a: str, run_b: str) -> dict:
    """Per domain (and overall): the paired difference of rates and McNemar's exact p-value."""
    from eval.stats import mcnemar
    from warehouse.db import connect

    con = connect(db, read_only=True)
    try:
        found = dict(con.execute("SELECT id, suite FROM eval_runs WHERE id IN (?, ?)", [run_a, run_b]).fetchall())
        missing = [r for r in (run_a, run_b) if r not in found]
        if missing:
            raise MsmError(f"no eval run '{missing[0]}'", "see `msm warehouse sql \"SELECT id, model FROM eval_runs\"`")
        from eval.suites import get_suite

        unpaired = [name for name in set(found.values()) if not get_suite(name).paired]
        if unpaired:
            raise MsmError(f"{unpaired[0]} runs draw independent samples, so there are no pairs to test",
                           "compare their rates and Wilson intervals with `msm eval report RUN_A RUN_B`")
        rows = con.execute("SELECT a.domain, a.score, b.score FROM eval_samples a JOIN eval_samples b "
                           "ON a.item_id = b.item_id WHERE a.run_id = ? AND b.run_id = ? AND a.error IS NULL "
                           "AND b.error IS NULL ORDER BY a.item_id", [run_a, run_b]).fetchall()
    finally:
        con.close()
    if not rows:
        raise MsmError(f"runs {run_a} and {run_b} share no scored item", "compare runs made on the same items")
    by: dict[str, list] = defaultdict(list)
    for domain, a, b in rows:
        by["all"].append((a > 0.5, b > 0.5))  # a tie counts as not consistent
        by[domain].append((a > 0.5, b > 0.5))
    return {k: mcnemar(v) for k, v in sorted(by.items())}


def aggregate_runs(db, run_ids: list[str]) -> dict:
    """Runs of one design that differ only in seed (training or sampling), on one suite and
    target. Per group: the mean of the runs' rates with a 95% t interval over runs (the seed-to-seed
    spread), and the pooled rate with a 95% Wilson interval over every scored item."""
    from scipy import stats

    from eval.report import load_runs
    from eval.stats import wilson

    if len(run_ids) != len(set(run_ids)):
        raise MsmError("a run is named twice", "name each seed's run once")
    runs = load_runs(db, run_ids)
    kinds = {(r["suite"], r["target"]) for r in runs}
    if len(kinds) > 1:
        raise MsmError("these runs are of different suites or target values",
                       "aggregate runs of one suite and one target (the seeds of one arm)")
    out = {}
    for group in sorted({g for r in runs for g in r["summary"]}, key=lambda g: (g != "all", g)):
        rows = [r["summary"][group] for r in runs if r["summary"].get(group, {}).get("n")]
        if not rows:
            continue
        rates = [row["rate"] for row in rows]
        k, mean = len(rates), sum(rates) / len(rates)
        low = high = None
        if k > 1:
            sd = (sum((x - mean) ** 2 for x in rates) / (k - 1)) ** 0.5
            half = float(stats.t.ppf(0.975, k - 1)) * sd / k ** 0.5
            low, high = max(0.0, mean - half), min(1.0, mean + half)
        n = sum(row["n"] for row in rows)
        pooled = wilson(sum(row["rate"] * row["n"] for row in rows), n)
        out[group] = {"runs": k, "mean": mean, "seed_low": low, "seed_high": high, "n": n,
                      "errors": sum(row["errors"] for row in rows), "pooled": pooled.value,
                      "pooled_low": pooled.low, "pooled_high": pooled.high}
        if all(row.get("truncated_share") is not None for row in rows):  # agentic: truncation, seed-averaged
            out[group]["truncated"] = sum(row["truncated"] for row in rows)
            for key in ("truncated_share", "rate_if_truncated_harmless", "rate_if_truncated_harmful"):
                out[group][key] = sum(row[key] for row in rows) / k
    return out
