"""Experiment files (`experiments/*.yaml`): arms, shared demo sets, eval suites and profiles.

A file is a base config plus `profiles`; the chosen profile is deep-merged over the base (a
mapping merges key by key, anything else replaces), then the result is validated strictly, so a
typo is a one-line error naming the key and the close match. Relative paths (specs, item banks,
train recipes) are read from the project root: the folder holding `experiments/`.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path


from msm.errors import MsmError


class ExperimentError(MsmError):
    """An experiment file that cannot be run as written."""


@dataclass
class DemoSet:
    name: str
    spec: Path
    options: dict  # corpus.demos.DemoOptions fields


@dataclass
class EvalSpec:
    name: str
    suite: str
    items: list  # bank paths; [] means the suite's defaults
    target: str | None = None
    mode: str | None = None
    limit: int | None = None
    options: dict = field(default_factory=dict)
    judge: dict | None = None  # {backend, model, base_url} for suites that grade answers


@dataclass
class Arm:
    name: str
    label: str
    spec: Path | None  # the spec midtrained on; None: no MSM
    condition: str | None  # an ablation condition: the arm's corpus is that condition's matched corpus
    corpus: dict  # BuildOptions fields (and `tokens`) for this arm's corpus
    midtrain: bool
    demos: str | None  # a demo set name from `demos:`; None: no AFT
    cot: bool
    train: dict  # overrides merged into the recipe for this arm
    seeds: list
    evals: list  # names from `evals:`
    series: str | None = None  # arms of one series with different AFT sizes make a scaling curve


@dataclass
class Experiment:
    name: str
    about: str
    profile: str
    profiles: list
    root: Path
    source: Path
    base_model: str
    recipe: dict  # a train config mapping (train.api.parse_config input) minus stages
    stage_defaults: dict  # {"midtrain": {...}, "aft": {...}}: Stage fields
    demos: dict  # name -> DemoSet
    evals: dict  # name -> EvalSpec
    arms: list
    device: str  # the throughput model's device for --plan (msm/throughput.yaml)
    raw: dict  # the merged mapping, for provenance
    identity: object = None  # msm.identity.Identity: the trained model's name and developer
    chat_template: Path | None = None  # a Jinja file for models without one (a base model's AFT and evals)


TOP = {"name", "about", "base_model", "seeds", "corpus", "demos", "train", "evals", "arms", "profiles", "device",
       "identity", "chat_template"}
ARM = {"label", "spec", "condition", "corpus", "midtrain", "demos", "cot", "train", "seeds", "evals", "series"}
EVAL = {"suite", "items", "target", "mode", "limit", "options", "judge"}
TRAIN = {"recipe", "midtrain", "aft", "adapter", "precision", "gradient_checkpointing", "parallel",
         "checkpoint_every", "keep_checkpoints"}


def _unknown(where: str, raw: dict, known: set) -> None:
    extra = sorted(k for k in raw if k not in known)
    if extra:
        near = difflib.get_close_matches(str(extra[0]), sorted(known), n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"known keys: {', '.join(sorted(known))}"
        raise ExperimentError(f"{where}: unknown key '{extra[0]}'", hint)


def _mapping(where: str, value, default=None) -> dict:
    if value is None:
        return {} if default is None else default
    if not isinstance(value, dict):
        raise ExperimentError(f"{where} must be a mapping, got {type(value).__name__}", "write it as key: value lines")
    return value


def merge(base, over):
    """`over` deep-merged onto `base`: mappings merge key by key; anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def project_root(path: Path) -> Path:
    path = path.resolve()
    return path.parent.parent if path.parent.name == "experiments" else path.parent


def _path(root: Path, where: str, value, kind: str = "file") -> Path:
    if not isinstance(value, str) or not value:
        raise ExperimentError(f"{where} must be a path, got {value!r}", f"name a {kind}")
    p = Path(value)
    p = p if p.is_absolute() else root / p
    if not p.exists():
        raise ExperimentError(f"{where}: {value} does not exist (read from {root})", f"fix the path to the {kind}")
    return p


