"""Rehearse an experiment's paper profile at full size on this CPU, against a simulated frontier model.

Every data step runs as the paper profile says (40M-token corpora with brainstorming and batches,
thousands of demonstrations, token matching), but its model calls go to the simulator
(msm/llm/simulator.py) in its own process, through the real SDK clients. Then the trainer's data
path runs on the full corpora (load, tokenize, pack) with a few steps of a tiny random model, and
each eval runs on that model. What is not a GPU or an API key is the real code path.

What the rehearsal changes, and nothing else:
- model calls go to the simulator (its base URL, a throwaway key), and the client looks at an
  open batch every `30 s / time_scale` (the simulator's durations are divided alike);
- the trained model is `tiny-random` on the CPU, `train_steps` steps a stage of one sequence each
  (no gradient accumulation), its sequences cut to the 512 positions it reads: the whole corpus is
  still loaded, tokenized and packed, which is the data path's cost; the steps only show that
  training starts on it (a tiny model's step costs what its 49k-word output layer costs);
- one seed (the data steps do not depend on it), and generated agentic answers kept short;
- with `scale` < 1 (the quick rehearsal), every count (tokens, documents, demonstrations, budget)
  is multiplied by it.

It runs in its own home (`$MSM_HOME/rehearsals/NAME-PROFILE`): simulated answers must never sit
in the call cache a real run reads, nor simulated corpora in the real warehouse. Like any
experiment it resumes: a rerun reuses every finished step and every cached call.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from msm.errors import MsmError

REHEARSAL_KEY = "sk-ant-rehearsal-simulated"  # the simulator takes any key; a real one is never sent
TINY_POSITIONS = 512  # what tiny-random reads (msm/tiny.py)
AGENTIC_ANSWER_TOKENS = 64  # a tiny random model's agentic answers: the grid's plumbing, not its text
LLM_BACKENDS = ("anthropic", "openai")
BILLING_FILE = "simulator_billing.jsonl"  # one line per run: what the simulator billed


@dataclass
class Rehearsal:
    scale: float = 1.0  # counts multiplied by this; the quick rehearsal uses 0.01
    time_scale: float = 200.0  # the simulator's durations (and the client's batch polls) divided by this
    kinds: tuple[str, ...] = ()  # step kinds to run (with what they need); () = every step
    train_steps: int = 2
    simulator: dict = field(default_factory=dict)  # overrides of msm/llm/simulator.yaml

    def validate(self) -> None:
        if not 0 < self.scale <= 1:
            raise MsmError(f"--scale {self.scale} is not a share in (0, 1]", "use 1 for full size, 0.01 for quick")
        if self.time_scale < 1:
            raise MsmError(f"--time-scale {self.time_scale} is below 1", "use 1 (real time) or more")
        from msm.experiment import KINDS

        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise MsmError(f"--steps: no step kind '{unknown[0]}'", f"use some of: {', '.join(KINDS)}")


def profile_name(profile: str, settings: Rehearsal) -> str:
    return f"{profile}-rehearsal" + ("" if settings.scale == 1 else f"-x{settings.scale:g}")


def home_for(name: str, profile: str, settings: Rehearsal) -> Path:
    from msm.config import load_settings

    return load_settings().home / "rehearsals" / f"{name}-{profile_name(profile, settings)}"


def _scaled_tokens(value, scale: float):
    from pipelines.target import parse_tokens

    return value if value is None or scale == 1 else max(1, int(parse_tokens(value) * scale))


def _scaled(options: dict, settings: Rehearsal, counts: tuple[str, ...]) -> dict:
    """A step's options with its counts, token target and budget multiplied by `settings.scale`."""
    out = dict(options)
    if settings.scale == 1:
        return out
    for key in counts:
        if out.get(key) is not None:
            out[key] = max(1, math.ceil(out[key] * settings.scale))
    if out.get("tokens") is not None:
        out["tokens"] = _scaled_tokens(out["tokens"], settings.scale)
    if out.get("max_cost") is not None:
        out["max_cost"] = out["max_cost"] * settings.scale
    return out


def _point_at(options: dict, url: str, settings: Rehearsal, counts: tuple[str, ...]) -> dict:
    """A step's options scaled and, when it calls a model, aimed at the simulator."""
    out = _scaled(options, settings, counts)
    backend = out.get("backend")
    if out.get("from_preferences") or backend == "local":
        return out
    out["backend"] = backend if backend in LLM_BACKENDS else "anthropic"
    out["base_url"] = url + ("/v1" if out["backend"] == "openai" else "")
    out["batch_poll_s"] = 30.0 / settings.time_scale
    return out


