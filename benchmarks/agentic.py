"""Batched generation of the agentic suite against a sequential loop that reuses the prompt's KV cache.

The agentic suite asks N samples of each condition's inbox (one long prompt, the protocol's
temperature). Both sides prefill each inbox once, so the figure measures batching alone:
- reuse (the baseline a competent engineer writes without batching): one prefill of the inbox,
  then each sample decodes alone on a copy of that KV cache, through `model.generate`;
- msm: the suite's path, `LocalBackend()` with its shipped batch size: the samples of one prompt
  share one prefill, whose cache is copied to every row of a batch, and decode together.

Samples stop at their own end of turn, so the two sides need not make the same number of tokens:
the figure is new tokens per second each way, and their ratio (`agentic_batched_vs_reuse`, goal
>= 2 with 256-token answers).

Usage: .venv/bin/python benchmarks/agentic.py [--conditions 1] [--samples 30] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]


def reuse_baseline(model, tokenizer, prompt: str, samples: int, max_tokens: int, temperature: float) -> int:
    """Prefill once, then one sample at a time on a copy of the cache; returns new tokens made."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    cache = model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1).cache
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    made = 0
    for k in range(samples):
        torch.manual_seed(k)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=copy.deepcopy(cache),
                             max_new_tokens=max_tokens, do_sample=True, temperature=temperature,
                             pad_token_id=tokenizer.pad_token_id)
        for tok in out[0, ids.shape[1]:].tolist():
            if tok in eos:
                break
            made += 1
    return made


def main() -> None:
    from eval.suites.agentic import protocol

    parser = argparse.ArgumentParser()
    parser.add_argument("--conditions", type=int, default=1)
    parser.add_argument("--samples", type=int, default=protocol()["samples"], help="per condition (the suite's N)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="1 condition x 3 samples x 8 tokens, no goals (smoke)")
    args = parser.parse_args()
    if args.quick:
        args.conditions, args.samples, args.max_tokens = 1, 3, 8
    temperature = protocol()["temperature"]

    import torch

    from eval.scenarios import grid
    from msm.llm.local_backend import LocalBackend
    from msm.llm.types import Message, Request
    from msm.models import load_model

    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    model, tokenizer = loaded
    conditions = [c for c in grid()[0] if c.goal == "none"][: args.conditions]
    requests = [Request(messages=(Message("user", c.user),), system=c.system, max_tokens=args.max_tokens,
                        temperature=temperature, seed=k, purpose="eval") for c in conditions for k in range(args.samples)]
    shipped = LocalBackend(model=args.model, loaded=loaded)
    prompts = [shipped.prompt_text(tokenizer, r) for r in requests[:: args.samples]]
    prompt_tokens = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]

    reuse_baseline(model, tokenizer, prompts[0], 1, 4, temperature)  # warm-up
    start = time.perf_counter()
    reuse_tokens = sum(reuse_baseline(model, tokenizer, p, args.samples, args.max_tokens, temperature) for p in prompts)
    reuse_s = time.perf_counter() - start
    start = time.perf_counter()
    out = asyncio.run(shipped.call_many(requests, args.model))
    msm_s = time.perf_counter() - start
    msm_tokens = sum(r.usage.output_tokens for r in out)
    cut = sum(r.stop_reason == "max_tokens" for r in out)

    print(f"{len(conditions)} condition(s) x {args.samples} samples, prompts of "
          f"{sum(prompt_tokens) / len(prompt_tokens):.0f} tokens, max_tokens {args.max_tokens}, temperature "
          f"{temperature}, shipped batch size {shipped.batch_size}; msm samples cut at max_tokens: {cut}/{len(out)}")
    print(f"reuse: {reuse_tokens} new tokens in {reuse_s:.1f} s ({reuse_tokens / reuse_s:.2f} tokens/s)")
    print(f"msm:   {msm_tokens} new tokens in {msm_s:.1f} s ({msm_tokens / msm_s:.2f} tokens/s)")
    ratio = (msm_tokens / msm_s) / (reuse_tokens / reuse_s)
    goal = "" if args.quick else f" (goal >= 2: {'met' if ratio >= 2 else 'NOT met'})"
    print(f"agentic_batched_vs_reuse = {ratio:.3f}{goal}")


if __name__ == "__main__":
    main()