def _seeds(where: str, value) -> list:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value):
        raise ExperimentError(f"{where}: 'seeds' must be a non-empty list of integers, got {value!r}",
                              "write seeds: [0] or seeds: [0, 1, 2]")
    if len(set(value)) != len(value):
        raise ExperimentError(f"{where}: a seed is listed twice in {value}", "list each seed once")
    return value


def load_experiment(path: str | Path, profile: str | None = None) -> Experiment:
    """The file at `path` under `profile` (default: the first profile listed), validated."""
    merged, profile, profiles = merged_profile(path, profile)
    return parse_experiment(merged, Path(path), profile, profiles)


def merged_profile(path: str | Path, profile: str | None = None) -> tuple[dict, str, list]:
    """(the file's mapping with `profile` merged over it, the profile's name, every profile's name)."""
    from msm.config import read_yaml

    path = Path(path)
    raw = read_yaml(path, "experiment file", "experiments/", ExperimentError)
    raw = _mapping(str(path), raw)
    _unknown(str(path), raw, TOP)
    profiles = _mapping(f"{path}: profiles", raw.get("profiles"))
    if profile is None and profiles:
        profile = next(iter(profiles))
    if profile is not None and profile not in profiles:
        raise ExperimentError(f"{path}: no profile '{profile}'",
                              f"use one of: {', '.join(profiles) or '(none: drop --profile)'}")
    merged = merge({k: v for k, v in raw.items() if k != "profiles"},
                   _mapping(f"{path}: profiles.{profile}", profiles.get(profile)) if profile else {})
    _unknown(f"{path}: profiles.{profile}", merged, TOP - {"profiles"})
    return merged, profile or "default", list(profiles)


