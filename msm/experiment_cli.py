"""`msm experiment run|report|list`: a matrix of arms from one YAML file, every step cached."""

from __future__ import annotations

import os

import click

from msm.cli_util import db_option

profile_option = click.option("--profile", default=None,
                              help="A profile of the file (smoke, paper...); default: the first it lists.")


def _load(file, profile, db):
    from msm.experiment_config import load_experiment

    if db:
        os.environ["MSM_DB"] = str(db)  # every stage the runner calls reads the same warehouse
    return load_experiment(file, profile)


@click.group("experiment")
def experiment_group():
    """Experiments: arms (spec, corpus, demos, training, seeds) x eval suites, one report."""


@experiment_group.command("run")
@click.argument("file", type=click.Path(dir_okay=False))
@profile_option
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the steps, which are cached, and the projected tokens, cost and device hours; run nothing.")
@click.option("--no-report", is_flag=True, help="Skip writing the report at the end.")
@click.option("--steps", default=None,
              help="Run only these step kinds (comma-separated: corpus, ablation, demos, train, eval) and what they "
                   "need.")
@click.option("--simulate", is_flag=True,
              help="Rehearse the profile at full size on this machine: every model call goes to a simulated "
                   "frontier model (`msm llm simulate`), training and evals use a tiny random model, in a home of "
                   "its own under $MSM_HOME/rehearsals. Spends nothing.")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="With --simulate: multiply every count (tokens, documents, demonstrations, budgets) by this.")
@click.option("--time-scale", type=float, default=200.0, show_default=True,
              help="With --simulate: divide the simulated model's durations (latency, batch processing, rate-limit "
                   "windows) and the client's batch polls by this.")
@db_option
def run(file, profile, plan_only, no_report, steps, simulate, scale, time_scale, db):
    """Run every step not already done (each keyed by the hash of its inputs), then write the report."""
    from msm.experiment import KINDS, run_experiment

    from msm.errors import MsmError

    kinds = tuple(k.strip() for k in steps.split(",") if k.strip()) if steps else ()
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise MsmError(f"--steps: no step kind '{unknown[0]}'", f"use some of: {', '.join(KINDS)}")
    if not simulate and (scale != 1.0 or time_scale != 200.0):
        raise MsmError("--scale and --time-scale apply only with --simulate", "add --simulate, or drop them")
    if simulate:
        _rehearse(file, profile, kinds, scale, time_scale, plan_only)
        return
    exp = _load(file, profile, db)
    if plan_only:
        _print_plan(exp)
        return
    outcome = run_experiment(exp, log=click.echo, kinds=kinds or None)
    click.echo(f"experiment {exp.name} ({exp.profile}): {len(outcome.ran)} step(s) run, {len(outcome.reused)} "
               f"cached, {outcome.seconds:.1f} s  (run {outcome.run_id})")
    if not no_report:
        _report(exp, outcome.steps, outcome.outputs, None)


def _rehearse(file, profile, kinds, scale, time_scale, plan_only):
    from msm.rehearsal import Rehearsal, load_rehearsal, rehearse

    settings = Rehearsal(scale=scale, time_scale=time_scale, kinds=kinds)
    if plan_only:
        _print_plan(load_rehearsal(file, profile, "http://127.0.0.1:0", settings))
        return
    exp, outcome, billed, home = rehearse(file, profile, settings, log=click.echo)
    click.echo(f"rehearsal {exp.name} ({exp.profile}): {len(outcome.ran)} step(s) run, {len(outcome.reused)} "
               f"cached, {outcome.seconds:.1f} s; simulator: {billed.get('answered', 0):,} answers, "
               f"{billed.get('batches_created', 0)} batches; home {home}")


def _report(exp, steps, outputs, out):
    from pathlib import Path

    from msm.config import load_settings
    from msm.experiment_report import report_dir, write_report

    path = write_report(exp, steps, outputs, load_settings().db, Path(out) if out else report_dir(exp))
    click.echo(f"report: {path} (and report.html, PNGs beside it)")


@experiment_group.command("report")
@click.argument("file", type=click.Path(dir_okay=False))
@profile_option
@click.option("--out", default=None, help="Folder for report.md, report.html and PNGs "
                                          "(default: $MSM_HOME/experiments/NAME/PROFILE/report).")
@db_option
def report(file, profile, out, db):
    """Write the one-page report from the steps done so far (runs nothing)."""
    from msm.errors import MsmError
    from msm.experiment import cached, plan_steps

    exp = _load(file, profile, db)
    steps = plan_steps(exp)
    outputs = cached(steps)
    if not any(s.kind == "eval" and s.key in outputs for s in steps):
        raise MsmError(f"no eval of experiment '{exp.name}' (profile {exp.profile}) has run yet",
                       f"run `msm experiment run {file}{f' --profile {exp.profile}' if profile else ''}` first")
    _report(exp, steps, outputs, out)


@experiment_group.command("list")
@click.option("--folder", default="experiments", show_default=True)
def list_files(folder):
    """The experiment files in a folder, with their arms and profiles."""
    from msm.experiment import experiment_files
    from msm.experiment_config import load_experiment

    files = experiment_files(folder)
    if not files:
        click.echo(f"no experiment files in {folder}/")
    for path in files:
        exp = load_experiment(path)
        click.echo(f"{path}  {exp.name}: {len(exp.arms)} arms ({', '.join(a.name for a in exp.arms)}); "
                   f"evals {', '.join(exp.evals)}; profiles {', '.join(exp.profiles)}")


def _print_plan(exp) -> None:
    from msm.experiment import cached, plan_steps
    from msm.experiment_estimate import device, estimate_steps

    steps = plan_steps(exp)
    done = cached(steps)
    est = estimate_steps(exp, steps)
    dev = device(exp.device)
    click.echo(f"experiment {exp.name} (profile {exp.profile}) from {exp.source}: {len(steps)} steps, "
               f"{len(done)} cached; device: {dev['label']}")
    click.echo(f"{'STEP':<46} {'KEY':<12} {'STATUS':<7} {'TOKENS':>14} {'USD':>10} {'HOURS':>9}  WHAT")
    todo = [s for s in steps if s.key not in done]
    for s in steps:
        e = est[s.key]
        click.echo(f"{s.label[:46]:<46} {s.key[:12]:<12} {'cached' if s.key in done else 'to run':<7} "
                   f"{e.tokens:>14,} {e.cost_usd:>10.2f} {e.hours:>9.3f}  {e.note}")
    tokens = sum(est[s.key].tokens for s in todo if s.kind in ("corpus", "ablation"))
    trained = sum(est[s.key].tokens for s in todo if s.kind == "train")
    cost = sum(est[s.key].cost_usd for s in todo)
    hours = sum(est[s.key].hours for s in todo)
    click.echo(f"to run: {len(todo)} step(s); corpus tokens {tokens:,}; training tokens {trained:,}; "
               f"${cost:,.2f} (upper bound, msm/llm/prices.yaml); {hours:,.2f} {dev['hour_label']} "
               "(msm/throughput.yaml)")
