"""Matched ablation corpora at scale: 2 conditions x 1,000 cells against the loopback server.

`build_ablation` on specs/value_augmented.md with attribution and co-occurrence, against the
loopback Anthropic server at zero latency: planning, the datatrove pipeline for 2,000 documents
(generate, filters, judge with the condition checks), MinHash within each condition, the load, then
cell matching and token matching.

The loopback is pinned here: its judge passes each document's condition check with probability
PASS = 0.9 (drawn per judge prompt, independently of the document's words and of every other
criterion), every other criterion passes, and documents run 90 to 144 tokens. A cell survives when
its document is kept under both conditions, so of the cells whose two documents reached the check
PASS ** 2 = 0.81 are expected to survive; `ablation_cell_yield_vs_expected` is the observed number
over that expectation. Anything else that drops a document after its check passed (near-duplicates,
exact twins, decontamination) shows up as a ratio below 1, and is broken down by reason.

Run: .venv/bin/python benchmarks/ablation.py [--cells 1000] [--output-tokens 90] [--quick]
The figures come last, one a line, as `name = value`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEY = "sk-bench"
MODEL = "claude-sonnet-4-6"
PASS = 0.9  # the loopback judge's pinned pass probability for each condition check
CONDITIONS = ("attribution", "cooccurrence")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=1000, help="cells; each is built under both conditions")
    parser.add_argument("--output-tokens", type=int, default=90)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="60 cells, no goals (smoke)")
    args = parser.parse_args()
    cells = 60 if args.quick else args.cells

    home = Path(tempfile.mkdtemp(prefix="msm-bench-ablation-"))
    os.environ.update(MSM_HOME=str(home), ANTHROPIC_API_KEY=KEY)
    os.environ.pop("MSM_NO_SPEND", None)

    import duckdb

    from msm.errors import MsmError
    from msm.llm.testing import LoopbackServer
    from pipelines.ablate import build_ablation, relative_gap
    from pipelines.build import BuildOptions

    with LoopbackServer(api_key=KEY, latency=0.0, output_tokens=args.output_tokens, judge_fail_rate=0.0) as server:
        server.link_check_pass_rate = PASS
        server.vary_repeats = True  # replicate cells get distinct samples, as a real model at temperature 1 writes
        server.length_spread = 0.6  # 90 to 144 tokens: token matching has real gaps to close
        opts = BuildOptions(docs=cells, backend="anthropic", model=MODEL, base_url=server.url, progress=False,
                            concurrency=args.concurrency, dedup=("minhash",))
        started = time.perf_counter()
        try:
            result = build_ablation(str(ROOT / "specs" / "value_augmented.md"), opts, CONDITIONS)
            error = None
        except MsmError as exc:  # token matching out of tolerance: the figures below still say how far
            result, error = None, exc
        seconds = time.perf_counter() - started

    con = duckdb.connect(str(home / "msm.duckdb"), read_only=True)
    guards = {"attribution": "attributes_behaviour_to_value", "cooccurrence": "no_link_between_value_and_behaviour"}
    rows = con.execute(
        "SELECT p.cell_id, p.condition, coalesce(d.status, p.status), coalesce(d.drop_reason, p.reason), d.n_tokens, "
        "j.verdict FROM plan_rows p LEFT JOIN documents d ON d.build_id = p.build_id AND d.plan_row_id = p.id "
        "LEFT JOIN judgments j ON j.subject_kind = 'document' AND j.subject_id = d.id AND j.criterion = "
        "CASE p.condition WHEN 'attribution' THEN ? ELSE ? END WHERE p.cell_id IS NOT NULL",
        [guards["attribution"], guards["cooccurrence"]]).fetchall()
    per_cell: dict[str, dict[str, tuple]] = {}
    for cell, condition, status, reason, n_tokens, verdict in rows:
        per_cell.setdefault(cell, {})[condition] = (status, reason, n_tokens or 0, verdict)
    reached = [c for c, per in per_cell.items() if all(per.get(k, (0, 0, 0, None))[3] is not None for k in CONDITIONS)]
    passed = [c for c in reached if all(per_cell[c][k][3] for k in CONDITIONS)]
    kept = [c for c, per in per_cell.items() if all(per.get(k, ("",))[0] == "kept" for k in CONDITIONS)]
    expected = PASS ** 2 * len(reached)
    sd = math.sqrt(len(reached) * PASS ** 2 * (1 - PASS ** 2))
    checks = Counter((k, per[k][3]) for per in per_cell.values() for k in CONDITIONS if per.get(k, (0, 0, 0, None))[3] is not None)
    before = Counter(per[k][1] for c, per in per_cell.items() if c not in reached for k in CONDITIONS
                     if per.get(k, (0, 0, 0, None))[3] is None)
    after = Counter(per_cell[c][k][1] for c in passed for k in CONDITIONS if per_cell[c][k][0] != "kept")
    print(f"{len(per_cell)} cells x 2 conditions in {seconds:.1f} s")
    if result is not None:
        build = result.rounds[0]
        print(f"  build {build.seconds:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in build.stage_seconds.items()))
    for k in CONDITIONS:
        n_true, n_false = checks[(k, True)], checks[(k, False)]
        print(f"  {k:<13} condition check passed {n_true} of {n_true + n_false} "
              f"({n_true / max(1, n_true + n_false):.3f}; pinned {PASS})")
    print(f"  cells whose two documents reached the check: {len(reached)} (documents stopped before it: "
          f"{dict(before.most_common())})")
    print(f"  cells passing both checks: {len(passed)}; kept under both: {len(kept)}; expected "
          f"{PASS ** 2:.2f} x {len(reached)} = {expected:.1f} (binomial sd {sd:.1f})")
    print(f"  documents dropped after passing their check, in cells that passed both: {dict(after.most_common())}")
    if result is not None:
        print(f"  matched {result.matched_cells} cells (lost to token matching {result.lost_to_matching}); "
              f"kept tokens: " + ", ".join(f"{r.condition} {r.matched_tokens:,}" for r in result.reports))
        token_error = result.token_error
    else:
        print(f"  token matching failed: {error}")
        totals = [sum(per_cell[c][k][2] for c in kept) for k in CONDITIONS]
        token_error = relative_gap(totals) if kept else math.inf
    print(f"ablation_build_s = {seconds:.1f}")
    print(f"ablation_cell_yield_vs_expected = {len(kept) / expected if expected else 0.0:.3f}")
    print(f"ablation_token_match_error = {token_error:.4f}")


if __name__ == "__main__":
    main()
