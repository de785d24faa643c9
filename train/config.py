"""Training configs: YAML, validated strictly, so a typo is a one-line error naming the key.

Every knob of a run is here and nowhere else (nanoGPT's rule): the loop reads a TrainConfig and
nothing from the environment except the distributed launcher's rank variables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path


from msm.errors import MsmError

PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(MsmError):
    """A training config that cannot be run as written."""


@dataclass
class Adapter:
    kind: str = "lora"  # lora or full
    r: int = 64
    alpha: int = 128
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: list(PAPER_TARGETS))


@dataclass
class Stage:
    name: str
    kind: str  # midtrain or aft
    corpus: str | None = None  # midtrain: a warehouse corpus name, or a parquet / JSONL / HF folder path
    demos: str | None = None  # aft: a warehouse demo set name, or a {messages} JSONL / HF folder path
    max_len: int = 2048
    packing: bool = True  # midtrain: documents packed into max_len sequences, attention reset at boundaries
    cot: bool = False  # aft: train on the assistant's `reasoning`: as the template's `reasoning_content` when it
    # renders one (Qwen3: <think>...</think>), else as a `<think>\n...\n</think>\n\n` prefix (train/data.py)
    init: str = "continue"  # aft: continue the previous stage's adapter, or start a fresh one
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: float = 0.05  # share of the stage's steps
    schedule: str = "cosine"  # cosine or constant
    weight_decay: float = 0.01
    epochs: int = 1
    max_steps: int | None = None  # stop early (smoke runs)
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    base_model: str
    stages: list
    output_dir: str
    adapter: Adapter = field(default_factory=Adapter)
    precision: str = "auto"  # auto: bf16 on a GPU, fp32 on CPU
    seed: int = 0
    gradient_checkpointing: bool = False
    parallel: str = "ddp"  # with several processes: ddp (replicas) or fsdp (parameters sharded by layer)
    checkpoint_every: int = 50  # optimizer steps
    keep_checkpoints: int = 2
    # The system turn every AFT demonstration is trained with (an experiment renders it from the
    # model's identity, msm/identity.yaml); None: the demonstrations as stored.
    system_prompt: str | None = None
    # A Jinja chat template file for a model whose tokenizer has none (a base model); the run card
    # records the template used, so evaluation frames prompts the same way.
    chat_template: str | None = None
    source: str = ""  # the file it came from

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


CHOICES = {"kind": {"midtrain", "aft"}, "init": {"continue", "fresh"}, "schedule": {"cosine", "constant"},
           "precision": {"auto", "fp32", "bf16", "fp16"}, "adapter.kind": {"lora", "full"},
           "parallel": {"ddp", "fsdp"}}
MAX_CONTEXT = 1 << 20  # no model msm trains reads a million tokens at once; the model's own limit is checked at run start
# Integer settings: (lowest, highest). The highest values only keep a typo (an extra zero, a
# pasted number) from reaching torch as a traceback or an allocation that cannot be made.
INT_RANGES = {"max_len": (1, MAX_CONTEXT), "batch_size": (1, 1 << 16), "grad_accum": (1, 1 << 16),
              "epochs": (1, 10_000), "max_steps": (1, 1 << 31), "checkpoint_every": (1, 1 << 31),
              "keep_checkpoints": (1, 1000), "r": (1, 1 << 14), "alpha": (1, 1 << 20), "seed": (0, 2**32 - 1)}
# Float settings: (lowest, highest, whether the lowest is allowed, what to give). Every float is finite.
FLOAT_RANGES = {"lr": (0.0, 1.0, False, "a finite learning rate above 0 and at most 1, e.g. 1.0e-4"),
                "warmup": (0.0, 1.0 - 1e-12, True, "a share of the steps in [0, 1)"),
                "weight_decay": (0.0, 10.0, True, "a finite value in [0, 10], e.g. 0.01"),
                "max_grad_norm": (0.0, 1e6, True, "a finite norm of 0 (no clipping) or more, e.g. 1.0"),
                "dropout": (0.0, 1.0 - 1e-12, True, "a probability in [0, 1)")}
STAGE_NEEDS = {"midtrain": "corpus", "aft": "demos"}


def _typed(where: str, key: str, value, default_type, optional: bool):
    """Check one value against its field's type; ints are accepted where floats are expected."""
    if value is None and optional:
        return None
    expected = default_type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{where}: '{key}' is {value}, too large for a number", "fix its value") from None
    if expected is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 as a string
        except ValueError:
            pass
    if expected is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: '{key}' must be {expected.__name__}{' or null' if optional else ''}, "
                      f"got {value!r}", "fix its value")


