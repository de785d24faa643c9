"""`msm demos ...`: build, list, show and export AFT demonstration sets.

Designs the commands serve (corpus/demos.py says how a set is built):
- Per-spec AFT (spec science): one set per arm, each built from the arm's own spec in that spec's
  response style (values, or rules for a `style: rules` spec), token-matched to a reference set
  with `--match-tokens-of NAME --tolerance 0.02`.
- Identical AFT (the cheese toy): build one set and give it to every arm; nothing else to do.
- CoT baseline vs plain AFT: one set built with `--cot`; `msm demos export NAME` keeps the
  reasoning and `--strip-reasoning` drops it, and nothing else differs between the two files.
"""

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
@click.option("--n", "n", type=int, default=None,
              help="Demonstrations to keep (backfill rounds run until then). With --match-tokens-of: the first "
                   "round's guess (default: the matched set's size).")
@click.option("--match-tokens-of", default=None, metavar="NAME",
              help="Keep demonstrations until their assistant tokens match demo set NAME's, within --tolerance.")
@click.option("--tolerance", type=float, default=0.02, show_default=True,
              help="With --match-tokens-of: the share by which the two sets' tokens may differ.")
@click.option("--style", type=click.Choice(["values", "rules"]), default=None,
              help="Response style (default: the spec's `style:`, else values). values: answers give the spec's "
                   "reasons; rules: answers cite the rule and give no reason the spec does not give.")
@click.option("--cot", is_flag=True, help="Ask for reasoning first; it is kept in the assistant message's `reasoning` "
                                          "(export with or without it: the CoT baseline and plain AFT share answers).")
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
@click.option("--concurrency", type=int, default=None,
              help="Calls in flight. Default: the server's slots where it reports them (llama.cpp), else 16.")
@click.option("--timeout", "idle_timeout", type=click.FloatRange(1.0, 86400.0), default=120.0, show_default=True,
              help="Seconds of silence mid-answer before a call is cut and retried.")
@click.option("--first-byte-timeout", type=click.FloatRange(1.0, 86400.0), default=600.0, show_default=True,
              help="Seconds an answer may take to start (queued on a busy OpenAI-compatible server).")
@click.option("--batch", is_flag=True, help="Use the Message Batches API (anthropic).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dedup-threshold", type=float, default=0.91, show_default=True,
              help="MiniLM cosine at which a question is a near-duplicate of an earlier one.")
@click.option("--no-embeddings", is_flag=True, help="Exact question dedup only, and n-gram decontamination only.")
@click.option("--against", multiple=True, help="Eval items to decontaminate against (default: eval/items).")
@click.option("--no-decontaminate", is_flag=True)
@click.option("--name", default=None, help="Demo set name (default: SPEC-demos, or SPEC-prefs).")
@click.option("--max-tokens", type=int, default=None,
              help="An answer's room (default 2,048, corpus.demos.MAX_TOKENS); one cut off there is counted as "
                   "truncated and not kept.")
@db_option
def build(spec, variables, n, match_tokens_of, tolerance, style, cot, behaviors_only, from_preferences, backend, model,
          base_url, domains, max_rounds, max_cost, concurrency, idle_timeout, first_byte_timeout, batch, seed, dedup_threshold, no_embeddings, against,
          no_decontaminate, name, max_tokens, db):
    """Build a demo set: domains, questions, dedup, responses, judge, backfill to --n (or to the
    tokens of --match-tokens-of)."""
    from corpus.demos import DemoOptions, build_demos
    from msm.errors import MsmError

    if max_cost is not None and max_cost <= 0:
        raise MsmError("--max-cost must be positive", "pass a budget in USD above 0")
    if concurrency is not None and concurrency < 1:
        raise MsmError("--concurrency must be at least 1", "pass a positive number")
    opts = DemoOptions(n=n, cot=cot, behaviors_only=behaviors_only, from_preferences=from_preferences,
                       backend=backend, model=model, base_url=base_url, domains=domains, max_rounds=max_rounds,
                       max_cost=max_cost, concurrency=concurrency, idle_timeout=idle_timeout,
                       first_byte_timeout=first_byte_timeout, batch=batch, seed=seed,
                       dedup_threshold=dedup_threshold, embed_dedup=not no_embeddings, against=list(against),
                       decontaminate=not no_decontaminate, name=name, variables=parse_vars(variables),
                       style=style, match_tokens_of=match_tokens_of, tolerance=tolerance,
                       **({"max_tokens": max_tokens} if max_tokens is not None else {}))
    result = build_demos(spec, opts, log=click.echo, db=db)
    _print_summary(result)
    if n is not None and not match_tokens_of and result.kept < n:
        fix = ("add phrasings or openers to corpus/demo_data/preferences.yaml, or lower --n" if from_preferences
               else "rerun with more --max-rounds or budget")
        raise MsmError(f"kept {result.kept} of {n} demonstrations ({result.stop})",
                       f"{fix}; the demo set holds what was kept")


