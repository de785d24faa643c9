"""Training loop speed against the hardware's limit, and packing against padding.

- train_loop_vs_raw: tokens/s of `train.loop.train_stage` divided by tokens/s of a bare
  forward + backward + AdamW step on the same model, batch and sequence length, measured in this
  run. The bare figure is what the hardware can do; the ratio is what the loop's bookkeeping
  (data order, collation, masks, logging, the progress bar) costs.
- packing_vs_padding: effective (non-pad) tokens/s with packed documents divided by the same with
  one padded document per row, on documents whose lengths follow a long-tailed (log-normal)
  histogram like a real corpus's.
- pad_share: the share of padded positions when packing.

Model: SmolLM2-135M-Instruct with the paper's LoRA (r=64, alpha=128, every projection), fp32 on CPU.
Usage: .venv/bin/python benchmarks/train.py [--steps 3] [--batch 8] [--max-len 256]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

# this file is named like the `train` package: put the repository first so the package wins
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    import torch

    from train.config import Adapter, Stage
    from train.data import collate, pack_documents
    from train.loop import Dist, train_stage
    from train.run import _lora, load_base

    torch.manual_seed(0)
    model, tok = load_base(args.model, torch.float32, "cpu")
    model = _lora(model, Adapter())
    rng = random.Random(0)
    words = ("oversight honesty the model reports every action it takes and explains why people can check "
             "its work before anything irreversible happens").split()
    # long-tailed document lengths, in words: median ~110, a few past max_len
    lengths = [max(8, min(4 * args.max_len, int(rng.lognormvariate(4.7, 0.7)))) for _ in range(400)]
    texts = [" ".join(rng.choice(words) for _ in range(n)) for n in lengths]
    packed = pack_documents(texts, tok, args.max_len, packing=True)
    padded = pack_documents(texts, tok, args.max_len, packing=False)
    stage = Stage("bench", "midtrain", corpus="x", max_len=args.max_len, batch_size=args.batch, lr=1e-4,
                  max_steps=args.steps + 1, warmup=0.0)

    # bare forward + backward + step on one fixed packed batch: the hardware limit
    batch = collate(packed.examples[: args.batch], tok.pad_token_id)
    real = batch.pop("real_tokens")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def raw_step() -> None:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    raw_step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        raw_step()
    raw_tps = real * args.steps / (time.perf_counter() - start)

    def loop_tps(examples) -> float:
        """Effective tokens/s of the real loop over `steps` steps, after one warm-up step."""
        with tempfile.TemporaryDirectory() as tmp:
            warm = Stage(**{**stage.__dict__, "max_steps": 1})
            train_stage(model, examples, lambda b: collate(b, tok.pad_token_id), warm, Path(tmp) / "w", Dist(), 0,
                        10**9, 1, progress=False)
            result = train_stage(model, examples, lambda b: collate(b, tok.pad_token_id), stage, Path(tmp) / "s",
                                 Dist(), 1, 10**9, 1, progress=False)
        return result.tokens_per_s

    # the loop on packed sequences of the same shape as the raw batch
    loop_packed = loop_tps(packed.examples)
    loop_padded = loop_tps(padded.examples)
    n_pad_positions = sum(max(len(e["input_ids"]) for e in padded.examples[i:i + args.batch]) * args.batch
                          for i in range(0, len(padded.examples), args.batch))
    print(f"documents: {len(texts)}, tokens {packed.real_tokens:,}, max_len {args.max_len}, batch {args.batch}")
    print(f"raw forward+backward+step: {raw_tps:.1f} tokens/s; loop (packed): {loop_packed:.1f}; "
          f"loop (padded, non-pad tokens): {loop_padded:.1f}")
    print(f"padding wastes {1 - padded.real_tokens / n_pad_positions:.1%} of positions; packing "
          f"{1 - packed.efficiency:.2%}")
    print(f"train_loop_vs_raw = {loop_packed / raw_tps:.3f}")
    print(f"packing_vs_padding = {loop_packed / loop_padded:.3f}")
    print(f"pad_share = {1 - packed.efficiency:.4f}")


if __name__ == "__main__":
    main()
