"""Matched ablation corpora at scale: 2 conditions x 1,000 cells against the loopback server.

`build_ablation` on specs/value_augmented.md with attribution and co-occurrence, against the
loopback Anthropic server at zero latency: planning, the datatrove pipeline for 2,000 documents
(generate, filters, judge with the condition checks), MinHash within each condition, the load, then
cell matching and token matching. The loopback's filler prose carries a causal word in some
documents and not others, so its stand-in judge drops a realistic share of each condition.

Run: .venv/bin/python benchmarks/ablation.py [--cells 1000] [--output-tokens 90]
The figures come last, one a line, as `name = value`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEY = "sk-bench"
MODEL = "claude-sonnet-4-6"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=1000, help="cells; each is built under both conditions")
    parser.add_argument("--output-tokens", type=int, default=90)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="msm-bench-ablation-"))
    os.environ.update(MSM_HOME=str(home), ANTHROPIC_API_KEY=KEY)
    os.environ.pop("MSM_NO_SPEND", None)

    from msm.llm.testing import LoopbackServer
    from pipelines.ablate import build_ablation
    from pipelines.build import BuildOptions

    with LoopbackServer(api_key=KEY, latency=0.0, output_tokens=args.output_tokens, judge_fail_rate=0.0) as server:
        opts = BuildOptions(docs=args.cells, backend="anthropic", model=MODEL, base_url=server.url, progress=False,
                            concurrency=args.concurrency, dedup=("minhash",))
        started = time.perf_counter()
        result = build_ablation(str(ROOT / "specs" / "value_augmented.md"), opts, ("attribution", "cooccurrence"))
        seconds = time.perf_counter() - started

    build = result.rounds[0]
    print(f"{result.cells} cells x 2 conditions = {build.planned} documents in {seconds:.1f} s "
          f"(build {build.seconds:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in build.stage_seconds.items()) + ")")
    for r in result.reports:
        print(f"  {r.condition:<13} kept {r.kept:>4}/{r.planned}  check failed {r.failed_check}/{r.checked} "
              f"({r.guard})  matched {r.matched_docs} docs, {r.matched_tokens:,} tokens")
    print(f"  cells kept under both: {result.cells_kept_everywhere}; matched {result.matched_cells}; "
          f"lost to token matching {result.lost_to_matching}")
    print(f"ablation_build_s = {seconds:.1f}")
    print(f"ablation_token_match_error = {result.token_error:.4f}")


if __name__ == "__main__":
    main()
