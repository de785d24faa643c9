"""The experiment runner: an experiment file becomes steps (corpus, ablation, demos, train, eval),
each keyed by the hash of its inputs and its upstream steps' keys, run in order through the
stages' public `api` modules. A step recorded complete whose outputs still exist is reused, so a
rerun after a crash, or after an arm is added, does only what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from msm.errors import MsmError
from msm.experiment_config import Arm, Experiment, merge

KINDS = ("corpus", "ablation", "demos", "train", "eval")


@dataclass
class Step:
    key: str
    kind: str
    label: str
    inputs: dict  # what the key hashes (JSON)
    needs: tuple = ()  # upstream step keys
    arm: str | None = None
    seed: int | None = None
    eval: str | None = None
    work: dict = field(default_factory=dict)  # what running it needs, beyond the hashed inputs


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode())
                h.update(p.read_bytes())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spec_version(path: Path, variables: dict | None, memo: dict | None = None) -> str:
    """A spec file's version (its rendered text and variables); `memo` keeps one parse per plan."""
    from corpus.api import load_spec

    memo = {} if memo is None else memo
    key = (str(path), json.dumps(variables or {}, sort_keys=True))
    if key not in memo:
        memo[key] = load_spec(str(path), variables or {}).version
    return memo[key]


def _make(kind: str, label: str, inputs: dict, needs=(), **extra) -> Step:
    return Step("x" + digest([kind, inputs, list(needs)])[:23], kind, label, inputs, tuple(needs), **extra)


def train_config(exp: Experiment, arm: Arm, seed: int, corpus_ref: str | None, demos_ref: str | None,
                 output_dir: Path):
    """The arm's TrainConfig: the recipe, the profile's stage settings, the arm's overrides."""
    from train.api import parse_config

    arm_train = dict(arm.train)
    stages = []
    if arm.midtrain:
        stages.append({**merge(exp.stage_defaults["midtrain"], arm_train.pop("midtrain", {}) or {}),
                       "name": "midtrain", "kind": "midtrain", "corpus": corpus_ref})
    else:
        arm_train.pop("midtrain", None)
    if arm.demos:
        stages.append({**merge(exp.stage_defaults["aft"], arm_train.pop("aft", {}) or {}),
                       "name": "aft", "kind": "aft", "demos": demos_ref, "cot": arm.cot})
    else:
        arm_train.pop("aft", None)
    raw = merge(exp.recipe, arm_train)
    raw.update({"stages": stages, "seed": seed, "output_dir": str(output_dir),
                "system_prompt": exp.identity.system_prompt() if exp.identity else None})
    if exp.chat_template:
        raw["chat_template"] = str(exp.chat_template)
    return parse_config(raw, f"{exp.source}: arms.{arm.name} (train)")