def parse_experiment(raw: dict, source: Path, profile: str, profiles: list) -> Experiment:
    where = str(source)
    root = project_root(source)
    for key in ("name", "base_model", "arms"):
        if key not in raw:
            raise ExperimentError(f"{where}: missing '{key}'", f"add '{key}:'")
    name = raw["name"]
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ExperimentError(f"{where}: 'name' must be letters, digits, - or _, got {name!r}", "rename it")
    seeds = _seeds(where, raw.get("seeds", [0]))
    from msm.identity import default_identity, parse_identity

    identity = parse_identity(raw["identity"], f"{where}: identity", ExperimentError) if "identity" in raw \
        else default_identity()
    chat_template = _path(root, f"{where}: chat_template", raw["chat_template"], "Jinja chat template") \
        if raw.get("chat_template") else None
    corpus_defaults = _mapping(f"{where}: corpus", raw.get("corpus"))
    _check_corpus(f"{where}: corpus", corpus_defaults)
    _eval_paths(root, f"{where}: corpus", corpus_defaults)
    train = _mapping(f"{where}: train", raw.get("train"))
    _unknown(f"{where}: train", train, TRAIN)
    recipe: dict = {}
    if "recipe" in train:
        recipe_path = _path(root, f"{where}: train.recipe", train["recipe"], "training config")
        from msm.config import read_yaml

        recipe = _mapping(str(recipe_path), read_yaml(recipe_path, "training recipe", "train/configs/",
                                                      ExperimentError))
    recipe_stages = {s.get("kind"): s for s in recipe.pop("stages", []) if isinstance(s, dict)}
    stage_defaults = {}
    for kind in ("midtrain", "aft"):
        stage = {k: v for k, v in recipe_stages.get(kind, {}).items() if k not in ("corpus", "demos", "name")}
        stage_defaults[kind] = merge(stage, _mapping(f"{where}: train.{kind}", train.get(kind)))
    recipe = merge(recipe, {k: v for k, v in train.items() if k not in ("recipe", "midtrain", "aft")})
    recipe.pop("output_dir", None)
    recipe["base_model"] = raw["base_model"]

    demos = {}
    for dname, body in _mapping(f"{where}: demos", raw.get("demos")).items():
        body = dict(_mapping(f"{where}: demos.{dname}", body))
        if "spec" not in body:
            raise ExperimentError(f"{where}: demos.{dname}: missing 'spec'", "name the spec the demonstrations follow")
        spec = _path(root, f"{where}: demos.{dname}.spec", body.pop("spec"), "spec")
        from corpus.api import demo_option_names

        _unknown(f"{where}: demos.{dname}", body, demo_option_names() - {"name", "progress"})
        if "n" not in body:
            raise ExperimentError(f"{where}: demos.{dname}: missing 'n'", "say how many demonstrations to keep")
        body["variables"] = {**identity.variables(), **_mapping(f"{where}: demos.{dname}.variables",
                                                                 body.get("variables"))}
        _eval_paths(root, f"{where}: demos.{dname}", body)
        from corpus.api import check_demo_options

        try:
            check_demo_options(**body)
        except MsmError as exc:
            raise ExperimentError(f"{where}: demos.{dname}: {exc.problem}", exc.fix) from None
        demos[dname] = DemoSet(str(dname), spec, body)

    evals = {}
    for ename, body in _mapping(f"{where}: evals", raw.get("evals")).items():
        body = _mapping(f"{where}: evals.{ename}", body)
        _unknown(f"{where}: evals.{ename}", body, EVAL)
        if "suite" not in body:
            raise ExperimentError(f"{where}: evals.{ename}: missing 'suite'", "name a suite (see `msm eval suites`)")
        items = [str(_path(root, f"{where}: evals.{ename}.items", i, "item bank")) for i in body.get("items") or []]
        options = {k: (str(_path(root, f"{where}: evals.{ename}.options.templates", v, "folder"))
                       if k == "templates" and v else v)
                   for k, v in _mapping(f"{where}: evals.{ename}.options", body.get("options")).items()}
        limit = body.get("limit")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ExperimentError(f"{where}: evals.{ename}: 'limit' is {limit!r}", "use 1 or more, or leave it out")
        judge = body.get("judge")
        if judge is not None:
            _unknown(f"{where}: evals.{ename}.judge", _mapping(f"{where}: evals.{ename}.judge", judge),
                     {"backend", "model", "base_url"})
        evals[ename] = EvalSpec(str(ename), body["suite"], items, body.get("target"), body.get("mode"), limit,
                                options, judge)

    arms_raw = _mapping(f"{where}: arms", raw.get("arms"))
    if not arms_raw:
        raise ExperimentError(f"{where}: 'arms' is empty", "list at least one arm")
    arms = []
    for aname, body in arms_raw.items():
        label = f"{where}: arms.{aname}"
        body = _mapping(label, body)
        _unknown(label, body, ARM)
        spec = _path(root, f"{label}.spec", body["spec"], "spec") if body.get("spec") else None
        demo = body.get("demos")
        if demo is not None and demo not in demos:
            raise ExperimentError(f"{label}: demos '{demo}' is not defined",
                                  f"define it under demos: (defined: {', '.join(demos) or 'none'})")
        midtrain = body.get("midtrain", spec is not None)
        if midtrain and spec is None:
            raise ExperimentError(f"{label}: midtrain needs a spec", "give the arm a spec, or set midtrain: false")
        corpus = merge(corpus_defaults, _mapping(f"{label}.corpus", body.get("corpus")))
        _check_corpus(f"{label}.corpus", corpus)
        _eval_paths(root, f"{label}.corpus", corpus)
        # the documents are about the model being trained; `corpus: {variables: ...}` names another
        # entity (the paper's entity ablation) for this arm's corpus alone
        corpus["variables"] = {**identity.variables(), **(corpus.get("variables") or {})}
        wanted = body.get("evals", list(evals))
        unknown = [e for e in wanted if e not in evals]
        if unknown:
            raise ExperimentError(f"{label}: eval '{unknown[0]}' is not defined",
                                  f"define it under evals: (defined: {', '.join(evals) or 'none'})")
        arm_train = _mapping(f"{label}.train", body.get("train"))
        _unknown(f"{label}.train", arm_train, TRAIN - {"recipe"})
        arms.append(Arm(str(aname), str(body.get("label", aname)), spec, body.get("condition"), corpus,
                        bool(midtrain), demo, bool(body.get("cot", False)), arm_train,
                        _seeds(label, body.get("seeds", seeds)), list(wanted), body.get("series")))
    for arm in arms:  # the CoT baseline trains on reasoning: its set must be written with it
        if arm.cot and not arm.demos:
            raise ExperimentError(f"{where}: arms.{arm.name}: cot needs demos", "give the arm a demo set, or drop cot")
        if arm.cot and not demos[arm.demos].options.get("cot") and not demos[arm.demos].options.get("from_preferences"):
            raise ExperimentError(f"{where}: arms.{arm.name}: cot is set but demos '{arm.demos}' are written without "
                                  "reasoning", f"set cot: true on demos.{arm.demos} (the plain arms strip it)")
    for dname, demo in demos.items():  # demo sets token-matched to another set of this file
        ref = demo.options.get("match_tokens_of")
        if ref is None:
            continue
        if ref not in demos or ref == dname or demos[ref].options.get("match_tokens_of"):
            raise ExperimentError(f"{where}: demos.{dname}: match_tokens_of '{ref}' is not another demo set of this "
                                  "file that is matched to none", "name one reference set and match every other to it")
    by_name = {a.name: a for a in arms}
    for arm in arms:
        ref = arm.corpus.get("match_tokens_of")
        if ref is None:
            continue
        if ref not in by_name or not by_name[ref].midtrain or by_name[ref].condition:
            raise ExperimentError(f"{where}: arms.{arm.name}: match_tokens_of '{ref}' is not an arm with its own corpus",
                                  "name an arm that midtrains on a spec (not an ablation condition)")
        if by_name[ref].corpus.get("match_tokens_of") or ref == arm.name:
            raise ExperimentError(f"{where}: arms.{arm.name}: match_tokens_of '{ref}' matches another arm itself",
                                  "match every arm to one reference arm")
        if arm.condition:
            raise ExperimentError(f"{where}: arms.{arm.name}: match_tokens_of does not apply to an ablation arm",
                                  "ablation corpora are token-matched to each other already")
    if any(a.condition for a in arms):
        from corpus.api import parse_conditions

        parse_conditions(",".join(sorted({a.condition for a in arms if a.condition})))
    from msm.experiment_estimate import device

    device(str(raw.get("device", "cpu")))
    experiment = Experiment(name, str(raw.get("about", "")).strip(), profile, profiles, root, source,
                            raw["base_model"], recipe, stage_defaults, demos, evals, arms,
                            str(raw.get("device", "cpu")), raw, identity, chat_template)
    for arm in arms:  # every arm's training config must parse now, not an hour into the run
        if arm.midtrain or arm.demos:
            from msm.experiment import train_config

            train_config(experiment, arm, arm.seeds[0], "corpus", "demos", Path("/nonexistent"))
    return experiment


CORPUS_SET_BY_RUNNER = {"name", "register", "progress", "db", "slurm", "dry_run", "conditions", "allow_partial"}


def _eval_paths(root: Path, where: str, corpus: dict) -> None:
    """Eval files a corpus or demo set is decontaminated against, read from the project root like specs."""
    for key, kind in (("against", "item bank"), ("scenarios", "scenario folder")):
        if corpus.get(key):
            corpus[key] = [str(_path(root, f"{where}.{key}", p, kind)) for p in corpus[key]]


def _check_corpus(where: str, corpus: dict) -> None:
    from corpus.api import build_option_names

    _unknown(where, corpus, (build_option_names() - CORPUS_SET_BY_RUNNER) | {"tokens", "tolerance", "match_tokens_of"})
    from corpus.api import check_build_options

    try:
        check_build_options(where, corpus)
    except MsmError as exc:
        raise ExperimentError(exc.problem, exc.fix) from None
    if "docs" in corpus and "tokens" in corpus and corpus["docs"] is not None and corpus["tokens"] is not None:
        raise ExperimentError(f"{where}: both 'docs' and 'tokens' are set", "keep one of them (a profile may set the "
                              "other to null)")
