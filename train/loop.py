"""The training loop: one readable function, safe to kill, the same on one CPU or many GPUs.

Plain PyTorch. Under `torchrun` or `accelerate launch` (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel and each rank takes its slice of every step's examples; nothing else
changes. A checkpoint holds the trainable weights, the optimiser, the scheduler, every RNG and
the step (the data order is a function of seed and epoch, so the step is the data position);
after kill -9 the same command resumes from the last one and the loss curve continues as if
nothing had happened.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from msm.errors import MsmError

CHECKPOINTS = "checkpoints"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Rank and device from the launcher's environment; gloo on CPU, nccl on GPUs."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, device)


@dataclass
class StageResult:
    steps: int
    tokens: int  # input tokens seen (not padding), all ranks
    target_tokens: int  # tokens the loss was computed on
    first_loss: float | None
    final_loss: float | None
    seconds: float
    resumed_from: int  # step of the checkpoint it resumed from (0: a fresh start)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _order(n: int, per_step: int, seed: int, epoch: int) -> list[int]:
    """Epoch's example order: a seeded permutation, extended cyclically to whole steps."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    steps = max(1, math.ceil(n / per_step))
    return (perm * math.ceil(steps * per_step / n))[: steps * per_step]


def steps_for(n_examples: int, stage, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps) for a stage."""
    per_step = stage.batch_size * stage.grad_accum * world
    per_epoch = max(1, math.ceil(n_examples / per_step))
    total = per_epoch * stage.epochs
    return per_epoch, min(total, stage.max_steps) if stage.max_steps else total


def _rng_state() -> dict:
    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model) -> None:
    """FSDP2 in place: every decoder layer its own unit, then the root; frozen base weights are
    sharded too, so a 32B model's weights are split across the GPUs instead of copied to each."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise MsmError("parallel: fsdp found no decoder layers to shard in this model", "use parallel: ddp")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    found = sorted((stage_dir / CHECKPOINTS).glob("step-*/state.pt"))
    return found[-1].parent if found else None


def _save_checkpoint(stage_dir: Path, step: int, model, optimizer, scheduler, keep: int, dist: Dist) -> None:
    """Every rank calls this. Unsharded: rank 0 writes one file. Sharded (FSDP): each rank writes
    its shard of the trainable weights and optimiser state through torch.distributed.checkpoint."""
    import torch

    root = stage_dir / CHECKPOINTS
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    if dist.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(dist)
    extra = {"step": step, "scheduler": scheduler.state_dict()}
    if is_sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "shards"))
        if dist.main:
            torch.save(extra, tmp / "state.pt")
    elif dist.main:
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({**extra, "trainable": trainable, "optimizer": optimizer.state_dict()}, tmp / "state.pt")
    torch.save(_rng_state(), tmp / f"rng-{dist.rank}.pt")  # each rank's own generators
    _barrier(dist)
    if dist.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a checkpoint exists whole or not at all
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(dist)


def _load_checkpoint(path: Path, model, optimizer, scheduler, dist: Dist) -> int:
    import torch

    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if is_sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        options = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen base weights are not saved
        msd, osd = get_state_dict(model, optimizer, options=options)
        shards = {"model": msd, "optim": osd}
        dcp.load(shards, checkpoint_id=str(path / "shards"))
        set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optim"],
                       options=options)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        optimizer.load_state_dict(state["optimizer"])
    rng = path / f"rng-{dist.rank}.pt"
    if rng.exists():  # a run resumed on fewer ranks than it was saved with keeps the others' fresh
        _set_rng_state(torch.load(rng, weights_only=False))
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch

        torch.distributed.barrier()


