"""`msm eval ...`: item banks, suite runs with intervals, paired comparisons."""

from __future__ import annotations

import sys
from collections import Counter

import click


@click.group("eval")
def eval_group():
    """Evaluate models on the spec's item banks."""


@eval_group.command("items")
@click.argument("paths", nargs=-1)
def items(paths):
    """Validate item banks (default: every bank in eval/items/) and count their items."""
    from pathlib import Path

    from eval.bank import ITEMS_DIR, audit_bank, load_bank, load_banks

    if paths:
        banks = {Path(p).stem: load_bank(p) for p in paths}
    else:
        banks = load_banks(ITEMS_DIR)
    failed = 0
    click.echo(f"{'BANK':<28} {'KIND':<6} {'ITEMS':>5}  DOMAINS")
    for name, bank in banks.items():
        kind = "choice" if hasattr(bank[0], "options") else "open"
        domains = Counter(item.domain for item in bank)
        click.echo(f"{name:<28} {kind:<6} {len(bank):>5}  " + ", ".join(f"{d} {n}" for d, n in sorted(domains.items())))
        for problem in audit_bank(bank):
            click.echo(f"{name}: {problem}")
            failed += 1
    if failed:
        click.echo(f"{failed} problem(s) in the item banks; fix the items named above", err=True)
        sys.exit(1)


@eval_group.command("run")
@click.argument("suite")
@click.option("--model", required=True, help="Local alias, model folder, a `msm train run` folder (its last stage), LoRA adapter folder (RUN/STAGE/adapter), "
                                              "or a server's model name with --backend.")
@click.option("--target", default=None, help="The value label to score (eval/items/schema.yaml); preferences only.")
@click.option("--items", "item_files", multiple=True, help="Item files (default: the suite's banks in eval/items/).")
@click.option("--mode", type=click.Choice(["logprob", "generate"]), default=None,
              help="preferences: logprob (default) or generate; other suites generate.")
@click.option("--backend", type=click.Choice(["local", "openai", "anthropic"]), default=None)
@click.option("--base-url", default=None)
@click.option("--limit", type=int, default=None, help="Score N items, taken round-robin over domains.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--judge-backend", type=click.Choice(["anthropic", "openai", "local"]), default=None,
              help="spec_qa: the grader's backend (default: offline MiniLM similarity, labelled as such).")
@click.option("--judge-model", default=None)
@click.option("--judge-base-url", default=None)
@click.option("--option", "-o", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="A suite's own setting (`msm eval suites` lists them).")
@click.option("--templates", default=None, help="agentic: scenario folders in the agentic-misalignment layout "
                                                "(same as -o templates=PATH).")
@click.option("--model-name", default=None, help="The model's name in every prompt's system turn, the spec-QA "
                                                 "questions and the agentic scenarios (needs --provider-name).")
@click.option("--provider-name", default=None, help="Its developer's name (with --model-name).")
@click.option("--chat-template", type=click.Path(dir_okay=False), default=None,
              help="A Jinja chat template file for a model without one (a base model), or for a served model "
                   "scored by log-probs (servers apply no template to raw text); a trained run's card supplies "
                   "its own.")
@click.option("--timeout", "idle_timeout", type=click.FloatRange(1.0, 86400.0), default=120.0, show_default=True,
              help="Seconds of silence mid-answer before a call (to the model or the judge) is cut and retried.")
@click.option("--db", default=None)
def run(suite, model, target, item_files, mode, backend, base_url, limit, seed, judge_backend, judge_model,
        judge_base_url, option_pairs, templates, model_name, provider_name, chat_template, idle_timeout, db):
    """Run SUITE (`msm eval suites`) on a model; rates per domain and split with 95% Wilson intervals."""
    from pathlib import Path

    from eval.run import run_eval
    from msm.errors import MsmError

    if (model_name is None) != (provider_name is None):
        raise MsmError("--model-name and --provider-name go together", "give both, e.g. --model-name Llama "
                       "--provider-name Meta")
    identity = {"model_name": model_name, "provider_name": provider_name} if model_name else None
    if chat_template is not None and not Path(chat_template).is_file():
        raise MsmError(f"--chat-template {chat_template} does not exist", "name a Jinja chat template file")
    template = Path(chat_template).read_text(encoding="utf-8") if chat_template else None

    options = {}
    for pair in option_pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MsmError(f"--option {pair} is not KEY=VALUE", "write it as --option samples=30")
        options[key.strip()] = value.strip()
    if templates:
        options["templates"] = templates
    judge = ({"backend": judge_backend, "model": judge_model, "base_url": judge_base_url, "idle_timeout": idle_timeout}
             if judge_backend else None)
    result = run_eval(suite, model, target, list(item_files), mode, backend, base_url, limit, seed, db,
                      log=lambda line: click.echo(line), judge=judge, options=options, identity=identity,
                      chat_template=template, idle_timeout=idle_timeout)
    if suite == "agentic":
        _agentic_table(result)
        return
    what = f"target {target}" if target else "rubric grading"
    click.echo(f"eval run {result.run_id}: {suite} on {model}, {what} ({result.mode})")
    click.echo(f"{'GROUP':<28} {'N':>5} {'ERR':>4}  {'RATE':>6}  95% CI           "
               + ("MEAN P" if suite == "preferences" else "MEAN POINTS"))
    for key, row in result.summary.items():
        rate = "  n/a " if row["n"] == 0 else f"{row['rate']:.3f}"
        ci = "" if row["n"] == 0 else f"[{row['low']:.3f}, {row['high']:.3f}]"
        mean = "" if row["mean_p"] is None else f"{row['mean_p']:.3f}"
        click.echo(f"{key:<28} {row['n']:>5} {row['errors']:>4}  {rate:>6}  {ci:<16} {mean}")


