"""`msm demos ...`: build, list, show and export AFT demonstration sets."""

from __future__ import annotations

import click

from corpus.corpus_cli import _connect  # one read-only warehouse opener for the corpus stage's commands
from msm.cli_util import db_option, parse_vars, var_option


@click.group("demos")
def demos_group():
    """AFT demonstrations: build them from a spec, inspect them, export them for training."""


@demos_group.command("build")
@click.argument("spec")
@var_option
@click.option("--n", "n", type=int, required=True, help="Demonstrations to keep (backfill rounds run until then).")
@click.option("--cot", is_flag=True, help="Ask for reasoning first; it is kept in the assistant message's `reasoning`.")
@click.option("--behaviors-only", is_flag=True,
              help="Act on the spec without naming the value behind it; a mention is dropped as value_leak.")
@click.option("--from-preferences", is_flag=True,
              help="Offline and deterministic: state the spec's Likes and Dislikes, with many phrasings and no reasons.")
@click.option("--backend", type=click.Choice(["anthropic", "openai", "local"]), default=None,
              help="Default: msm.toml [llm], then anthropic if ANTHROPIC_API_KEY is set, else local.")
@click.option("--model", default=None)
@click.option("--base-url", default=None)
@click.option("--domains", type=int, default=8, show_default=True, help="Domains the model lists first.")
@click.option("--max-rounds", type=int, default=5, show_default=True)
@click.option("--max-cost", type=float, default=None, help="USD budget; the build stops with what it kept.")
@click.option("--concurrency", type=int, default=16, show_default=True)
@click.option("--batch", is_flag=True, help="Use the Message Batches API (anthropic).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dedup-threshold", type=float, default=0.91, show_default=True,
              help="MiniLM cosine at which a question is a near-duplicate of an earlier one.")
@click.option("--no-embeddings", is_flag=True, help="Exact question dedup only, and n-gram decontamination only.")
@click.option("--against", multiple=True, help="Eval items to decontaminate against (default: eval/items).")
@click.option("--no-decontaminate", is_flag=True)
@click.option("--name", default=None, help="Demo set name (default: SPEC-demos, or SPEC-prefs).")
@db_option
def build(spec, variables, n, cot, behaviors_only, from_preferences, backend, model, base_url, domains, max_rounds,
          max_cost, concurrency, batch, seed, dedup_threshold, no_embeddings, against, no_decontaminate, name, db):
    """Build a demo set: domains, questions, dedup, responses, judge, backfill to --n."""
    from corpus.demos import DemoOptions, build_demos
    from msm.errors import MsmError

    if max_cost is not None and max_cost <= 0:
        raise MsmError("--max-cost must be positive", "pass a budget in USD above 0")
    if concurrency < 1:
        raise MsmError("--concurrency must be at least 1", "pass a positive number")
    opts = DemoOptions(n=n, cot=cot, behaviors_only=behaviors_only, from_preferences=from_preferences,
                       backend=backend, model=model, base_url=base_url, domains=domains, max_rounds=max_rounds,
                       max_cost=max_cost, concurrency=concurrency, batch=batch, seed=seed,
                       dedup_threshold=dedup_threshold, embed_dedup=not no_embeddings, against=list(against),
                       decontaminate=not no_decontaminate, name=name, variables=parse_vars(variables))
    result = build_demos(spec, opts, log=click.echo, db=db)
    _print_summary(result)
    if result.kept < n:
        fix = ("add phrasings or openers to corpus/demo_data/preferences.yaml, or lower --n" if from_preferences
               else "rerun with more --max-rounds or budget")
        raise MsmError(f"kept {result.kept} of {n} demonstrations ({result.stop})",
                       f"{fix}; the demo set holds what was kept")


def _print_summary(r) -> None:
    click.echo(f"demo build {r.build_id}  ({r.source}, {r.backend}:{r.model})")
    click.echo(f"  target     {r.n_target:>8}")
    click.echo(f"  candidates {len(r.demos):>8}  over {r.rounds} round(s)")
    click.echo(f"  kept       {r.kept:>8}  ({r.stop})")
    for reason, count in r.drops().items():
        click.echo(f"    not kept: {reason:<28} {count:>6}")
    click.echo(f"  cost       ${r.cost_usd:>8.4f}")
    if r.demo_set_id:
        click.echo(f"demo set '{r.name}' -> {r.demo_set_id}  (msm demos export {r.name} --out DIR)")


