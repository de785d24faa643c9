"""A training run: the stages in order, each resumable, with a warehouse record and a model card.

Output layout (`output_dir`):
    STAGE/log.jsonl               one line per optimiser step (loss, lr, tokens, tokens/s)
    STAGE/checkpoints/step-N/     the last few checkpoints (what a resume reads)
    STAGE/adapter/ or STAGE/model/  the stage's final LoRA adapter, or full weights
    STAGE/done.json               the stage's metrics; a rerun skips a stage that has one
    MODEL_CARD.md, card.json      base model, spec versions, corpus and demo set ids, config, metrics
The warehouse gets a `train_runs` row when the run starts and again when it ends; the loop
itself never opens DuckDB.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from msm.errors import MsmError
from train.config import TrainConfig



@dataclass
class RunResult:
    run_id: str
    output_dir: Path
    stages: dict = field(default_factory=dict)  # name -> metrics
    seconds: float = 0.0


def load_base(name: str, dtype, device: str):
    """(model, tokenizer) of the base model; see msm.models.load_model."""
    from msm.models import load_model

    return load_model(name, dtype, device)


def _dtype(precision: str, device: str):
    import torch

    if precision == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _lora(model, adapter):
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"}
    unknown = [t for t in adapter.targets if t not in names]
    if unknown:
        raise MsmError(f"adapter target '{unknown[0]}' is not a linear module of this model",
                       f"use some of: {', '.join(sorted(names))}")
    config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                        target_modules=list(adapter.targets), bias="none", task_type="CAUSAL_LM")
    with _quiet_peft():
        return get_peft_model(model, config)


@contextlib.contextmanager
def _quiet_peft():
    """peft asks transformers a deprecated question (is_gradient_checkpointing); the answer is fine."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def fingerprint(tensors: dict) -> str:
    """sha256 over names and values: equal fingerprints mean equal weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def run_id(config: TrainConfig, inputs: dict) -> str:
    body = json.dumps([config.to_json(), inputs], sort_keys=True, default=str)
    return "t" + hashlib.sha256(body.encode()).hexdigest()[:15]


def run_training(config: TrainConfig, progress: bool | None = None, log=print) -> RunResult:
    """Run (or resume) every stage of a config; see the module docstring for what it writes."""
    import random

    import numpy as np
    import torch

    from msm.config import load_settings
    from train.data import collate, encode_chats, load_corpus, load_demos, pack_documents, with_system
    from train.loop import init_distributed, steps_for, train_stage

    from train.config import check_context

    check_context(config, context_window(config.base_model), config.base_model)  # before anything is written
    settings = load_settings()
    dist = init_distributed()
    if not dist.main:
        log = _silent  # one voice: rank 0 speaks for the run
    started = time.monotonic()
    out = Path(config.output_dir)
    sources = {s.name: (load_corpus(s.corpus, settings.db) if s.kind == "midtrain" else load_demos(s.demos, settings.db))
               for s in config.stages}
    inputs = {name: {"kind": src.kind, "ref": src.ref, "id": src.id, "spec_versions": src.spec_versions,
                     "records": len(src.records)} for name, src in sources.items()}
    rid = run_id(config, inputs)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        _record(settings.db, rid, config, inputs, "running", None, dist.world)
    dtype = _dtype(config.precision, dist.device)
    result = RunResult(rid, out)
    model, tokenizer, previous = None, None, None
    try:
        for stage in config.stages:
            stage_dir = out / stage.name
            random.seed(config.seed)
            np.random.seed(config.seed)
            torch.manual_seed(config.seed)
            model, tokenizer = _prepare(model, tokenizer, config, stage, previous, dtype, dist.device)
            done = stage_dir / "done.json"
            if done.exists():  # finished in an earlier run: take its weights and go on
                _load_final(model, config, stage_dir)
                result.stages[stage.name] = json.loads(done.read_text())
                previous = stage_dir
                log(f"{stage.name}: done earlier ({result.stages[stage.name]['steps']} steps), skipped")
                continue
            src = sources[stage.name]
            if stage.kind == "midtrain":
                packed = pack_documents(src.records, tokenizer, stage.max_len, stage.packing, config.seed)
                examples, info = packed.examples, {"packing_efficiency": round(packed.efficiency, 4)}
            else:
                chats = encode_chats(with_system(src.records, config.system_prompt), tokenizer, stage.max_len,
                                     stage.cot)
                if not chats.examples:
                    raise MsmError(f"{stage.name}: every demonstration is longer than max_len {stage.max_len} "
                                   "before its assistant turn", "raise max_len")
                examples, info = chats.examples, {"truncated": chats.truncated, "dropped_too_long": chats.dropped}
                if chats.truncated or chats.dropped:
                    log(f"{stage.name}: {chats.truncated} demonstration(s) truncated to max_len {stage.max_len}, "
                        f"{chats.dropped} dropped (no assistant token left)")
            if config.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            from train.loop import is_sharded

            info["init_fingerprint"] = None if is_sharded(model) else fingerprint(
                adapter_state(model) if config.adapter.kind == "lora" else dict(model.named_parameters()))
            _, total = steps_for(len(examples), stage, dist.world)
            log(f"{stage.name}: {len(examples)} examples from {src.kind} '{src.ref}' ({src.id}), {total} steps")
            pad = tokenizer.pad_token_id
            stage_result = train_stage(model, examples, lambda batch: collate(batch, pad), stage, stage_dir, dist,
                                       config.seed, config.checkpoint_every, config.keep_checkpoints, progress,
                                       config.parallel)
            metrics = {**asdict(stage_result), "tokens_per_s": round(stage_result.tokens_per_s, 2),
                       "examples": len(examples), **info}
            _save_final(model, tokenizer, config, stage_dir, dist)
            if dist.main:
                done.write_text(json.dumps(metrics, indent=1))
            result.stages[stage.name] = metrics
            previous = stage_dir
            log(f"{stage.name}: loss {stage_result.first_loss:.4f} -> {stage_result.final_loss:.4f} over "
                f"{stage_result.steps} steps, {stage_result.tokens_per_s:,.0f} tokens/s")
    except BaseException:
        if dist.main:
            _record(settings.db, rid, config, inputs, "failed", result.stages, dist.world)
        raise
    result.seconds = time.monotonic() - started
    if dist.main:
        from train.data import chat_template

        # the template chats were rendered with (the tokenizer's own, the supplied one or the default)
        _write_card(out, config, inputs, result, chat_template(tokenizer) if tokenizer is not None else None)
        _record(settings.db, rid, config, inputs, "complete", result.stages, dist.world)
    return result


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_window(base_model: str) -> int | None:
    """The base model's context window, read from its config file without loading weights; None
    when it cannot be told here (then it is checked once the model is loaded)."""
    from msm.models import TINY, prepared_dir, registry

    if base_model == TINY:
        import inspect

        from msm.tiny import tiny_causal_lm

        return inspect.signature(tiny_causal_lm).parameters["max_positions"].default
    path = Path(base_model)
    if not path.is_dir() and base_model in registry()["models"]:
        path = prepared_dir(base_model)
    raw = None
    if (path / "config.json").is_file():
        try:
            raw = json.loads((path / "config.json").read_text())
        except ValueError:
            return None
    elif "/" in base_model and not path.exists():
        try:
            from transformers import AutoConfig

            raw = AutoConfig.from_pretrained(base_model, local_files_only=True).to_dict()
        except Exception:  # noqa: BLE001 - not in the local cache: load_model says so in one line
            return None
    if not isinstance(raw, dict):
        return None
    raw = raw.get("text_config") or raw
    return next((int(raw[k]) for k in CONTEXT_KEYS if isinstance(raw.get(k), int) and raw[k] > 0), None)


def _silent(_line: str) -> None:
    return None


def read_chat_template(path: str) -> str:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise MsmError(f"chat_template {path} does not exist", "name a Jinja chat template file")
    return p.read_text(encoding="utf-8")


def _prepare(model, tokenizer, config: TrainConfig, stage, previous: Path | None, dtype, device):
    """The model a stage starts from: the previous stage's weights (`init: continue`) or the base."""
    if model is not None and stage.init == "continue":
        return model, tokenizer  # the previous stage's weights are already in place
    base, tokenizer = load_base(config.base_model, dtype, device)
    from train.config import check_context

    check_context(config, next((getattr(base.config, k) for k in CONTEXT_KEYS
                                if isinstance(getattr(base.config, k, None), int)), None), config.base_model)
    if config.chat_template:
        tokenizer.chat_template = read_chat_template(config.chat_template)
    model = _lora(base, config.adapter) if config.adapter.kind == "lora" else base
    if config.adapter.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    if stage.init == "continue" and previous is not None:
        _load_final(model, config, previous)
    return model, tokenizer