def _log_lines(path: Path, upto: int) -> None:
    """Keep the log's lines up to the step a stage starts from (0 on a fresh start); later ones
    are replayed."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= upto]
    path.write_text("".join(line + "\n" for line in kept))


def train_stage(model, examples: list, collate_fn, stage, stage_dir: Path, dist: Dist, seed: int,
                checkpoint_every: int, keep_checkpoints: int, progress: bool | None = None,
                parallel: str = "ddp") -> StageResult:
    """Train `model` on `examples` for one stage; resumes from the stage's last checkpoint."""
    import torch
    from tqdm import tqdm
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    from train.data import IGNORE
    from train.loss import supervised_loss

    per_step = stage.batch_size * stage.grad_accum * dist.world
    per_epoch, total = steps_for(len(examples), stage, dist.world)
    if dist.world > 1 and parallel == "fsdp":
        shard(model)  # before the optimiser is made: it must see the sharded parameters
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.999))
    warmup = math.ceil(stage.warmup * total)
    scheduler = (get_cosine_schedule_with_warmup(optimizer, warmup, total) if stage.schedule == "cosine"
                 else get_constant_schedule_with_warmup(optimizer, warmup))
    stage_dir.mkdir(parents=True, exist_ok=True)
    log_path = stage_dir / "log.jsonl"
    start = 0
    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is not None:
        start = _load_checkpoint(checkpoint, model, optimizer, scheduler, dist)
    if dist.main:
        _log_lines(log_path, start)
    ddp = model
    if dist.world > 1 and not is_sharded(model):
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if "cuda" in dist.device
                                                        else None)
    model.train()
    bar = tqdm(total=total, initial=start, desc=stage.name, unit="step", dynamic_ncols=True,
               disable=(not dist.main) or (None if progress is None else not progress))
    tokens = target_total = 0
    first_loss = final_loss = None
    started = time.monotonic()
    orders: dict[int, list[int]] = {}
    for step in range(start, total):
        epoch, within = divmod(step, per_epoch)
        order = orders.setdefault(epoch, _order(len(examples), per_step, seed, epoch))
        step_loss = torch.zeros((), device=dist.device)
        step_tokens = torch.zeros(2, device=dist.device)
        for micro in range(stage.grad_accum):
            at = within * per_step + (micro * dist.world + dist.rank) * stage.batch_size
            batch = collate_fn([examples[i] for i in order[at:at + stage.batch_size]])
            real = batch.pop("real_tokens")
            batch = {k: v.to(dist.device) for k, v in batch.items()}
            sync = micro == stage.grad_accum - 1 or dist.world == 1
            if is_sharded(model):
                model.set_requires_gradient_sync(sync)  # FSDP: reduce-scatter only on the last micro-batch
                context = contextlib.nullcontext()
            else:
                context = ddp.no_sync() if (dist.world > 1 and not sync) else contextlib.nullcontext()
            with context:
                loss = supervised_loss(ddp, batch)
                (loss / stage.grad_accum).backward()
            step_loss += loss.detach() / stage.grad_accum
            step_tokens += torch.tensor([real, int((batch["labels"] != IGNORE).sum())], device=dist.device)
        if dist.world > 1:  # every rank sees the same loss, so all of them stop together on a bad one
            torch.distributed.all_reduce(step_loss)
            step_loss /= dist.world
            torch.distributed.all_reduce(step_tokens)
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):  # before the optimiser step: the weights and checkpoints stay finite
            bar.close()
            raise MsmError(f"{stage.name}: the loss is {loss_value} at step {step + 1} (lr {stage.lr:g}); the run "
                           "stopped and is marked failed", "lower lr, set max_grad_norm, or use fp32 or bf16 "
                           "precision, then rerun: it resumes from the last checkpoint")
        if stage.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = loss_value if first_loss is None else first_loss
        final_loss = loss_value
        tokens += int(step_tokens[0])
        target_total += int(step_tokens[1])
        elapsed = time.monotonic() - started
        if dist.main:
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step + 1, "loss": round(loss_value, 6), "lr": scheduler.get_last_lr()[0],
                                     "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 2) if elapsed else 0.0,
                                     "elapsed_s": round(elapsed, 3)}) + "\n")
            bar.set_postfix_str(f"loss {loss_value:.4f}, {tokens / elapsed if elapsed else 0:,.0f} tok/s, "
                                f"lr {scheduler.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)
        if (step + 1) % checkpoint_every == 0 and step + 1 < total:
            _save_checkpoint(stage_dir, step + 1, model, optimizer, scheduler, keep_checkpoints, dist)
    bar.close()
    model.eval()
    return StageResult(total, tokens, target_total, first_loss, final_loss, time.monotonic() - started, start)