def rehearsal_mapping(raw: dict, url: str, settings: Rehearsal) -> dict:
    """The paper profile's merged mapping, changed only as the module docstring says."""
    raw = copy.deepcopy(raw)
    raw["corpus"] = _point_at(raw.get("corpus") or {}, url, settings, ("docs",))
    for arm in (raw.get("arms") or {}).values():
        if isinstance(arm, dict):
            arm.pop("seeds", None)
            if isinstance(arm.get("corpus"), dict):
                arm["corpus"] = _scaled(arm["corpus"], settings, ("docs",))
    for name, demo in (raw.get("demos") or {}).items():
        if isinstance(demo, dict):
            raw["demos"][name] = _point_at(demo, url, settings, ("n",))
    for spec in (raw.get("evals") or {}).values():
        if isinstance(spec, dict):
            if isinstance(spec.get("judge"), dict):
                judge = _point_at(spec["judge"], url, settings, ())
                judge.pop("batch_poll_s", None)
                spec["judge"] = judge
            if spec.get("suite") == "agentic":
                options = spec.setdefault("options", {})
                options["max_tokens"] = min(options.get("max_tokens") or AGENTIC_ANSWER_TOKENS, AGENTIC_ANSWER_TOKENS)
    raw["seeds"] = list(raw.get("seeds") or [0])[:1]
    raw["base_model"] = "tiny-random"
    raw["device"] = "cpu"
    train = raw.setdefault("train", {})
    train["gradient_checkpointing"] = False
    for kind in ("midtrain", "aft"):
        stage = train.setdefault(kind, {})
        stage["max_steps"] = settings.train_steps
        stage["batch_size"], stage["grad_accum"] = 1, 1
        stage["max_len"] = min(stage.get("max_len") or TINY_POSITIONS, TINY_POSITIONS)
    return raw


def load_rehearsal(path: str | Path, profile: str | None, url: str, settings: Rehearsal):
    """The experiment at `path` under `profile`, as its rehearsal runs it (see rehearsal_mapping)."""
    from msm.experiment_config import merged_profile, parse_experiment

    settings.validate()
    raw, profile, profiles = merged_profile(path, profile)
    return parse_experiment(rehearsal_mapping(raw, url, settings), Path(path), profile_name(profile, settings),
                            profiles)


class Home:
    """The rehearsal's own MSM_HOME (and a throwaway API key) for the duration of a `with`."""

    KEYS = ("MSM_HOME", "MSM_DB", "ANTHROPIC_API_KEY", "OPENAI_API_KEY")

    def __init__(self, home: Path):
        self.home = home
        self.saved: dict = {}

    def __enter__(self) -> "Home":
        self.saved = {k: os.environ.get(k) for k in self.KEYS}
        self.home.mkdir(parents=True, exist_ok=True)
        os.environ["MSM_HOME"] = str(self.home)
        os.environ.pop("MSM_DB", None)
        os.environ["ANTHROPIC_API_KEY"] = REHEARSAL_KEY
        os.environ["OPENAI_API_KEY"] = REHEARSAL_KEY
        return self

    def __exit__(self, *exc) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def rehearse(path: str | Path, profile: str | None, settings: Rehearsal, log=print, progress: bool | None = None):
    """Run the rehearsal; returns (experiment, RunOutcome, the simulator's /_stats at the end, home)."""
    from msm.experiment_config import merged_profile
    from msm.llm.simulator import SimulatorProcess

    settings.validate()
    raw, chosen, _ = merged_profile(path, profile)
    name = raw["name"]
    home = home_for(name, chosen, settings)
    with Home(home), SimulatorProcess(time_scale=settings.time_scale, config_overrides=settings.simulator) as sim:
        from msm.experiment import run_experiment

        exp = load_rehearsal(path, profile, sim.url, settings)
        log(f"rehearsal of {name} ({chosen}) in {home}, simulator at {sim.url} (time / {settings.time_scale:g})"
            + ("" if settings.scale == 1 else f", counts x {settings.scale:g}"))
        try:
            outcome = run_experiment(exp, log=log, progress=progress, kinds=settings.kinds or None)
        finally:  # what the simulator billed, run by run: a rehearsal in parts adds them up
            billed = sim.stats()
            with open(home / BILLING_FILE, "a", encoding="utf-8") as out:
                out.write(json.dumps({"at": time.time(), "kinds": list(settings.kinds), **billed}) + "\n")
        return exp, outcome, billed, home


def billed_usd(home: Path) -> float:
    """USD of every call the simulator answered in this rehearsal's runs, at msm's price table."""
    from msm.llm.pricing import load_prices
    from msm.llm.types import Usage

    prices, total = load_prices(), 0.0
    path = home / BILLING_FILE
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        for model, channels in json.loads(line).get("billing", {}).items():
            for channel, t in channels.items():
                usage = Usage(input_tokens=t["input_tokens"], output_tokens=t["output_tokens"],
                              cache_write_tokens=t["cache_creation_input_tokens"],
                              cache_read_tokens=t["cache_read_input_tokens"])
                backend = "openai" if channel == "chat" else "anthropic"
                total += prices.cost(backend, model, usage, batch=channel == "batch")
    return total