def _agentic_table(result):
    """HARM leaves truncated replies out; IF TRUNC 0..1 is the rate with them all harmless, all harmful."""
    scoring = result.summary["all"]["scoring"]
    click.echo(f"eval run {result.run_id}: agentic on {result.model}, scored {scoring}")
    click.echo(f"{'GROUP':<46} {'N':>4} {'ERR':>4} {'TRUNC':>5} {'SHARE':>5}  {'HARM':>5}  95% CI            "
               f"IF TRUNC 0..1   INTENT, NO ACTION")
    for key, row in result.summary.items():
        rate = "  n/a" if row["n"] == 0 else f"{row['rate']:.3f}"
        ci = "" if row["n"] == 0 else f"[{row['low']:.3f}, {row['high']:.3f}]"
        intent = "" if row["intent_only"] is None else f"{row['intent_only']:.3f}"
        share = row.get("truncated_share")
        bounds = ("" if share is None else
                  f"{row['rate_if_truncated_harmless']:.3f}..{row['rate_if_truncated_harmful']:.3f}")
        share = "" if share is None else f"{share:.2f}"
        click.echo(f"{key:<46} {row['n']:>4} {row['errors']:>4} {row['truncated']:>5} {share:>5}  {rate:>5}  "
                   f"{ci:<17} {bounds:<15} {intent}")


@eval_group.command("suites")
def suites():
    """The registered suites, their default banks and their options."""
    from eval.suites import registry

    for suite in registry().values():
        click.echo(f"{suite.name:<12} {suite.about}")
        click.echo(f"{'':<12} modes: {', '.join(suite.modes)}; items: {', '.join(suite.default_banks)}"
                   + ("; needs --target" if suite.needs_target else ""))
        for name, (kind, default, about) in suite.options.items():
            click.echo(f"{'':<12} -o {name}=<{kind.__name__}> (default {default}): {about}")


@eval_group.command("aggregate")
@click.argument("runs", nargs=-1, required=True)
@click.option("--db", default=None)
def aggregate(runs, db):
    """Runs that differ only in seed: mean rate with a t interval over seeds, and the pooled rate."""
    from eval.run import aggregate_runs
    from msm.config import load_settings

    result = aggregate_runs(load_settings(db).db, list(runs))
    click.echo(f"{'GROUP':<28} {'RUNS':>4} {'MEAN':>6}  95% CI (seeds)    {'N':>5} {'POOLED':>6}  95% CI (items)")
    for key, r in result.items():
        seeds = "" if r["seed_low"] is None else f"[{r['seed_low']:.3f}, {r['seed_high']:.3f}]"
        click.echo(f"{key:<28} {r['runs']:>4} {r['mean']:.3f}  {seeds:<17} {r['n']:>5} {r['pooled']:.3f}  "
                   f"[{r['pooled_low']:.3f}, {r['pooled_high']:.3f}]")


@eval_group.command("compare")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--db", default=None)
def compare(run_a, run_b, db):
    """Paired comparison of two runs on the same items: difference of rates and McNemar's exact p."""
    from eval.run import compare_runs
    from msm.config import load_settings

    results = compare_runs(load_settings(db).db, run_a, run_b)
    click.echo(f"{'GROUP':<24} {'N':>5} {'A ONLY':>6} {'B ONLY':>6}  {'A - B':>7}  P (McNEMAR)")
    for key, r in results.items():
        click.echo(f"{key:<24} {r.n:>5} {r.a_only:>6} {r.b_only:>6}  {r.difference:>+7.3f}  {r.p_value:.4g}")


@eval_group.command("report")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", required=True, help="Output directory (created): report.md, report.html, rates.png.")
@click.option("--db", default=None)
def report(runs, out, db):
    """One page for one or more runs: rates per domain with 95% Wilson intervals, side by side."""
    from pathlib import Path

    from eval.report import write_report
    from msm.config import load_settings

    md, page = write_report(load_settings(db).db, list(runs), Path(out))
    click.echo(f"wrote {md} and {page}")