def _print_summary(r) -> None:
    click.echo(f"demo build {r.build_id}  ({r.source}, {r.backend}:{r.model}, {r.style} style)")
    if r.target_tokens is None:
        click.echo(f"  target     {r.n_target:>8}")
    else:
        click.echo(f"  target     {r.target_tokens:>8,} tokens  (those of '{r.match_tokens_of}')")
    click.echo(f"  candidates {len(r.demos):>8}  over {r.rounds} round(s)")
    click.echo(f"  kept       {r.kept:>8}  ({r.stop})")
    click.echo(f"  tokens     {r.tokens:>8,}  ({r.token_counter})"
               + (f"  ratio {r.ratio:.4f} to '{r.match_tokens_of}'" if r.ratio is not None else ""))
    click.echo(f"  truncated: {r.truncated}  (answers cut off at max_tokens; counted, not kept)")
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
    rows = con.execute("SELECT s.name, s.demo_set_id, v.n_demos, v.n_tokens, b.style, b.n_truncated, b.source, "
                       "b.model, b.stop, s.updated_at FROM demo_sets s "
                       "JOIN demo_set_versions v ON v.id = s.demo_set_id "
                       "JOIN demo_builds b ON b.id = v.demo_build_id ORDER BY s.name").fetchall()
    con.close()
    if not rows:
        click.echo("no demo sets yet: run `msm demos build SPEC --n N`")
    for name, sid, n, tokens, style, truncated, source, model, stop, when in rows:
        tokens = f"{tokens:,}" if tokens is not None else "?"
        click.echo(f"{name:<28} {sid}  {n:>6} demos  {tokens:>10} tokens  {style:<6}  truncated: {truncated}  "
                   f"{source}:{model}  ({stop})  {when:%Y-%m-%d %H:%M}")


@demos_group.command("show")
@click.argument("name")
@click.option("--limit", type=int, default=5, show_default=True)
@db_option
def show(name, limit, db):
    """Print the first demonstrations of a set as {messages} JSON."""
    import json

    from warehouse.demos_store import demo_rows, demo_set_id, demo_set_info, to_messages

    con = _connect(db)
    set_id = demo_set_id(con, name)
    rows, info = demo_rows(con, set_id), demo_set_info(con, set_id)
    con.close()
    for row in rows[:limit]:
        click.echo(json.dumps(to_messages(row), ensure_ascii=False))
    tokens = f"{info['n_tokens']:,} tokens ({info['token_counter']})" if info["n_tokens"] is not None else "tokens ?"
    click.echo(f"({len(rows)} demonstrations in '{name}'; style: {info['style']}; cot: {str(info['cot']).lower()}; "
               f"{tokens}; truncated: {info['n_truncated']})", err=True)


@demos_group.command("export")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "hf"]), default="jsonl", show_default=True,
              help="jsonl: one {messages} object a line; hf: a datasets save_to_disk folder with the same rows.")
@click.option("--out", required=True, help="Output directory (created).")
@click.option("--strip-reasoning", is_flag=True,
              help="Leave out the assistant's `reasoning`: plain AFT from a --cot set (the records are otherwise "
                   "identical to the export with reasoning).")
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
    """Drop demonstrations of a set that hold an eval item or rehearse an agentic scenario, and move
    the name to the clean set."""
    from pathlib import Path

    from corpus.decontam import default_item_dirs, default_scenario_dirs, eval_texts
    from corpus.demos import contamination_hits
    from msm.config import load_settings
    from msm.errors import MsmError
    from warehouse.demos_store import demo_rows, demo_set_id, drop_from_set

    settings = load_settings(db)
    paths = [Path(p) for p in against] or default_item_dirs()
    if not paths:
        raise MsmError("no eval items to check against", "pass --against DIR")
    texts = eval_texts(paths, default_scenario_dirs())  # and the agentic scenarios
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
