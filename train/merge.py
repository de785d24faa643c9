"""`msm train merge`: a LoRA stage's adapter folded into its base model, saved as a plain model."""

from __future__ import annotations

import json
from pathlib import Path

from msm.errors import MsmError


def merge_adapter(stage_dir: str | Path, out: str | Path) -> Path:
    stage_dir, out = Path(stage_dir), Path(out)
    adapter = stage_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise MsmError(f"no LoRA adapter in {stage_dir}", "pass a finished stage folder of a LoRA run, e.g. RUN/aft")
    card = stage_dir.parent / "card.json"
    base_name = json.loads(card.read_text())["base_model"] if card.is_file() else None
    if base_name is None:
        raise MsmError(f"{card} is missing, so the base model is unknown", "merge a run that finished")
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from train.config import Adapter
    from train.run import _lora, load_base

    config = json.loads((adapter / "adapter_config.json").read_text())
    model, tokenizer = load_base(base_name, torch.float32, "cpu")
    peft_model = _lora(model, Adapter("lora", config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                                      sorted(config["target_modules"])))
    set_peft_model_state_dict(peft_model, load_file(str(adapter / "adapter_model.safetensors")))
    merged = peft_model.merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out
