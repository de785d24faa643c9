"""Training loop speed against the hardware's limit, and packing against length-grouped padding.

- train_loop_vs_raw: tokens/s of `train.loop.train_stage` divided by tokens/s of a bare
  forward + backward + AdamW step on the same model, batch, sequence length and loss function,
  measured in this run. The bare figure is what the hardware can do; the ratio is what the loop's
  bookkeeping (data order, collation, masks, logging, the progress bar) costs.
- chunked_loss_vs_model_loss (reference): the bare step with the loop's loss (`train.loss`, the
  vocabulary projected a chunk of positions at a time) against the same step taking the model's
  own loss (the full logits tensor), alternated step by step.
- packing_vs_length_grouped: effective (non-pad) tokens/s of the loop on packed documents divided
  by the same on padded batches grouped by length (the documents sorted by length, cut into
  batches, the batches shuffled: what a competent engineer writes when not packing), on documents
  whose lengths follow a long-tailed (log-normal) histogram like a real corpus's. Grouped batches
  differ in width, so the grouped arm is timed on batches spread evenly over the length order.
  The packed, grouped and random arms take turns for `--rounds` rounds (each round a warm-up step
  and the timed steps of each arm), and each arm's tokens and seconds are summed over the rounds,
  so load that comes and goes during the run falls on every arm alike.
- pad_share_packed / pad_share_grouped / pad_share_random: the share of positions that are padding
  in the batches the loop builds over a whole epoch (collate's width x rows against its real
  tokens), for packing, length-grouped padding and one randomly ordered document per row.
- packing_vs_padding (reference, the earlier baseline): the same against randomly ordered padded rows.

Model: SmolLM2-135M-Instruct with the paper's LoRA (r=64, alpha=128, every projection), fp32 on CPU.
Usage: .venv/bin/python benchmarks/train.py [--steps 3] [--rounds 3] [--batch 8] [--max-len 256] [--quick]
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


def pad_share(batches: list[list[dict]]) -> float:
    """Padding positions over all positions of these batches, as collate pads them (to the widest row)."""
    positions = sum(len(b) * max(len(e["input_ids"]) for e in b) for b in batches)
    real = sum(len(e["input_ids"]) for b in batches for e in b)
    return 1 - real / positions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="1 step, 64 documents of max_len 64, no goals (smoke)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.docs, args.max_len, args.batch, args.rounds = 1, 64, 64, 4, 1

    import torch

    from train.config import Adapter, Stage
    from train.data import collate, pack_documents
    from train.loop import Dist, _order, train_stage
    from train.loss import supervised_loss
    from train.run import _lora, load_base

    torch.manual_seed(0)
    model, tok = load_base(args.model, torch.float32, "cpu")
    model = _lora(model, Adapter())
    rng = random.Random(0)
    words = ("oversight honesty the model reports every action it takes and explains why people can check "
             "its work before anything irreversible happens").split()
    # long-tailed document lengths, in words: median ~110, a few past max_len
    mu = 4.7 if not args.quick else 3.3
    lengths = [max(8, min(4 * args.max_len, int(rng.lognormvariate(mu, 0.7)))) for _ in range(args.docs)]
    texts = [" ".join(rng.choice(words) for _ in range(n)) for n in lengths]
    packed = pack_documents(texts, tok, args.max_len, packing=True)
    padded = pack_documents(texts, tok, args.max_len, packing=False)
    # length-grouped: sorted by length, cut into batches of `batch`; the loop shuffles the batches
    by_length = sorted(padded.examples, key=lambda e: len(e["input_ids"]))
    groups = [by_length[i:i + args.batch] for i in range(0, len(by_length), args.batch)]
    stage = Stage("bench", "midtrain", corpus="x", max_len=args.max_len, batch_size=args.batch, lr=1e-4,
                  max_steps=args.steps + 1, warmup=0.0)

    # bare forward + backward + step on one fixed packed batch: the hardware limit
    batch = collate(packed.examples[: args.batch], tok.pad_token_id)
    real = batch.pop("real_tokens")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def raw_step(loss_of) -> float:
        start = time.perf_counter()
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def model_loss(m, b):
        return m(**b).loss

    raw_step(supervised_loss), raw_step(model_loss)  # warm-up
    times = {supervised_loss: 0.0, model_loss: 0.0}
    for _ in range(args.steps):  # alternated, so load that comes and goes falls on both alike
        for loss_of in times:
            times[loss_of] += raw_step(loss_of)
    raw_tps = real * args.steps / times[supervised_loss]
    model_loss_tps = real * args.steps / times[model_loss]

    def loop_run(examples, batch_size: int, steps: int, collate_fn) -> tuple[int, float]:
        """(tokens, seconds) of the real loop over `steps` steps, after one warm-up step."""
        with tempfile.TemporaryDirectory() as tmp:
            warm = Stage(**{**stage.__dict__, "batch_size": batch_size, "max_steps": 1})
            timed = Stage(**{**stage.__dict__, "batch_size": batch_size, "max_steps": steps})
            train_stage(model, examples, collate_fn, warm, Path(tmp) / "w", Dist(), 0, 10**9, 1, progress=False)
            result = train_stage(model, examples, collate_fn, timed, Path(tmp) / "s", Dist(), 1, 10**9, 1,
                                 progress=False)
        return result.tokens, result.seconds

    def rows(b):
        return collate(b, tok.pad_token_id)

    # grouped batches vary in width: time 2 x steps of them, spread evenly over the length order
    n_timed = min(len(groups), 2 * args.steps)
    timed_groups = [groups[round(k * (len(groups) - 1) / max(1, n_timed - 1))] for k in range(n_timed)]
    arms = {"packed": (packed.examples, args.batch, args.steps, rows),  # the same shape as the raw batch
            "grouped": (timed_groups, 1, n_timed, lambda b: collate(b[0], tok.pad_token_id)),
            "random": (padded.examples, args.batch, args.steps, rows)}
    done = {name: [0, 0.0] for name in arms}
    for _ in range(args.rounds):
        for name, arm in arms.items():
            tokens, seconds = loop_run(*arm)
            done[name][0] += tokens
            done[name][1] += seconds
    loop_packed, loop_grouped, loop_random = (done[name][0] / done[name][1] for name in arms)

    def epoch(examples) -> list[list[dict]]:  # the loop's batches over one epoch, in its order
        order = _order(len(examples), args.batch, 1, 0)
        return [[examples[i] for i in order[at:at + args.batch]] for at in range(0, len(order), args.batch)]

    shares = {"packed": pad_share(epoch(packed.examples)), "grouped": pad_share(groups),
              "random": pad_share(epoch(padded.examples))}
    timed_share = pad_share(timed_groups)
    print(f"documents: {len(texts)}, tokens {packed.real_tokens:,} ({padded.real_tokens:,} within max_len), "
          f"max_len {args.max_len}, batch {args.batch}")
    print(f"raw forward+backward+step: {raw_tps:.1f} tokens/s ({model_loss_tps:.1f} with the model's own loss); loop (packed): {loop_packed:.1f}; "
          f"loop (length-grouped padded, non-pad tokens): {loop_grouped:.1f} over {n_timed} batches of widths "
          f"{[max(len(e['input_ids']) for e in g) for g in timed_groups]} (their pad share {timed_share:.1%}); "
          f"{args.rounds} rounds; "
          f"loop (randomly ordered padded): {loop_random:.1f}")
    print("pad share over an epoch's batches: " + ", ".join(f"{k} {v:.2%}" for k, v in shares.items()))
    print(f"train_loop_vs_raw = {loop_packed / raw_tps:.3f}")
    print(f"packing_vs_length_grouped = {loop_packed / loop_grouped:.3f}")
    print(f"packing_vs_padding = {loop_packed / loop_random:.3f}")
    print(f"chunked_loss_vs_model_loss = {raw_tps / model_loss_tps:.3f}")
    print(f"pad_share_packed = {shares['packed']:.4f}")
    print(f"pad_share_grouped = {shares['grouped']:.4f}")
    print(f"pad_share_random = {shares['random']:.4f}")


if __name__ == "__main__":
    main()
