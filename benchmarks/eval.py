"""Log-prob scoring of choice items (`msm eval run preferences`, logprob mode) with SmolLM2, against
the scorer a competent engineer writes first and against the model's raw forward speed.

All score the same chat-formatted contexts (each item in both A/B orders):
- one_pass: one forward pass per context, logits kept at the last position only, both letters
  read from that row (the answer letters are one token each);
- forward limit: the same contexts through the model in length-sorted, right-padded batches of
  up to 8 rows, logits at the last position only, nothing else: the tokens/s no scorer can beat
  without skipping tokens;
- msm: `LocalBackend.score` as `msm eval run` uses it (the shipped defaults): the prefix every
  context shares once, then the tails in length-sorted batches on its KV cache.

One_pass and msm must agree on every log-probability. They alternate for `--rounds` rounds and
medians are compared: on a shared 2-core machine one pass can vary by 30% from minute to minute.

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
    parser.add_argument("--quick", action="store_true", help="4 items, 1 round, no goals (smoke)")
    args = parser.parse_args()
    if args.quick:
        args.items, args.rounds = 4, 1

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

    assert all(len(letter) == 1 for letter in letters), "the letters must be one token each"
    encoded = [tok(c, add_special_tokens=False).input_ids for c in contexts]

    def one_pass() -> list[tuple[float, float]]:
        out = []
        for ids in encoded:
            logits = model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            out.append((float(logprobs[letters[0][0]]), float(logprobs[letters[1][0]])))
        return out

    def forward_limit() -> None:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), 8):
            rows = [encoded[i] for i in order[start:start + 8]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [tok.pad_token_id or 0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    backend = LocalBackend(model=args.model, loaded=(model, tok))

    def ours() -> list[tuple[float, float]]:
        scores = asyncio.run(backend.score([ScoreItem(c, ("A", "B")) for c in contexts], args.model))
        return [(s[0].total, s[1].total) for s in scores]

    def timed(scorer):
        start = time.perf_counter()
        result = scorer()
        return result, time.perf_counter() - start

    ours()  # warm-up
    tokens = sum(len(ids) for ids in encoded)
    base_times, ours_times, limit_times = [], [], []
    for _ in range(args.rounds):
        reference, seconds = timed(one_pass)
        base_times.append(seconds)
        fast, seconds = timed(ours)
        ours_times.append(seconds)
        limit_times.append(timed(forward_limit)[1])
    base_s, ours_s, limit_s = (statistics.median(t) for t in (base_times, ours_times, limit_times))
    worst = max(abs(a - b) for r, f in zip(reference, fast) for a, b in zip(r, f))
    assert worst < 1e-3, f"the two scorers disagree by {worst}"
    print(f"{len(items)} items x 2 orders, {tokens} context tokens ({mean_tokens:.0f} a context); "
          f"largest log-prob difference {worst:.2e}")
    print("rounds (s): one_pass " + ", ".join(f"{t:.2f}" for t in base_times) + "; msm "
          + ", ".join(f"{t:.2f}" for t in ours_times) + "; forward limit "
          + ", ".join(f"{t:.2f}" for t in limit_times))
    print(f"median one_pass: {base_s:.2f} s ({len(items) / base_s:.2f} items/s); msm: {ours_s:.2f} s "
          f"({len(items) / ours_s:.2f} items/s, {tokens / ours_s:.0f} tokens/s); forward limit {limit_s:.2f} s "
          f"({tokens / limit_s:.0f} tokens/s)")
    print(f"logprob_vs_one_pass = {base_s / ours_s:.3f}")
    print(f"logprob_vs_forward_limit = {limit_s / ours_s:.3f}")


if __name__ == "__main__":
    main()