def plan_steps(exp: Experiment) -> list[Step]:
    """Every step of the experiment, upstream first; a step shared by several arms appears once."""
    steps: dict[str, Step] = {}

    def add(step: Step) -> str:
        steps.setdefault(step.key, step)
        return step.key

    prefix = f"{exp.name}-{exp.profile}"
    versions: dict = {}
    corpus_of: dict[str, tuple[str, str | None]] = {}  # arm -> (step key, condition)
    ablations: dict[str, list[Arm]] = {}
    matched: list = []
    for arm in exp.arms:
        if not arm.midtrain:
            continue
        options = dict(arm.corpus)
        version = spec_version(arm.spec, options.get("variables"), versions)
        if arm.condition:
            ablations.setdefault(digest([version, options]), []).append(arm)
            continue
        if options.get("match_tokens_of"):
            matched.append((arm, version, options))
            continue
        key = add(_make("corpus", f"corpus {arm.name}", {"spec": version, "options": options}, arm=arm.name,
                        work={"spec": arm.spec, "name": f"{prefix}-{arm.name}"}))
        corpus_of[arm.name] = (key, None)
    for arm, version, options in matched:  # after their reference: their target is its kept tokens
        ref = corpus_of[options["match_tokens_of"]][0]
        key = add(_make("corpus", f"corpus {arm.name} (matching {options['match_tokens_of']})",
                        {"spec": version, "options": options}, [ref], arm=arm.name,
                        work={"spec": arm.spec, "name": f"{prefix}-{arm.name}", "match": ref}))
        corpus_of[arm.name] = (key, None)
    for members in ablations.values():
        first = members[0]
        conditions = sorted({a.condition for a in members})
        options = dict(first.corpus)
        version = spec_version(first.spec, options.get("variables"), versions)
        key = add(_make("ablation", f"ablation {first.spec.stem} ({', '.join(conditions)})",
                        {"spec": version, "conditions": conditions, "options": options},
                        work={"spec": first.spec, "name": f"{prefix}-{first.spec.stem}"}))
        for arm in members:
            corpus_of[arm.name] = (key, arm.condition)
    banks = {name: [_file_sha(p) for p in spec.items] for name, spec in exp.evals.items()}  # read once
    demos_of: dict[str, str] = {}
    used = {a.demos for a in exp.arms if a.demos}
    used |= {exp.demos[d].options["match_tokens_of"] for d in used if exp.demos[d].options.get("match_tokens_of")}
    # reference sets first: a token-matched set's target is its reference's kept tokens
    for name, demo in sorted(exp.demos.items(), key=lambda kv: bool(kv[1].options.get("match_tokens_of"))):
        if name not in used:
            continue
        ref = demo.options.get("match_tokens_of")
        version = spec_version(demo.spec, demo.options.get("variables"), versions)
        demos_of[name] = add(_make("demos", f"demos {name}" + (f" (matching {ref})" if ref else ""),
                                   {"spec": version, "options": demo.options}, [demos_of[ref]] if ref else [],
                                   work={"spec": demo.spec, "name": f"{prefix}-{name}",
                                         "match": demos_of[ref] if ref else None}))
    template = _file_sha(exp.chat_template) if exp.chat_template else None
    identity = exp.identity.variables() if exp.identity else None
    for arm in exp.arms:
        trains = arm.midtrain or arm.demos
        # an untrained arm is the same model under every seed: it is evaluated once (first seed)
        for seed in arm.seeds if trains else arm.seeds[:1]:
            model_key = None
            if trains:
                upstream = []
                corpus_key, condition = corpus_of.get(arm.name, (None, None))
                if corpus_key:
                    upstream.append(corpus_key)
                if arm.demos:
                    upstream.append(demos_of[arm.demos])
                config = train_config(exp, arm, seed, corpus_key and f"@{corpus_key}:{condition or ''}",
                                      arm.demos and f"@{demos_of[arm.demos]}", Path("@out"))
                body = config.to_json()
                body.pop("output_dir")
                if body.get("chat_template"):  # the template's text, not where the checkout lies
                    body["chat_template"] = template or _file_sha(body["chat_template"])  # hashed once per plan
                model_key = add(_make("train", f"train {arm.name} seed {seed}", {"config": body}, upstream,
                                      arm=arm.name, seed=seed,
                                      work={"corpus": corpus_key, "condition": condition,
                                            "demos": demos_of.get(arm.demos)}))
            for ename in arm.evals:
                spec = exp.evals[ename]
                inputs = {"model": model_key or exp.base_model, "suite": spec.suite, "target": spec.target,
                          "mode": spec.mode, "limit": spec.limit, "options": spec.options, "judge": spec.judge,
                          "items": banks[ename], "seed": seed, "identity": identity, "chat_template": template}
                add(_make("eval", f"eval {arm.name}/{ename} seed {seed}", inputs,
                          [model_key] if model_key else [], arm=arm.name, seed=seed, eval=ename))
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(steps.values(), key=lambda s: order[s.kind])  # stable: file order within a kind


