"""Log-prob scoring of choice items against the naive scorer, in items per second, with SmolLM2.

Both score the same items in both A/B orders and must agree on every log-probability.
- naive: one forward pass per option per order over the whole chat-formatted context plus the
  option letter, with logits for every position (what a first implementation does);
- msm: `LocalBackend.score` as `msm eval run` uses it: one pass per order over the shared context
  with only the last position's logits (`logits_to_keep=1`), every option read from that one row.

Usage: .venv/bin/python benchmarks/eval.py [--items 24]
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
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    import torch

    from eval.bank import ITEMS_DIR, load_bank
    from eval.preferences import render
    from msm.llm.base import ScoreItem
    from msm.llm.local_backend import LocalBackend
    from msm.models import load_model

    torch.set_grad_enabled(False)
    model, tok = load_model(args.model)
    model.eval()
    items = load_bank(ITEMS_DIR / "affordability_comparisons.jsonl")[: args.items]
    contexts = [tok.apply_chat_template([{"role": "user", "content": render(item, swapped)}], tokenize=False,
                                        add_generation_prompt=True) for item in items for swapped in (False, True)]
    letters = [tok("A", add_special_tokens=False).input_ids, tok("B", add_special_tokens=False).input_ids]
    mean_tokens = sum(len(tok(c, add_special_tokens=False).input_ids) for c in contexts) / len(contexts)

    def naive() -> list[tuple[float, float]]:
        out = []
        for context in contexts:
            ctx = tok(context, add_special_tokens=False).input_ids
            pair = []
            for letter in letters:
                ids = torch.tensor([ctx + letter])
                logits = model(input_ids=ids).logits[0]  # every position's logits
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                pair.append(float(sum(logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(letter))))
            out.append(tuple(pair))
        return out

    backend = LocalBackend(model=args.model, loaded=(model, tok))

    def ours() -> list[tuple[float, float]]:
        scores = asyncio.run(backend.score([ScoreItem(c, ("A", "B")) for c in contexts], args.model))
        return [(s[0].total, s[1].total) for s in scores]

    naive()[:1], ours()[:1]  # warm-up
    start = time.perf_counter()
    reference = naive()
    naive_s = time.perf_counter() - start
    start = time.perf_counter()
    fast = ours()
    ours_s = time.perf_counter() - start
    worst = max(abs(a - b) for r, f in zip(reference, fast) for a, b in zip(r, f))
    assert worst < 1e-3, f"the two scorers disagree by {worst}"
    print(f"{len(items)} items x 2 orders, contexts of {mean_tokens:.0f} tokens on average; "
          f"largest log-prob difference {worst:.2e}")
    print(f"naive: {naive_s:.2f} s ({len(items) / naive_s:.2f} items/s); msm: {ours_s:.2f} s "
          f"({len(items) / ours_s:.2f} items/s)")
    print(f"logprob_speedup_vs_naive = {naive_s / ours_s:.3f}")


if __name__ == "__main__":
    main()
