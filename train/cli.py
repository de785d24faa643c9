"""`msm train ...`: run a training config (midtraining, then AFT), merge an adapter."""

from __future__ import annotations

import click


@click.group("train")
def train_group():
    """Train on a corpus and demonstrations: LoRA or full, resumable, one device to many."""


@train_group.command("run")
@click.argument("config")
@click.option("--max-steps", type=int, default=None, help="Cap every stage at this many steps (smoke runs).")
@click.option("--output-dir", default=None, help="Override the config's output_dir.")
@click.option("--no-progress", is_flag=True)
def run(config, max_steps, output_dir, no_progress):
    """Run CONFIG's stages in order; rerun the same command to resume after a crash or kill."""
    from msm.errors import MsmError
    from train.config import load_config
    from train.run import run_training

    cfg = load_config(config)
    if max_steps is not None:
        if max_steps < 1:
            raise MsmError(f"--max-steps {max_steps} is below 1", "pass 1 or more")
        for stage in cfg.stages:
            stage.max_steps = max_steps
    if output_dir:
        from pathlib import Path

        cfg.output_dir = str(Path(output_dir).resolve())
    result = run_training(cfg, progress=False if no_progress else None, log=click.echo)
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    click.echo(f"run {result.run_id}: {len(result.stages)} stage(s) in {result.seconds:.1f} s -> {result.output_dir}")
    click.echo(f"  model card: {result.output_dir / 'MODEL_CARD.md'}")


@train_group.command("merge")
@click.argument("stage_dir")
@click.option("--out", required=True, help="Folder for the merged model (replaced if it exists).")
def merge(stage_dir, out):
    """Fold a LoRA stage's adapter (RUN/STAGE) into the base model and save it whole."""
    from train.merge import merge_adapter

    click.echo(f"merged model written to {merge_adapter(stage_dir, out)}")