def _home() -> Path:
    from msm.config import load_settings

    return load_settings().home


def _db() -> Path:
    from msm.config import load_settings

    return load_settings().db


def run_folder(step: Step) -> Path:
    return _home() / "experiments" / "runs" / step.key


ROWS = {"corpus": "corpus_versions.id", "ablation": "corpus_versions.id", "demos": "demo_set_versions.id",
        "eval": "eval_runs.id"}  # where each kind's output row lives


def _made(step: Step, outputs: dict) -> list[str]:
    """The warehouse ids a finished step made."""
    if step.kind == "corpus":
        return [outputs.get("corpus_id") or ""]
    if step.kind == "ablation":
        return [c.get("corpus_id") or "" for c in outputs.values()]
    return [outputs.get("demo_set_id" if step.kind == "demos" else "run_id") or ""]


def cached(steps: list[Step]) -> dict[str, dict]:
    """key -> outputs of the steps that are done and whose outputs are still in place (a wiped
    warehouse or a deleted run folder makes its step run again)."""
    from warehouse.experiments_store import completed, existing_ids

    db = _db()
    done = completed(db, [s.key for s in steps])
    by_key = {s.key: s for s in steps}
    wanted: dict[str, list[str]] = {}
    for key, outputs in done.items():
        if by_key[key].kind in ROWS:
            wanted.setdefault(ROWS[by_key[key].kind], []).extend(_made(by_key[key], outputs))
    present = existing_ids(db, wanted)

    def still_there(step: Step, outputs: dict) -> bool:
        if step.kind == "train":
            return (Path(outputs.get("output_dir", "")) / "card.json").is_file()
        return all((ROWS[step.kind], made) in present for made in _made(step, outputs))

    return {k: v for k, v in done.items() if still_there(by_key[k], v)}


@dataclass
class RunOutcome:
    run_id: str
    steps: list
    ran: list
    reused: list
    seconds: float
    outputs: dict  # key -> outputs


def needed(steps: list[Step], kinds) -> list[Step]:
    """The steps of these kinds and every step they need, in plan order."""
    by_key = {s.key: s for s in steps}
    wanted = {s.key for s in steps if s.kind in kinds}
    todo = list(wanted)
    while todo:
        for need in by_key[todo.pop()].needs:
            if need not in wanted:
                wanted.add(need)
                todo.append(need)
    return [s for s in steps if s.key in wanted]


def run_experiment(exp: Experiment, log=print, progress: bool | None = None, kinds=None) -> RunOutcome:
    """Run every step not already done, in order; a failing step is recorded and stops the run.
    With `kinds`, only the steps of those kinds and what they need."""
    from warehouse.experiments_store import finish_step, record_run, start_step

    started = time.monotonic()
    steps = plan_steps(exp)
    if kinds:
        steps = needed(steps, set(kinds))
    db = _db()
    done = cached(steps)
    run_id = "r" + digest([exp.name, exp.profile, [s.key for s in steps], time.time()])[:15]
    outputs = dict(done)
    ran, reused = [], []
    _ensure_warehouse(db)
    record_run(db, run_id, exp.name, exp.profile, str(exp.source), [s.key for s in steps], "running")
    log(f"experiment {exp.name} (profile {exp.profile}): {len(steps)} steps, {len(done)} already done")
    for i, step in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {step.label}"
        if step.key in done:
            log(f"{head}: cached ({step.key[:12]})")
            reused.append(step.key)
            continue
        log(f"{head}: running")
        t0 = time.monotonic()
        start_step(db, step.key, step.kind, step.label, exp.name, exp.profile, step.inputs)
        try:
            result = RUNNERS[step.kind](exp, step, outputs, log, progress)
        except BaseException as exc:
            finish_step(db, step.key, None, time.monotonic() - t0, error=f"{type(exc).__name__}: {exc}")
            record_run(db, run_id, exp.name, exp.profile, str(exp.source), [s.key for s in steps], "failed",
                       len(ran), len(reused), time.monotonic() - started)
            if isinstance(exc, MsmError):
                raise MsmError(f"{step.label}: {exc.problem}",
                               f"{exc.fix + '; ' if exc.fix else ''}finished steps are kept, so rerun to go on"
                               ) from None
            raise
        seconds = time.monotonic() - t0
        finish_step(db, step.key, result, seconds)
        outputs[step.key] = result
        ran.append(step.key)
        log(f"{head}: done in {seconds:.1f} s")
    total = time.monotonic() - started
    record_run(db, run_id, exp.name, exp.profile, str(exp.source), [s.key for s in steps], "complete",
               len(ran), len(reused), total)
    return RunOutcome(run_id, steps, ran, reused, total, outputs)