def _save_final(model, tokenizer, config, stage_dir: Path, dist) -> None:
    """Every rank calls this: a sharded (FSDP) model is gathered to full tensors, then rank 0 saves."""
    from train.loop import is_sharded

    target = stage_dir / ("adapter" if config.adapter.kind == "lora" else "model")
    state = None
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=config.adapter.kind == "lora"))
    if not dist.main:
        return
    with _quiet_peft():
        if state is None:
            model.save_pretrained(str(target))
        elif config.adapter.kind == "lora":
            model.save_pretrained(str(target), state_dict=state)
        else:
            _save_full(state, model, target)
    tokenizer.save_pretrained(str(target))


def _save_full(state: dict, model, target: Path) -> None:
    """Gathered full weights of a sharded model, written as safetensors with its config."""
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    tied = getattr(model.config, "tie_word_embeddings", False)
    save_file({k: v.contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")},
              str(target / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(target))


def _load_final(model, config, stage_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    if config.adapter.kind == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(stage_dir / "adapter" / "adapter_model.safetensors")))
        return
    state = {}
    for f in sorted((stage_dir / "model").glob("*.safetensors")):
        state.update(load_file(str(f)))
    with torch.no_grad():
        missing = model.load_state_dict(state, strict=False).missing_keys
    if any("lm_head" not in k for k in missing):
        raise MsmError(f"{stage_dir / 'model'} does not hold this model's weights", "remove the stage folder and rerun")


def _record(db, rid: str, config: TrainConfig, inputs: dict, status: str, metrics, world: int) -> None:
    """One short write; the warehouse is never held open while training."""
    from warehouse.db import connect_after_work

    con = connect_after_work(db, f"training run {rid}")
    try:
        con.execute("INSERT INTO train_runs (id, output_dir, base_model, config, inputs, status, metrics, world_size) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
                    "metrics = excluded.metrics, world_size = excluded.world_size, "
                    "finished_at = CASE WHEN excluded.status = 'running' THEN NULL ELSE now() END",
                    [rid, config.output_dir, config.base_model, json.dumps(config.to_json()), json.dumps(inputs),
                     status, json.dumps(metrics) if metrics is not None else None, world])
    finally:
        con.close()


def _write_card(out: Path, config: TrainConfig, inputs: dict, result: RunResult, chat_template: str | None) -> None:
    card = {"run_id": result.run_id, "base_model": config.base_model, "adapter": asdict(config.adapter),
            "spec_versions": sorted({v for i in inputs.values() for v in i["spec_versions"]}),
            "inputs": inputs, "metrics": result.stages, "config": config.to_json(),
            # how the model was framed in AFT, so `msm eval run --model RUN` frames it the same way
            "system_prompt": config.system_prompt,
            "chat_template": chat_template}
    (out / "card.json").write_text(json.dumps(card, indent=1, default=str))
    lines = [f"# {out.name}", "", f"Trained by msm (`msm train run`), run `{result.run_id}`.", "",
             f"- base model: `{config.base_model}`",
             f"- adapter: {config.adapter.kind}" + (f" (r={config.adapter.r}, alpha={config.adapter.alpha}, "
                                                    f"targets {', '.join(config.adapter.targets)})"
                                                    if config.adapter.kind == "lora" else ""),
             f"- spec versions: {', '.join(card['spec_versions']) or 'unknown (file inputs)'}", ""]
    lines += ["| stage | data | id | steps | loss (first -> final) | tokens | tokens/s |", "|---|---|---|---|---|---|---|"]
    for stage in config.stages:
        m, i = result.stages.get(stage.name, {}), inputs[stage.name]
        loss = f"{m.get('first_loss') or 0:.4f} -> {m.get('final_loss') or 0:.4f}"
        lines.append(f"| {stage.name} | {i['kind']} `{i['ref']}` | `{i['id']}` | {m.get('steps')} | {loss} | "
                     f"{m.get('tokens', 0):,} | {m.get('tokens_per_s', 0):,.0f} |")
    lines += ["", "Load the last stage's weights with `msm eval run ... --model "
              f"{out / config.stages[-1].name / ('adapter' if config.adapter.kind == 'lora' else 'model')}`.", ""]
    (out / "MODEL_CARD.md").write_text("\n".join(lines))