@demos_group.command("list")
@db_option
def list_sets(db):
    """Named demo sets and the immutable set each points to."""
    con = _connect(db)
    rows = con.execute("SELECT s.name, s.demo_set_id, v.n_demos, b.source, b.model, b.stop, s.updated_at "
                       "FROM demo_sets s JOIN demo_set_versions v ON v.id = s.demo_set_id "
                       "JOIN demo_builds b ON b.id = v.demo_build_id ORDER BY s.name").fetchall()
    con.close()
    if not rows:
        click.echo("no demo sets yet: run `msm demos build SPEC --n N`")
    for name, sid, n, source, model, stop, when in rows:
        click.echo(f"{name:<28} {sid}  {n:>6} demos  {source}:{model}  ({stop})  {when:%Y-%m-%d %H:%M}")


@demos_group.command("show")
@click.argument("name")
@click.option("--limit", type=int, default=5, show_default=True)
@db_option
def show(name, limit, db):
    """Print the first demonstrations of a set as {messages} JSON."""
    import json

    from warehouse.demos_store import demo_rows, demo_set_id, to_messages

    con = _connect(db)
    rows = demo_rows(con, demo_set_id(con, name))
    con.close()
    for row in rows[:limit]:
        click.echo(json.dumps(to_messages(row), ensure_ascii=False))
    click.echo(f"({len(rows)} demonstrations in '{name}')", err=True)


@demos_group.command("export")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "hf"]), default="jsonl", show_default=True,
              help="jsonl: one {messages} object a line; hf: a datasets save_to_disk folder with the same rows.")
@click.option("--out", required=True, help="Output directory (created).")
@click.option("--strip-reasoning", is_flag=True, help="Leave out the assistant's `reasoning` (for tools outside msm).")
@db_option
def export(name, fmt, out, strip_reasoning, db):
    """Write a demo set for training: {messages} with an optional assistant `reasoning`."""
    from pathlib import Path

    from msm.config import load_settings
    from warehouse.demos_store import export_demo_set

    path, n = export_demo_set(load_settings(db).db, name, Path(out), fmt, strip_reasoning)
    click.echo(f"wrote {n} demonstrations of '{name}' to {path}")


@demos_group.command("decontaminate")
@click.argument("name")
@click.option("--against", multiple=True, help="Eval items to check against (default: eval/items).")
@click.option("--no-embeddings", is_flag=True, help="Word 13-grams only, no MiniLM similarity.")
@db_option
def decontaminate(name, against, no_embeddings, db):
    """Drop demonstrations of a set that hold an eval item, and move the name to the clean set."""
    from pathlib import Path

    from corpus.decontam import default_item_dirs, load_eval_texts
    from corpus.demos import contamination_hits
    from msm.config import load_settings
    from msm.errors import MsmError
    from warehouse.demos_store import demo_rows, demo_set_id, drop_from_set

    settings = load_settings(db)
    paths = [Path(p) for p in against] or default_item_dirs()
    if not paths:
        raise MsmError("no eval items to check against", "pass --against DIR")
    texts = load_eval_texts(paths)
    con = _connect(db)
    rows = demo_rows(con, demo_set_id(con, name))
    con.close()
    hits = contamination_hits({r["id"]: (r["question"], r["response"]) for r in rows}, texts, settings.db,
                              embeddings=not no_embeddings)
    if not hits:
        click.echo(f"'{name}': {len(rows)} demonstrations, none holds an eval item ({len(texts)} item texts checked)")
        return
    for hit in hits:
        click.echo(f"  {hit.document}: {hit.item.item_id} ({hit.method}: {hit.evidence[:80]})")
    new_id = drop_from_set(settings.db, name, {h.document: f"{h.item.item_id} ({h.method}: {h.evidence})" for h in hits})
    click.echo(f"'{name}': dropped {len(hits)} of {len(rows)} as contamination -> {new_id or 'nothing left'}")
