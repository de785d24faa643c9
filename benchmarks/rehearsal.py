"""The paper-scale rehearsal: an experiment's paper profile at full size against the simulated model.

`msm experiment run FILE --profile paper --simulate` does the work (msm/rehearsal.py); this script
runs it (or reuses what an earlier run finished: a rehearsal resumes like any experiment) and reads
the figures back from the rehearsal's own warehouse, its build logs and what the simulator billed:

- rehearsal_kept_tokens_vs_target_<arm>: a corpus's kept tokens over its target; the minimum under
  rehearsal_kept_tokens_vs_target (want >= 0.98);
- rehearsal_demos_vs_target_<set>: kept demonstrations over n; minimum rehearsal_demos_vs_target
  (want >= 1.0);
- rehearsal_rows_with_ideas: the share of brainstormed plan rows that got an idea (want >= 0.99);
- rehearsal_plan_vs_billed_cost: `--plan`'s expected cost of the steps run, over what the simulator
  billed at msm's price table (want 0.9-1.1);
- rehearsal_peak_rss_gb, rehearsal_wall_min (with the minutes per step kind and per build stage),
  rehearsal_warehouse_mb_per_m_tokens.

Usage: .venv/bin/python benchmarks/rehearsal.py --experiment cheese [--steps corpus,demos] [--quick]
(--quick: a hundredth of the counts, as `make smoke` runs it; thresholds are then not checked)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

GOALS = {"rehearsal_kept_tokens_vs_target": (0.98, None), "rehearsal_demos_vs_target": (1.0, None),
         "rehearsal_rows_with_ideas": (0.99, None), "rehearsal_plan_vs_billed_cost": (0.9, 1.1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="cheese", help="a name under experiments/ (cheese, aft_scaling...)")
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--steps", default=None, help="step kinds to run (and what they need); default all")
    parser.add_argument("--quick", action="store_true", help="a hundredth of the counts; no thresholds")
    parser.add_argument("--time-scale", type=float, default=200.0)
    args = parser.parse_args()

    from msm.rehearsal import Rehearsal, billed_usd, rehearse

    path = ROOT / "experiments" / f"{args.experiment}.yaml"
    kinds = tuple(k for k in (args.steps or "").split(",") if k)
    settings = Rehearsal(scale=0.01 if args.quick else 1.0, time_scale=args.time_scale, kinds=kinds)
    started = time.monotonic()
    exp, outcome, _, home = rehearse(path, args.profile, settings, log=lambda s: print(s, flush=True),
                                     progress=False)
    wall = time.monotonic() - started
    figures, expected = collect(exp, outcome, home)
    figures["rehearsal_plan_vs_billed_cost"] = round(expected / max(billed_usd(home), 1e-9), 3)
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    figures["rehearsal_peak_rss_gb"] = round(rss / 1024 ** 2, 2)  # ru_maxrss is in kB on Linux
    figures["rehearsal_this_run_wall_min"] = round(wall / 60, 1)
    print(f"\nrehearsal of {exp.name} ({exp.profile}) in {home}")
    for name, value in figures.items():
        print(f"{name} {value}")
    if not args.quick:
        missed = [f"{k} {figures[k]} (want {lo if hi is None else f'{lo}-{hi}'})" for k, (lo, hi) in GOALS.items()
                  if k in figures and isinstance(figures[k], (int, float))
                  and (figures[k] < lo or (hi is not None and figures[k] > hi))]
        if missed:
            print("goals missed: " + "; ".join(missed))


def collect(exp, outcome, home: Path) -> tuple[dict, float]:
    """(the figures, from the warehouse the rehearsal wrote; the plan's expected USD of its data steps)."""
    import duckdb

    from msm.experiment_estimate import estimate_steps
    from pipelines.target import parse_tokens

    figures: dict = {}
    steps = outcome.steps
    outputs = outcome.outputs
    kept, demos, ideas, expected, tokens = [], [], [], 0.0, 0
    estimates = estimate_steps(exp, steps)
    for step in steps:
        out = outputs.get(step.key) or {}
        e = estimates[step.key]
        if step.kind in ("corpus", "ablation", "demos"):
            expected += getattr(e, "expected_usd", None) or e.cost_usd
        if step.kind == "corpus":
            target = step.inputs["options"].get("tokens")
            if step.work.get("match"):  # token-matched: its target is the reference corpus's kept tokens
                target = (outputs.get(step.work["match"]) or {}).get("tokens")
            if target:
                ratio = out.get("tokens", 0) / parse_tokens(target)
                figures[f"rehearsal_kept_tokens_vs_target_{step.arm}"] = round(ratio, 4)
                kept.append(ratio)
            tokens += out.get("tokens", 0)
        elif step.kind == "ablation":
            for condition, made in out.items():
                figures[f"rehearsal_kept_tokens_{step.work['name']}_{condition}"] = made.get("tokens")
                tokens += made.get("tokens", 0)
        elif step.kind == "demos":
            ratio = out.get("kept", 0) / step.inputs["options"]["n"]
            figures[f"rehearsal_demos_vs_target_{step.work['name'].split('-')[-1]}"] = round(ratio, 4)
            demos.append(ratio)
    if kept:
        figures["rehearsal_kept_tokens_vs_target"] = round(min(kept), 4)
    if demos:
        figures["rehearsal_demos_vs_target"] = round(min(demos), 4)
    con = duckdb.connect(str(home / "msm.duckdb"), read_only=True)
    try:
        row = con.execute("SELECT count(*), count(idea) FROM plan_rows WHERE build_id IN "
                          "(SELECT DISTINCT build_id FROM plan_ideas)").fetchone()
        if row[0]:
            ideas.append(row[1] / row[0])
        seconds = con.execute("SELECT kind, sum(seconds) FROM experiment_steps WHERE status = 'complete' "
                              "GROUP BY kind").fetchall()
    finally:
        con.close()
    if ideas:
        figures["rehearsal_rows_with_ideas"] = round(ideas[0], 4)
    figures["rehearsal_wall_min"] = round(sum(s for _, s in seconds) / 60, 1)
    for kind, s in seconds:
        figures[f"rehearsal_wall_min_{kind}"] = round(s / 60, 1)
    for stage, s in sorted(build_stage_seconds(home).items(), key=lambda kv: -kv[1])[:8]:
        figures[f"rehearsal_build_min_{stage}"] = round(s / 60, 1)
    db_mb = (home / "msm.duckdb").stat().st_size / 1e6
    if tokens:
        figures["rehearsal_warehouse_mb_per_m_tokens"] = round(db_mb / (tokens / 1e6), 2)
    return figures, expected


def build_stage_seconds(home: Path) -> dict:
    """Seconds per pipeline step over every build, from datatrove's own stats files."""
    import re

    totals: dict = defaultdict(float)
    for path in (home / "builds").glob("*/**/stats.json"):
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for step in stats if isinstance(stats, list) else []:
            t = step.get("time_stats")
            seconds = t.get("total") if isinstance(t, dict) else t
            if isinstance(seconds, (int, float)) and seconds:
                name = re.sub(r"[^a-z0-9]+", "_", str(step.get("name", "")).split(":")[-1].strip().lower()).strip("_")
                totals[name] += seconds
    return totals


if __name__ == "__main__":
    main()