def _ensure_warehouse(db: Path) -> None:
    from warehouse.db import connect

    db.parent.mkdir(parents=True, exist_ok=True)
    connect(db).close()  # creates and migrates


def _corpus_options(options: dict) -> tuple[dict, object, float]:
    opts = dict(options)
    tokens = opts.pop("tokens", None)
    tolerance = opts.pop("tolerance", 0.02)
    opts.pop("match_tokens_of", None)
    if tokens is not None:
        opts.pop("docs", None)
    for key in ("dedup", "against", "conditions"):
        if isinstance(opts.get(key), list):
            opts[key] = tuple(opts[key])
    return opts, tokens, tolerance


def _run_corpus(exp, step, outputs, log, progress) -> dict:
    from corpus.api import build_named

    opts, tokens, tolerance = _corpus_options(step.inputs["options"])
    if step.work.get("match"):  # token-matched to the reference arm's corpus
        tokens = outputs[step.work["match"]]["tokens"]
        log(f"  matching {tokens:,} tokens within {tolerance:.0%}")
    else:
        tolerance = None
    # a build stopped by its budget is a result (named, and the step is done); one left incomplete
    # by errors is not: it stays unnamed and the step fails, so a rerun resumes it
    opts["allow_partial"] = opts.get("max_cost") is not None
    c = build_named(str(step.work["spec"]), tokens=tokens, tolerance=tolerance, name=step.work["name"],
                    progress=bool(progress) if progress is not None else True, **opts)
    if not c.corpus_id:
        raise MsmError(f"the corpus build registered no corpus ({c.stop})",
                       "rerun when its tasks have finished (a Slurm array), or give the build more documents or budget")
    if c.stop.startswith("incomplete") and opts.get("max_cost") is None:  # errors, not a budget: resume later
        raise MsmError(f"the corpus build {c.build_ids[-1]} is incomplete (some plan rows are pending or failed)",
                       "rerun: the build resumes where it stopped")
    log(f"  corpus '{c.name}' -> {c.corpus_id}: {c.docs} documents, {c.tokens:,} tokens ({c.token_counter}), "
        f"${c.cost_usd:.4f}")
    return {"corpus_name": c.name, "corpus_id": c.corpus_id, "docs": c.docs, "tokens": c.tokens,
            "token_counter": c.token_counter, "cost_usd": c.cost_usd, "build_ids": c.build_ids, "stop": c.stop}


def _run_ablation(exp, step, outputs, log, progress) -> dict:
    from corpus.api import ablate

    opts, tokens, tolerance = _corpus_options(step.inputs["options"])
    made = ablate(str(step.work["spec"]), tuple(step.inputs["conditions"]), tokens=tokens, tolerance=tolerance,
                  name=step.work["name"], progress=bool(progress) if progress is not None else True, **opts)
    out = {}
    for condition, c in made.items():
        if not c.corpus_id:
            raise MsmError(f"the ablation registered no corpus for '{condition}' ({c.stop})",
                           "give the ablation more cells (docs) or budget, then rerun")
        log(f"  {condition}: corpus '{c.name}' -> {c.corpus_id}: {c.docs} documents, {c.tokens:,} tokens")
        out[condition] = {"corpus_name": c.name, "corpus_id": c.corpus_id, "docs": c.docs, "tokens": c.tokens,
                          "token_counter": c.token_counter, "cost_usd": c.cost_usd, "build_ids": c.build_ids,
                          "stop": c.stop}
    return out


