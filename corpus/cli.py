"""`msm spec ...`: show, check and record specs. Imports nothing heavy at module level."""

from __future__ import annotations

import json
import sys

import click

from msm.cli_util import db_option, parse_vars, var_option


@click.group("spec")
def spec_group():
    """Parse a Model Spec into units, validate it, record it in the warehouse."""


def _load(path: str, variables: tuple[str, ...]):
    from corpus.spec import load_spec

    return load_spec(path, parse_vars(variables))


@spec_group.command("show")
@click.argument("path")
@var_option
@click.option("--json", "as_json", is_flag=True, help="Emit the unit tree as JSON.")
@click.option("--max-depth", type=int, default=None, help="Only show units up to this depth.")
def show(path, variables, as_json, max_depth):
    """Print the style and the unit tree: id, kind, title and tokens of every unit."""
    spec = _load(path, variables)
    if as_json:
        click.echo(json.dumps(spec.to_json(), ensure_ascii=False, indent=1))
        return
    from msm.tokens import default_counter

    counter = default_counter()
    tokens = counter.count_many([u.text for u in spec.units])
    total = sum(tokens)
    note = "" if counter.exact else " (approximate; `msm models prepare` enables exact counts)"
    click.echo(f"{spec.name}  version {spec.version}  style: {spec.style}  {len(spec.units)} units  "
               f"{total:,} tokens by {counter.name}{note}")
    if spec.variables:
        click.echo("variables: " + ", ".join(f"{k}={v}" for k, v in spec.variables.items()))
    click.echo(f"{'LINES':>11}  {'KIND':<9} {'TOKENS':>6}  ID  TITLE")
    for unit, n in zip(spec.units, tokens):
        if max_depth is not None and unit.depth > max_depth:
            continue
        lines = f"{unit.span[0]}-{unit.span[1]}"
        title = unit.title if len(unit.title) <= 70 else unit.title[:69] + "…"
        click.echo(f"{lines:>11}  {unit.kind:<9} {n:>6}  {'  ' * unit.depth}{unit.id}  {title}")
    for problem in spec.problems:
        click.echo(f"{path}: {problem}", err=True)


@spec_group.command("check")
@click.argument("path")
@var_option
@click.option("--strict", is_flag=True, help="Fail on warnings too.")
@click.option("--scenarios", "--templates", "scenarios", multiple=True,
              help="Agentic scenario folders (the agentic-misalignment layout) no unit may rehearse, besides the "
                   "project's eval/agentic/scenarios; repeatable.")
@click.option("--embeddings", is_flag=True,
              help="Also compare units and sentences with the scenarios by MiniLM similarity (loads the model).")
def check(path, variables, strict, scenarios, embeddings):
    """Validate a spec: unfilled placeholders, empty sections, duplicate ids, unknown keys, units
    that rehearse an agentic eval scenario (13-grams; MiniLM with --embeddings)."""
    from corpus.decontam import default_scenario_dirs, scenario_folders
    from corpus.spec_check import check_spec

    scenario_folders(scenarios)  # a missing or empty folder is a one-line error
    spec = _load(path, variables)
    problems = check_spec(spec, default_scenario_dirs() + list(scenarios), embeddings)
    for problem in problems:
        click.echo(f"{path}: {problem}")
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    click.echo(f"{path}: {len(spec.units)} units, {errors} error(s), {warnings} warning(s)")
    if errors or (strict and warnings):
        sys.exit(1)


@spec_group.command("load")
@click.argument("path")
@var_option
@db_option
def load(path, variables, db):
    """Record a spec version and its units in the warehouse (a no-op if already there)."""
    from msm.config import load_settings
    from msm.tokens import default_counter
    from warehouse.db import connect
    from warehouse.specs import record_spec

    spec = _load(path, variables)
    settings = load_settings(db)
    con = connect(settings.db)
    try:
        added = record_spec(con, spec, default_counter())
    finally:
        con.close()
    verb = "recorded" if added else "already recorded"
    click.echo(f"{spec.name}: version {spec.version} {verb} ({len(spec.units)} units) in {settings.db}")


@spec_group.command("family")
@click.argument("paths", nargs=-1, required=True)
@var_option
def family(paths, variables):
    """Check that specs share their anchored core rules byte for byte; show what each adds."""
    from corpus.spec_family import compare_family

    report = compare_family([_load(p, variables) for p in paths])
    click.echo(f"core rules shared by all {len(paths)}: {', '.join(report.shared)}")
    width = max(4, *(len(m.spec.name) for m in report.members))
    click.echo(f"{'SPEC':<{width}} {'WORDS':>6} {'CORE':>5}  ADDS (units outside the core rules)")
    for m in report.members:
        adds = ", ".join(f"{n} {kind}" for kind, n in sorted(m.adds.items())) or "nothing"
        click.echo(f"{m.spec.name:<{width}} {m.words:>6} {m.core_words:>5}  {adds}")
    for anchor, missing in report.partial.items():
        click.echo(f"{anchor}: anchored in some specs but missing from {', '.join(missing)}")
    for mm in report.mismatches:
        click.echo(f"{mm.anchor}: {mm.other} differs from {mm.reference} at line {mm.line}, column {mm.column}: "
                   f"expected '{mm.expected}', found '{mm.found}'")
    if not report.ok:
        problems = len(report.mismatches) + len(report.partial)
        click.echo(f"family check failed: {problems} core rule(s) differ; make them byte-identical", err=True)
        sys.exit(1)
    click.echo("core rules identical")


@spec_group.command("variants")
@click.argument("path")
@click.option("--rules-only", is_flag=True, help="Keep the rules and the headings above them; drop the rest.")
@click.option("-o", "--output", default=None, help="Write the variant here instead of standard output.")
def variants(path, rules_only, output):
    """Derive a variant of a spec deterministically (today: --rules-only)."""
    from pathlib import Path

    from corpus.spec import load_spec
    from corpus.spec_variants import rules_only as derive_rules_only
    from msm.errors import MsmError

    if not rules_only:
        raise MsmError("no variant chosen", "pass --rules-only")
    text = derive_rules_only(load_spec(path))
    if output is None:
        click.echo(text, nl=False)
        return
    target = Path(output)
    if target.resolve() == Path(path).resolve():
        raise MsmError("--output is the spec itself", "write the variant to another file")
    partial = target.with_name(target.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)  # whole or not at all
    click.echo(f"wrote {target}")
