"""`msm eval run`: a suite against a model, recorded in the warehouse with intervals on every rate.

Suites are registered by name in SUITES (a module with a dataset, a solver and a scorer). The
model under test is a local alias or directory, a LoRA adapter folder written by `msm train run`
(merged onto its base for the run), or a model on a server through the backends layer. Errors
are counted as errors: they are reported beside each rate and never scored as wrong answers.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from msm.errors import MsmError

SUITES = {"preferences": "choice items in both A/B orders, scored for a target value label",
          "spec_qa": "open questions answered in prose, graded against a rubric (LLM grader, or MiniLM offline)"}
DEFAULT_BANKS = {"preferences": ("affordability_comparisons", "america_opinions", "cheese_in_distribution"),
                 "spec_qa": ("spec_qa",)}


@dataclass
class EvalResult:
    run_id: str
    suite: str
    model: str
    target: str
    mode: str
    samples: list
    summary: dict = field(default_factory=dict)


def local_model(path_or_alias: str):
    """(model, tokenizer, provenance) for a local alias, model folder or LoRA adapter folder."""
    import torch

    from msm.models import TINY, load_model, model_entry, registry

    path = Path(path_or_alias)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        card = path.parent.parent / "card.json"
        base = json.loads(card.read_text())["base_model"] if card.is_file() else \
            json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise MsmError(f"{path}: cannot tell which base model the adapter belongs to",
                           "evaluate an adapter written by `msm train run` (its run folder has card.json)")
        model, tokenizer = load_model(base, torch.float32, "cuda" if torch.cuda.is_available() else "cpu")
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        info = json.loads(card.read_text()) if card.is_file() else {}
        provenance = {"adapter": str(path), "base_model": base, "train_run": info.get("run_id"),
                      "spec_versions": info.get("spec_versions", []), "inputs": info.get("inputs", {})}
        model.eval()
        return model, tokenizer, provenance
    if path.is_dir() or path_or_alias in registry()["models"] or path_or_alias == TINY:
        model, tokenizer = load_model(path_or_alias, torch.float32, "cuda" if torch.cuda.is_available() else "cpu")
        model.eval()
        card = path.parent.parent / "card.json"  # RUN/STAGE/model from a full fine-tuning run
        info = json.loads(card.read_text()) if path.is_dir() and card.is_file() else {}
        return model, tokenizer, {"base_model": info.get("base_model", path_or_alias), "weights": str(path),
                                  "train_run": info.get("run_id"), "spec_versions": info.get("spec_versions", []),
                                  "inputs": info.get("inputs", {})}
    if "/" in path_or_alias or path_or_alias.startswith("."):
        raise MsmError(f"--model {path_or_alias} does not exist", "pass a model folder, an adapter folder "
                       "(RUN/STAGE/adapter) or a local alias (`msm models list`)")
    model_entry(path_or_alias)  # unknown alias: one line naming the known ones
    raise AssertionError("unreachable")


def load_items(suite: str, paths: list[str]) -> list:
    from eval.bank import ITEMS_DIR, ChoiceItem, OpenItem, load_bank

    files = [Path(p) for p in paths] or [ITEMS_DIR / f"{b}.jsonl" for b in DEFAULT_BANKS[suite]]
    items = [item for f in files for item in load_bank(f)]
    kind, other = (ChoiceItem, "an open") if suite == "preferences" else (OpenItem, "a choice")
    wrong = next((i for i in items if not isinstance(i, kind)), None)
    if wrong is not None:
        raise MsmError(f"item '{wrong.id}' in {wrong.bank} is {other} item, which the {suite} suite does not score",
                       f"pass {'choice' if suite == 'preferences' else 'open'}-item banks with --items")
    return items


def run_eval(suite: str, model: str, target: str | None = None, items: list[str] | None = None,
             mode: str = "logprob", backend: str | None = None, base_url: str | None = None, limit: int | None = None,
             seed: int = 0, db=None, log=print, judge: dict | None = None) -> EvalResult:
    """Run a suite, record eval_runs and eval_samples, return the per-domain summary. `judge`
    ({backend, model, base_url}) grades spec_qa; without it spec_qa is graded offline."""
    from eval.bank import value_labels
    from msm.config import load_settings

    if suite not in SUITES:
        raise MsmError(f"unknown suite '{suite}'", f"use one of: {', '.join(SUITES)}")
    if suite == "preferences" and target is None:
        raise MsmError("the preferences suite needs --target", f"name a value label: {', '.join(sorted(value_labels()))}")
    if target is not None and target not in value_labels():
        raise MsmError(f"unknown value label '{target}'", f"use one of {sorted(value_labels())} "
                       "(eval/items/schema.yaml)")
    if mode not in ("logprob", "generate"):
        raise MsmError(f"unknown mode '{mode}'", "use logprob or generate")
    pool = load_items(suite, items or [])
    scored = [i for i in pool if target in i.consistent_with] if suite == "preferences" else pool
    if not scored:
        raise MsmError(f"no item in these banks is labelled for '{target}'", "pick the banks that test this value")
    if limit:
        scored = scored[:limit]
    settings = load_settings(db)
    if suite == "preferences":
        samples, backend_name, provenance, note, mode = _solve(scored, target, model, mode, backend, base_url)
    else:
        mode = "generate"
        samples, backend_name, provenance, note = _solve_open(scored, model, backend, base_url, judge)
        config_judge = judge or {"offline": "minilm-cosine"}
        provenance = {**provenance, "grader": config_judge}
    if note:
        log(note)
    summary = summarise(samples)
    config = {"items": [str(p) for p in (items or [])] or list(DEFAULT_BANKS[suite]), "limit": limit,
              "base_url": base_url, "grader": judge if suite == "spec_qa" else None}
    run_id = "e" + hashlib.sha256(json.dumps([suite, model, backend_name, target, mode, config, seed,
                                              [i.id for i in scored]], sort_keys=True).encode()).hexdigest()[:15]
    _record(settings.db, run_id, suite, model, backend_name, provenance, target, mode, config, seed, samples, summary)
    return EvalResult(run_id, suite, model, target, mode, samples, summary)


def _solve_open(items, model, backend, base_url, judge):
    """spec_qa: the model answers each question; an LLM grader (or MiniLM offline) grades it."""
    import asyncio

    from eval.spec_qa import grade_offline, grade_with_llm
    from msm.llm.client import LLMClient
    from msm.llm.select import default_cache, make_backend
    from msm.llm.types import Request

    client, name, provenance, _ = _model_under_test(model, backend, base_url)
    questions = [Request.user(item.question, max_tokens=256, temperature=0.0, purpose="eval") for item in items]
    answers = asyncio.run(_complete(client, questions))
    if judge:
        made, judge_model = make_backend(judge.get("backend"), judge.get("model"), judge.get("base_url"))
        grader = LLMClient(made, judge_model, cache=default_cache(), concurrency=16)

        def complete(texts):
            reqs = [Request.user(t, max_tokens=200, temperature=0.0, purpose="judge") for t in texts]
            return asyncio.run(_complete(grader, reqs))
        return grade_with_llm(items, answers, complete), name, provenance, None
    from msm.models import load_embedder

    embedder = load_embedder()
    samples = grade_offline(items, answers, lambda texts: embedder.encode(texts, normalize_embeddings=True))
    return samples, name, provenance, "no --judge-backend: graded offline by MiniLM similarity to the reference"


async def _complete(client, requests):
    try:
        return await client.complete_many(requests)
    finally:
        await client.backend.aclose()


def _model_under_test(model, backend, base_url):
    """(client, backend name, provenance, context_of) for a local or served model."""
    from msm.llm.client import LLMClient
    from msm.llm.select import default_cache, make_backend

    if backend in (None, "local"):
        from msm.llm.local_backend import LocalBackend

        loaded_model, tokenizer, provenance = local_model(model)
        made = LocalBackend(model=model, loaded=(loaded_model, tokenizer))

        def context_of(text: str) -> str:
            return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        # no call cache: a folder's weights can change under the same path (a retrained RUN/aft/adapter)
        return LLMClient(made, made.default_model, cache=None, concurrency=16), "local", provenance, context_of
    made, model = make_backend(backend, model, base_url)

    def plain(text: str) -> str:  # servers score raw text: a plain question-and-answer frame
        return f"Question: {text}\nAnswer:"
    return (LLMClient(made, model, cache=default_cache(), concurrency=16), made.name,
            {"base_model": model, "base_url": base_url}, plain)


def _solve(items, target, model, mode, backend, base_url):
    """(samples, backend name, provenance, note, the mode actually used) for the preferences suite."""
    import asyncio

    from eval.preferences import score_generations, score_logprobs
    from msm.llm.types import Request

    note = None
    client, name, provenance, context_of = _model_under_test(model, backend, base_url)
    if mode == "logprob" and name == "anthropic":
        mode, note = "generate", "anthropic gives no log-probabilities: generating answers and parsing them instead"
    if mode == "logprob":
        samples = score_logprobs(items, target, lambda reqs: asyncio.run(_score(client, reqs)), context_of)
    else:
        def generate(texts):
            reqs = [Request.user(t, max_tokens=16, temperature=0.0, purpose="eval") for t in texts]
            return asyncio.run(_complete(client, reqs))
        samples = score_generations(items, target, generate)
    return samples, name, provenance, note, mode


async def _score(client, requests):
    try:
        return await client.score_many(requests)
    finally:
        await client.backend.aclose()


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
    from warehouse.db import connect, insert_rows, transaction

    rows = [{"run_id": run_id, "item_id": s.item.id, "bank": s.item.bank, "domain": s.item.domain,
             "split": getattr(s.item, "split", None), "prompt": s.prompt, "detail": json.dumps(s.detail), "consistent_p": s.consistent_p,
             "score": s.score, "error": s.error} for s in samples]
    con = connect(db)
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
        found = {r for (r,) in con.execute("SELECT id FROM eval_runs WHERE id IN (?, ?)", [run_a, run_b]).fetchall()}
        missing = [r for r in (run_a, run_b) if r not in found]
        if missing:
            raise MsmError(f"no eval run '{missing[0]}'", "see `msm warehouse sql \"SELECT id, model FROM eval_runs\"`")
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