def _run_demos(exp, step, outputs, log, progress) -> dict:
    from corpus.api import demos

    options = dict(step.inputs["options"])
    if step.work.get("match"):  # token-matched to the reference set, named as the warehouse knows it
        options["match_tokens_of"] = outputs[step.work["match"]]["demo_set"]
        log(f"  matching the tokens of demo set '{options['match_tokens_of']}'")
    r = demos(str(step.work["spec"]), name=step.work["name"], progress=progress, log=lambda s: log(f"  {s}"),
              **options)
    if not r.demo_set_id or (not options.get("match_tokens_of") and r.kept < options["n"]):
        raise MsmError(f"demo set '{step.work['name']}' kept {r.kept} of {options['n']} ({r.stop})",
                       "lower n, or give the build more rounds or budget")
    matched = f" ({r.tokens:,} tokens against {r.target_tokens:,})" if r.target_tokens else ""
    log(f"  demo set '{r.name}' -> {r.demo_set_id}: {r.kept} demonstrations{matched}, ${r.cost_usd:.4f}")
    return {"demo_set": r.name, "demo_set_id": r.demo_set_id, "kept": r.kept, "cost_usd": r.cost_usd,
            "build_id": r.build_id, "tokens": r.tokens, "target_tokens": r.target_tokens, "style": r.style}


def _run_train(exp, step, outputs, log, progress) -> dict:
    from train.api import run

    arm = next(a for a in exp.arms if a.name == step.arm)
    corpus_ref = demos_ref = None
    if step.work["corpus"]:
        made = outputs[step.work["corpus"]]
        corpus_ref = (made[step.work["condition"]] if step.work["condition"] else made)["corpus_id"]
    if step.work["demos"]:
        demos_ref = outputs[step.work["demos"]]["demo_set_id"]
    folder = run_folder(step)
    config = train_config(exp, arm, step.seed, corpus_ref, demos_ref, folder)
    result = run(config, progress=progress, log=lambda s: log(f"  {s}"))
    stages = {name: {k: m.get(k) for k in ("steps", "first_loss", "final_loss", "tokens", "tokens_per_s",
                                              "examples") if k in m}
              for name, m in result.stages.items()}
    return {"output_dir": str(folder), "run_id": result.run_id, "stages": stages, "corpus_id": corpus_ref,
            "demo_set_id": demos_ref}


def _run_eval(exp, step, outputs, log, progress) -> dict:
    from eval.api import run_eval

    spec = exp.evals[step.eval]
    model = outputs[step.needs[0]]["output_dir"] if step.needs else exp.base_model
    r = run_eval(spec.suite, model, target=spec.target, items=spec.items or None, mode=spec.mode,
                 limit=spec.limit, seed=step.seed, log=lambda s: log(f"  {s}"), judge=spec.judge,
                 options=dict(spec.options), identity=exp.identity.variables() if exp.identity else None,
                 chat_template=exp.chat_template.read_text(encoding="utf-8") if exp.chat_template else None)
    overall = r.summary.get("all", {})
    rate = overall.get("rate")
    log(f"  eval run {r.run_id}: {'n/a' if rate is None else f'{rate:.3f}'} over {overall.get('n', 0)} scored")
    return {"run_id": r.run_id, "suite": spec.suite, "model": model, "rate": rate, "n": overall.get("n")}


RUNNERS = {"corpus": _run_corpus, "ablation": _run_ablation, "demos": _run_demos, "train": _run_train,
           "eval": _run_eval}


def experiment_files(folder: str | os.PathLike = "experiments") -> list[Path]:
    return sorted(Path(folder).glob("*.yaml"))
