"""Batched against sequential generation on the local backend, for the agentic suite's shape.

The agentic suite asks N samples of each condition's inbox (one long prompt, temperature 1).
- sequential: one request at a time (`LocalBackend(batch_size=1)`): every sample runs its own
  prefill of the whole inbox, then decodes alone;
- batched: the suite's path (`LocalBackend()`, batch 16): the samples of one prompt share one
  prefill, whose KV cache is copied to every row, and decode together.

Samples stop at their own end-of-turn, so the two runs need not make the same number of tokens:
the figure is new tokens per second each way, and their ratio; samples per second are printed too.

Usage: .venv/bin/python benchmarks/agentic.py [--conditions 2] [--samples 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conditions", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="1 condition x 2 samples x 4 tokens, no goals (smoke)")
    args = parser.parse_args()
    if args.quick:
        args.conditions, args.samples, args.max_tokens = 1, 2, 4

    import torch

    from eval.scenarios import grid
    from msm.llm.local_backend import LocalBackend
    from msm.llm.types import Message, Request
    from msm.models import load_model

    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    conditions = [c for c in grid()[0] if c.goal == "none"][: args.conditions]
    requests = [Request(messages=(Message("user", c.user),), system=c.system, max_tokens=args.max_tokens,
                        temperature=1.0, seed=k, purpose="eval") for c in conditions for k in range(args.samples)]
    tokenizer = loaded[1]
    shown = LocalBackend(model=args.model, loaded=loaded)
    prompt_tokens = [len(tokenizer(shown.prompt_text(tokenizer, r), add_special_tokens=False).input_ids)
                     for r in requests[:: args.samples]]

    def timed(backend):
        start = time.perf_counter()
        out = asyncio.run(backend.call_many(requests, args.model))
        return out, time.perf_counter() - start

    timed(LocalBackend(model=args.model, loaded=loaded, batch_size=16))  # warm-up
    seq, seq_s = timed(LocalBackend(model=args.model, loaded=loaded, batch_size=1))
    bat, bat_s = timed(LocalBackend(model=args.model, loaded=loaded, batch_size=16))
    seq_tokens = sum(r.usage.output_tokens for r in seq)
    bat_tokens = sum(r.usage.output_tokens for r in bat)
    print(f"{len(conditions)} conditions x {args.samples} samples, prompts of {sum(prompt_tokens) / len(prompt_tokens):.0f} "
          f"tokens, max_tokens {args.max_tokens}")
    print(f"sequential: {seq_tokens} new tokens in {seq_s:.1f} s ({seq_tokens / seq_s:.2f} tokens/s, "
          f"{len(requests) / seq_s:.3f} samples/s)")
    print(f"batched: {bat_tokens} new tokens in {bat_s:.1f} s ({bat_tokens / bat_s:.2f} tokens/s, "
          f"{len(requests) / bat_s:.3f} samples/s)")
    print(f"agentic_batched_speedup = {(bat_tokens / bat_s) / (seq_tokens / seq_s):.3f}")


if __name__ == "__main__":
    main()
