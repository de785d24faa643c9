"""The train stage's public face: what other stages and the experiment runner may call."""

from __future__ import annotations

from train.config import TrainConfig, load_config, parse_config


def run(config: str | TrainConfig, progress: bool | None = None, log=print):
    """Run (or resume) a training config: a YAML path or a parsed TrainConfig."""
    from train.run import run_training

    return run_training(load_config(config) if isinstance(config, str) else config, progress=progress, log=log)


def merge(stage_dir: str, out: str) -> str:
    """Merge a LoRA stage's adapter into its base model and save the result; returns the folder."""
    from train.merge import merge_adapter

    return str(merge_adapter(stage_dir, out))


__all__ = ["TrainConfig", "load_config", "merge", "parse_config", "run"]
