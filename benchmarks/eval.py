"""Log-prob scoring of choice items against the naive scorer, in items per second, with SmolLM2.

Both score the same items in both A/B orders and must agree on every log-probability.
- naive: one forward pass per option per order over the whole chat-formatted context plus the
  option letter, with logits for every position (what a first implementation does);
- msm: `LocalBackend.score` as `msm eval run` uses it: the prefix every context shares (chat
  template) once, then each context's tail in length-sorted batches on its KV cache, with logits
  only at the last position (both letters are read from that one row).

The two alternate for `--rounds` rounds and the median time of each is compared: on a shared
2-core machine one pass can vary by 30% from minute to minute.

Usage: .venv/bin/python benchmarks/eval.py [--items 24] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    import torch

    from eval.bank import ITEMS_DIR, load_bank
    from eval.suites.preferences import render
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

    def timed(scorer):
        start = time.perf_counter()
        result = scorer()
        return result, time.perf_counter() - start

    ours()  # warm-up
    naive_times, ours_times = [], []
    for _ in range(args.rounds):
        reference, seconds = timed(naive)
        naive_times.append(seconds)
        fast, seconds = timed(ours)
        ours_times.append(seconds)
    naive_s, ours_s = statistics.median(naive_times), statistics.median(ours_times)
    worst = max(abs(a - b) for r, f in zip(reference, fast) for a, b in zip(r, f))
    assert worst < 1e-3, f"the two scorers disagree by {worst}"
    print(f"{len(items)} items x 2 orders, contexts of {mean_tokens:.0f} tokens on average; "
          f"largest log-prob difference {worst:.2e}")
    print("rounds (s): naive " + ", ".join(f"{t:.1f}" for t in naive_times) + "; msm "
          + ", ".join(f"{t:.1f}" for t in ours_times))
    print(f"median naive: {naive_s:.2f} s ({len(items) / naive_s:.2f} items/s); msm: {ours_s:.2f} s "
          f"({len(items) / ours_s:.2f} items/s)")
    print(f"logprob_speedup_vs_naive = {naive_s / ours_s:.3f}")


if __name__ == "__main__":
    main()