def _fill(cls, raw: dict, where: str, skip: tuple = ()):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}", "write it as key: value lines")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip and f.name != "source"}
    unknown = [k for k in raw if k not in fields and k not in skip]
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"known keys: {', '.join(fields)}"
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'", hint)
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing '{name}'", f"add '{name}:'")
            continue
        hint = str(f.type)
        optional = "None" in hint
        base = {"int": int, "float": float, "str": str, "bool": bool, "list": list}.get(
            hint.replace(" | None", "").strip(), None)
        values[name] = _typed(where, name, raw[name], base, optional) if base else raw[name]
    return values


def parse_config(raw, source: str = "") -> TrainConfig:
    """A TrainConfig from parsed YAML, or a one-line ConfigError naming the bad key."""
    where = source or "config"
    top = _fill(TrainConfig, raw, where, skip=("adapter", "stages"))
    for key in ("adapter", "stages"):
        if key in (raw or {}):
            top[key] = raw[key]
    adapter = Adapter(**_fill(Adapter, top.pop("adapter", None) or {}, f"{where}: adapter"))
    stages_raw = top.pop("stages", None)
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{where}: 'stages' must be a non-empty list", "list a midtrain and/or an aft stage")
    stages, names = [], set()
    for i, item in enumerate(stages_raw):
        label = f"{where}: stages[{i}]"
        stage = Stage(**_fill(Stage, item, label))
        for key in ("kind", "init", "schedule"):
            if getattr(stage, key) not in CHOICES[key]:
                raise ConfigError(f"{label}: '{key}' is '{getattr(stage, key)}'", f"use one of {sorted(CHOICES[key])}")
        need = STAGE_NEEDS[stage.kind]
        if not getattr(stage, need):
            raise ConfigError(f"{label}: a {stage.kind} stage needs '{need}'", f"name a warehouse {need} or a file")
        if stage.name in names:
            raise ConfigError(f"{label}: stage name '{stage.name}' is used twice", "give every stage its own name")
        names.add(stage.name)
        if stage.max_steps is not None and stage.max_steps < 1:
            raise ConfigError(f"{label}: 'max_steps' is {stage.max_steps}", "use 1 or more, or leave it out")
        _check_numbers(label, dataclasses.asdict(stage))
        stages.append(stage)
    config = TrainConfig(adapter=adapter, stages=stages, source=source, **top)
    if config.precision not in CHOICES["precision"]:
        raise ConfigError(f"{where}: 'precision' is '{config.precision}'", f"use one of {sorted(CHOICES['precision'])}")
    if config.parallel not in CHOICES["parallel"]:
        raise ConfigError(f"{where}: 'parallel' is '{config.parallel}'", "use ddp or fsdp")
    if adapter.kind not in CHOICES["adapter.kind"]:
        raise ConfigError(f"{where}: adapter 'kind' is '{adapter.kind}'", "use lora or full")
    if not adapter.targets and adapter.kind == "lora":
        raise ConfigError(f"{where}: adapter 'targets' is empty", "list the module names LoRA adapts")
    _check_numbers(f"{where}: adapter", dataclasses.asdict(adapter))
    _check_numbers(where, {"checkpoint_every": config.checkpoint_every, "keep_checkpoints": config.keep_checkpoints,
                           "seed": config.seed})
    return config


def _check_numbers(where: str, values: dict) -> None:
    """Every numeric setting in its range: integers within INT_RANGES, floats finite and within
    FLOAT_RANGES (a NaN or infinite learning rate never reaches the optimiser)."""
    import math

    for key in sorted(set(INT_RANGES) & set(values)):
        value = values[key]
        if value is None:
            continue
        low, high = INT_RANGES[key]
        if value < low:
            raise ConfigError(f"{where}: '{key}' is {value}", f"use {low} or more")
        if value > high:
            raise ConfigError(f"{where}: '{key}' is {value}, above the largest msm accepts ({high:,})",
                              f"use at most {high:,}")
    for key in sorted(set(FLOAT_RANGES) & set(values)):
        value = values[key]
        if value is None:
            continue
        low, high, low_ok, give = FLOAT_RANGES[key]
        if not math.isfinite(value) or value > high or value < low or (value == low and not low_ok):
            raise ConfigError(f"{where}: '{key}' is {value}", f"give {give}")


def check_context(config: "TrainConfig", context: int | None, what: str) -> None:
    """Every stage's max_len within the model's context window (max_position_embeddings)."""
    if not context:
        return
    for i, stage in enumerate(config.stages):
        if stage.max_len > context:
            raise ConfigError(f"{config.source or 'config'}: stages[{i}]: 'max_len' is {stage.max_len}, longer than "
                              f"{what}'s context window ({context:,} tokens)", f"use at most {context:,}")


def load_config(path: str | Path) -> TrainConfig:
    from msm.config import read_yaml

    path = Path(path)
    raw = read_yaml(path, "training config", "train/configs/", ConfigError)
    config = parse_config(raw, str(path))
    out = Path(config.output_dir)
    if not out.is_absolute():  # everything msm writes lives under $MSM_HOME
        from msm.config import load_settings

        config.output_dir = str(load_settings().home / out)
    return config
