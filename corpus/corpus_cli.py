"""`msm corpus ...`: plan, build, list, stats, show, export."""

from __future__ import annotations

import json
from collections import Counter

import click

from msm.cli_util import db_option, parse_vars, var_option


@click.group("corpus")
def corpus_group():
    """Compile a spec into a midtraining corpus, and inspect or export the result."""


backend_options = [
    click.option("--backend", type=click.Choice(["anthropic", "openai", "local"]), default=None,
                 help="Default: msm.toml [llm], then anthropic if ANTHROPIC_API_KEY is set, else local."),
    click.option("--model", default=None, help="Model name or local alias."),
    click.option("--base-url", default=None, help="Server URL for the openai backend (or an anthropic proxy)."),
]


def with_options(options):
    def wrap(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return wrap


@corpus_group.command("plan")
@click.argument("spec")
@var_option
@click.option("--docs", type=int, default=24, show_default=True, help="Documents to plan.")
@click.option("--genres", default=None, help="Genre catalogue (YAML); default corpus/genres.yaml.")
@click.option("--doc-words", type=int, default=None,
              help="Mean document length in words: every genre's word range is rescaled so the mean of their "
                   "midpoints is N, keeping their relative lengths (e.g. 2250, about 3k tokens). Default: "
                   "corpus/genres.yaml as written. Not with the compact prompt.")
@click.option("--audiences", default=None, help="Audience catalogue (YAML); default corpus/audiences.yaml.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--preview", is_flag=True, help="Print the matrix and the projected documents, tokens and cost.")
@click.option("--batch", is_flag=True, help="Project Message Batches API prices.")
@with_options(backend_options)
def plan(spec, variables, docs, genres, doc_words, audiences, seed, preview, batch, backend, model, base_url):
    """Plan documents: spec unit x genre x audience, balanced. Makes no LLM calls."""
    from corpus.catalog import load_audiences, load_genres
    from corpus.plan import make_plan
    from corpus.spec import load_spec

    parsed = load_spec(spec, parse_vars(variables))
    genre_list, audience_list = load_genres(genres, doc_words), load_audiences(audiences)
    rows = make_plan(parsed, genre_list, audience_list, docs, seed=seed)
    if not preview:
        for row in rows:
            click.echo(json.dumps(row.to_json()))
        return
    _preview(parsed, rows, genre_list, audience_list, batch, backend, model, base_url, doc_words)


def _preview(spec, rows, genres, audiences, batch, backend, model, base_url, doc_words=None):
    from corpus.api import price_rows

    priced = price_rows(spec, rows, genres, audiences, backend, model, base_url, batch, doc_words=doc_words)
    name, model = priced["backend"], priced["model"]
    local = name == "local"
    units = Counter(r.unit_id for r in rows)
    kinds = Counter(r.unit_kind for r in rows)
    click.echo(f"{spec.name} (version {spec.version}): {len(rows)} documents over {len(units)} units "
               f"({', '.join(f'{k} {n}' for k, n in kinds.items())})")
    click.echo(f"{'genre':<24} " + " ".join(f"{g[:4]:>4}" for g in sorted({r.audience for r in rows})))
    matrix = Counter((r.genre, r.audience) for r in rows)
    for genre in sorted({r.genre for r in rows}):
        click.echo(f"{genre:<24} " + " ".join(f"{matrix[(genre, a)]:>4}" for a in sorted({r.audience for r in rows})))
    from corpus.cost import cost_model, document_tokens

    by_genre = {g.name: g for g in genres}
    tokens = int(sum(document_tokens(by_genre[r.genre], local) for r in rows))
    click.echo(f"projected: {len(rows)} documents, about {tokens:,} tokens of content "
               f"(~{cost_model()['tokens_per_word']} tokens a word; about {cost_model()['survival']:.0%} kept)"
               + (" (local: short compact documents)" if local else ""))
    click.echo(f"projected cost on {name}/{model}{' (batch)' if batch else ''}: "
               f"${priced['expected_usd']:.2f} expected (corpus/cost_model.yaml), "
               f"${priced['cost_usd']:.2f} upper bound (every call uses its full max_tokens); "
               "the spec prefix is paid once, then read from the prompt cache")


generation_options = [
    click.option("--genres", default=None, help="Genre catalogue (YAML)."),
    click.option("--doc-words", type=int, default=None,
                 help="Mean document length in words: every genre's word range is rescaled so the mean of their "
                      "midpoints is N, keeping their relative lengths (e.g. 2250, about 3k tokens). Default: "
                      "corpus/genres.yaml as written. Not with the compact prompt."),
    click.option("--audiences", default=None, help="Audience catalogue (YAML)."),
    click.option("--seed", type=int, default=0, show_default=True),
    *backend_options,
    click.option("--max-cost", type=float, default=None, help="Hard budget in USD; the rest stays pending."),
    click.option("--batch", is_flag=True, help="Use the Message Batches API (half price, slower)."),
    click.option("--tasks", type=int, default=1, show_default=True, help="datatrove tasks (plan shards)."),
    click.option("--workers", type=int, default=1, show_default=True, help="Tasks run at once."),
    click.option("--concurrency", type=int, default=None,
                 help="LLM calls in flight, in total. Default: the server's slots where it reports them "
                      "(llama.cpp's /slots), else 16; never more than those slots."),
    click.option("--judge", type=click.Choice(["llm", "offline"]), default=None,
                 help="Default: offline for the local backend, llm otherwise."),
    click.option("--truncated", "truncation", type=click.Choice(["regrow", "trim"]), default=None,
                 help="A cut-off answer: ask again with 1.5x room then drop it, or keep it to its last whole "
                      "paragraph. Default: trim for the local backend, regrow otherwise."),
    click.option("--dedup", default="minhash,embedding", show_default=True,
                 help="Near-duplicate methods after the judge, in order (minhash, embedding), or 'none'."),
    click.option("--dedup-threshold", type=click.FloatRange(0.0, 1.0), default=0.91, show_default=True,
                 help="Cosine at or above which two documents are near-duplicates (embedding dedup)."),
    click.option("--revise", is_flag=True, help="Add an editor's critique and a rewrite before the filters (3x calls)."),
    click.option("--plan", "plan_mode", type=click.Choice(["cells", "brainstorm"]), default="cells",
                 show_default=True,
                 help="brainstorm: a capable model lists each unit's claims (quoted from the unit) and proposes an "
                      "idea per cell, with top-up rounds; cells: the balanced matrix alone."),
    click.option("--against", multiple=True,
                 help="Eval items to decontaminate against (directory or file, repeatable); default eval/items."),
    click.option("--scenarios", "--templates", "scenarios", multiple=True,
                 help="Agentic scenario folders (the agentic-misalignment layout, as `msm eval run --templates`) "
                      "to decontaminate against besides the project's eval/agentic/scenarios; repeatable."),
    click.option("--no-decontaminate", is_flag=True, help="Skip the check against eval items and scenarios."),
    click.option("--prompt-style", type=click.Choice(["compact", "full"]), default=None,
                 help="compact: a short prompt without the whole spec or a scratchpad, judged offline, for small "
                      "models on any backend; full: the spec as a cached prefix. Default: the model table "
                      "(msm/llm/context_windows.yaml), else compact for the local backend, full otherwise."),
    click.option("--tokenizer", default=None,
                 help="Count kept tokens (token targets, matching) with this tokenizer: the trained model's HF id, "
                      "a local alias or a directory, if it is on this machine (nothing is downloaded); otherwise "
                      "SmolLM2's, stated as the fallback in every token figure. Default: SmolLM2's."),
    click.option("--max-tokens", type=click.IntRange(16, 65536), default=None,
                 help="Room for each document's answer (default 384 compact, 4096 full)."),
    click.option("--timeout", "idle_timeout", type=click.FloatRange(1.0, 86400.0), default=120.0,
                 show_default=True,
                 help="Seconds of silence mid-answer before a call is cut and retried (a streamed answer that "
                      "keeps coming is never cut)."),
    click.option("--first-byte-timeout", type=click.FloatRange(1.0, 86400.0), default=600.0, show_default=True,
                 help="Seconds an answer may take to start: a request queued behind others on a busy server "
                      "(OpenAI-compatible servers)."),
]


def _build_options(variables, tasks, workers, concurrency, max_cost, dedup, against=(), no_decontaminate=False,
                   scenarios=(), **fields):
    """BuildOptions from the shared flags, refusing impossible values with one line."""
    from msm.errors import MsmError
    from pipelines.build import BuildOptions
    from pipelines.dedup import parse_methods

    if tasks < 1 or workers < 1 or (concurrency is not None and concurrency < 1):
        raise MsmError("--tasks, --workers and --concurrency must be at least 1", "pass a positive number")
    if max_cost is not None and max_cost <= 0:
        raise MsmError("--max-cost must be positive", "pass a budget in USD above 0")
    from corpus.catalog import check_doc_words

    check_doc_words(fields.get("doc_words"))
    for path in against:
        from pathlib import Path

        if not Path(path).exists():
            raise MsmError(f"--against: {path} does not exist", "pass an item-bank directory or file")
    from corpus.decontam import default_scenario_dirs, scenario_folders

    scenario_folders(scenarios)  # a missing or empty folder fails before any work
    chosen = tuple(str(p) for p in default_scenario_dirs()) + tuple(scenarios) if scenarios else None
    return BuildOptions(variables=parse_vars(variables), tasks=tasks, workers=workers, concurrency=concurrency,
                        max_cost=max_cost, dedup=parse_methods(dedup),
                        against=() if no_decontaminate else (tuple(against) or None),
                        scenarios=() if no_decontaminate else chosen, **fields)


@corpus_group.command("build")
@click.argument("spec")
@var_option
@click.option("--docs", type=int, default=None, help="Documents to plan (default 24 with the local backend).")
@click.option("--tokens", default=None, help="Kept tokens to reach instead of --docs, e.g. 40M: backfill rounds "
                                              "plan more until the corpus reaches it, the budget or 5 rounds.")
@with_options(generation_options)
@click.option("--executor", type=click.Choice(["local", "slurm", "ray"]), default="local", show_default=True,
              help="Where the datatrove tasks run. slurm submits an sbatch array and returns (rerun to load); "
                   "ray runs on the cluster in RAY_ADDRESS, or a local Ray instance.")
@click.option("--slurm-partition", default="cpu", show_default=True)
@click.option("--slurm-time", default="24:00:00", show_default=True)
@click.option("--slurm-cpus", type=int, default=2, show_default=True, help="CPUs per task.")
@click.option("--slurm-mem-gb", type=int, default=4, show_default=True, help="Memory per CPU, GB.")
@click.option("--venv", default=None, help="Activate script for the workers (default: this environment's).")
@click.option("--dry-run", is_flag=True, help="slurm: write the sbatch script and the pickled pipeline only.")
@click.option("--match-tokens", default=None,
              help="Build until the kept tokens match this named corpus within 2% (for R vs V+ vs R+ "
                   "comparisons), instead of --docs or --tokens.")
@click.option("--name", default=None, help="Corpus name (default: the spec's id).")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs and scripts).")
@click.option("--allow-partial", is_flag=True,
              help="Point the corpus name at the kept documents even when plan rows are left pending or in error "
                   "(the exit code is still 75).")
@db_option
def build(spec, variables, docs, tokens, executor, slurm_partition, slurm_time, slurm_cpus, slurm_mem_gb, venv,
          dry_run, match_tokens, **shared):
    """Plan, generate, filter, judge, dedup and load a corpus; resumable.

    Exit codes: 0 complete; 1 bad input or a fatal error (the build is marked failed); 75 incomplete
    (rows pending or in error: rerun to resume); 130 or 143 stopped by SIGINT or SIGTERM (marked
    interrupted: rerun to resume).
    """
    from pipelines.build import BuildStopped

    try:
        _build(spec, variables, docs, tokens, executor, slurm_partition, slurm_time, slurm_cpus, slurm_mem_gb, venv,
               dry_run, match_tokens, **shared)
    except BuildStopped as exc:
        raise _Exit(str(exc), exc.exit_code) from None


class _Exit(click.ClickException):
    """One line on stderr and a chosen exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.exit_code = code


def _build(spec, variables, docs, tokens, executor, slurm_partition, slurm_time, slurm_cpus, slurm_mem_gb, venv,
           dry_run, match_tokens, no_progress=False, **shared):
    from msm.errors import MsmError
    from pipelines.build import INCOMPLETE_EXIT, build_corpus
    from pipelines.cluster import SlurmSettings

    options = _build_options(
        variables, docs=docs, executor=executor, dry_run=dry_run, progress=not no_progress,
        slurm=SlurmSettings(partition=slurm_partition, time=slurm_time, cpus_per_task=slurm_cpus,
                            mem_per_cpu_gb=slurm_mem_gb, venv=venv), **shared)
    if dry_run and executor != "slurm":
        raise MsmError("--dry-run only applies to --executor slurm", "add --executor slurm, or drop --dry-run")
    given = [flag for flag, value in (("--docs", docs), ("--tokens", tokens), ("--match-tokens", match_tokens))
             if value is not None]
    if len(given) > 1:
        raise MsmError(f"{' and '.join(given)} were both given", "pass one of them; each sets the corpus size")
    if tokens is not None or match_tokens is not None:
        from pipelines.target import build_to_target, corpus_tokens, parse_tokens

        if match_tokens is not None:
            target, tolerance = corpus_tokens(options.db, match_tokens), 0.02
        else:
            target, tolerance = parse_tokens(tokens), None
        if options.max_cost is not None:  # refused here, before any call, when it cannot reach the target
            from pipelines.target import describe_cost, refuse_short_budget

            est = refuse_short_budget(spec, options, target)
            click.echo(f"{target:,} kept tokens ({est['counter']}): {est['docs']:,} documents planned, "
                       f"~{est['kept_docs']:,} kept; {describe_cost(est)}; budget ${options.max_cost:,.2f}")
        outcome = build_to_target(spec, options, target, tolerance=tolerance)
        for result in outcome.rounds:
            _print_summary(result)
        counter = outcome.rounds[0].token_counter if outcome.rounds else "no round ran"
        click.echo(f"\ntoken target {outcome.target:,}: {outcome.stop} after {len(outcome.rounds)} round(s); "
                   f"corpus '{outcome.corpus_name}' -> {outcome.corpus_id}: {outcome.corpus_docs} documents, "
                   f"{outcome.kept_tokens:,} tokens (counted by {counter})")
        return
    if options.max_cost is not None and docs is not None:
        from pipelines.target import describe_cost, estimate_for

        est = estimate_for(spec, options)
        short = (": below the expected cost, so the build will stop with rows pending (a rerun with a larger "
                 "--max-cost finishes it)") if options.max_cost < est["expected_usd"] else ""
        click.echo(f"{docs:,} documents: {describe_cost(est)}; budget ${options.max_cost:,.2f}{short}")
    result = build_corpus(spec, options)
    _print_summary(result)
    if not result.complete and "submitted" not in result.status_counts:
        left = sum(n for status, n in result.status_counts.items() if status not in ("kept", "dropped"))
        named = (f"corpus '{result.corpus_name}' names the partial corpus (--allow-partial)" if result.corpus_id
                 else "the corpus name was not moved (--allow-partial moves it)")
        raise _Exit(f"build {result.build_id} is INCOMPLETE: {left} plan row(s) pending or in error, {named}; "
                    "rerun the same command to resume", INCOMPLETE_EXIT)


@corpus_group.command("ablate")
@click.argument("spec")
@var_option
@click.option("--conditions", required=True,
              help="Conditions to compare, comma-separated: attribution, cooccurrence, value_only, behavior_only "
                   "(corpus/conditions.yaml).")
@click.option("--docs", type=int, default=None, help="Cells to plan; each is generated under every condition.")
@click.option("--tokens", default=None, help="Matched kept tokens per condition to reach, e.g. 5M (rounds).")
@click.option("--tolerance", type=float, default=0.02, show_default=True,
              help="Largest relative difference in kept tokens between the matched corpora.")
@with_options(generation_options)
@click.option("--name", default=None, help="Ablation name; corpora are NAME-CONDITION (default: SPEC-ablation).")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs and scripts).")
@db_option
def ablate(spec, variables, conditions, docs, tokens, tolerance, no_progress=False, **shared):
    """Matched corpora: every cell under each condition, verified by the judge, token-matched."""
    from corpus.conditions import parse_conditions
    from msm.errors import MsmError
    from pipelines.ablate import build_ablation
    from pipelines.target import parse_tokens

    names = parse_conditions(conditions)
    if docs is not None and tokens is not None:
        raise MsmError("--docs and --tokens were both given", "pass one of them")
    if docs is not None and docs < 1:
        raise MsmError(f"--docs must be at least 1, got {docs}", "pass a positive number of cells")
    options = _build_options(variables, docs=docs, progress=not no_progress, **shared)
    result = build_ablation(spec, options, names, tolerance,
                            target_tokens=parse_tokens(tokens) if tokens is not None else None)
    for build_result in result.rounds:
        _print_summary(build_result)
    _print_ablation(result)


def _print_ablation(r) -> None:
    click.echo("")
    click.echo(f"ablation {r.ablation_id} '{r.name}': {r.cells} cells x {len(r.conditions)} conditions "
               f"({r.stop}); {r.cells_kept_everywhere} kept under every condition, {r.matched_cells} matched, "
               f"{r.lost_to_matching} lost to token matching")
    click.echo(f"{'CONDITION':<16} {'PLANNED':>7} {'KEPT':>5} {'CHECK FAILED':>18} {'MATCHED':>7} {'TOKENS':>10}  CORPUS")
    for c in r.reports:
        failed = (f"{c.failed_check}/{c.checked} {c.guard}" if c.guard else "no check")
        click.echo(f"{c.condition:<16} {c.planned:>7} {c.kept:>5} {failed:>18} {c.matched_docs:>7} "
                   f"{c.matched_tokens:>10,}  {c.corpus_name} -> {c.corpus_id}")
    click.echo(f"token match: {r.token_error:.2%} apart (tolerance {r.tolerance:.0%}); cost ${r.cost_usd:.4f}, "
               f"{r.seconds:.1f} s")


def _print_summary(r) -> None:
    if "submitted" in r.status_counts:
        click.echo(f"build {r.build_id}: {r.note}")
        return
    counts = r.status_counts
    kept = counts.get("kept", 0)
    click.echo("")
    click.echo(f"build {r.build_id}  {'complete' if r.complete else 'INCOMPLETE: rerun the same command to resume'}")
    click.echo(f"  planned    {r.planned:>8}")
    generated = sum(v for k, v in counts.items() if k not in ("pending", "error", "planned"))
    click.echo(f"  generated  {generated:>8}")
    click.echo(f"  kept       {kept:>8}")
    for reason, n in r.drop_reasons.items():
        click.echo(f"    not kept: {reason:<28} {n:>6}")
    click.echo(f"  tokens     {r.kept_tokens:>8,}  (kept, counted by {r.token_counter})")
    click.echo(f"  cost       ${r.cost_usd:>8.4f}")
    click.echo(f"  time       {r.seconds:>8.1f} s  ("
               + ", ".join(f"{k.removeprefix('step: ')} {v:.1f}" for k, v in r.stage_seconds.items()
                           if k.startswith("step: ") or k == "load") + ")")
    click.echo("  per genre (kept / not kept): " + ", ".join(f"{g} {k}/{d}" for g, (k, d) in r.per_genre.items()))
    if r.corpus_id:
        click.echo(f"corpus '{r.corpus_name}' -> {r.corpus_id}  (msm corpus stats {r.corpus_name})")


def _connect(db):
    from msm.config import load_settings
    from warehouse.db import connect

    return connect(load_settings(db).db, read_only=True)


def _corpus_id(con, name: str) -> str:
    from msm.errors import MsmError

    rows = con.execute("SELECT corpus_id FROM corpora WHERE name = ? UNION ALL SELECT id FROM corpus_versions "
                       "WHERE id = ?", [name, name]).fetchall()  # fetchall: duckdb 2 keeps a part-read result open
    row = rows[0] if rows else None
    if not row:
        raise MsmError(f"no corpus named '{name}'", "see `msm corpus list`")
    return row[0]


@corpus_group.command("list")
@db_option
def list_corpora(db):
    """Named corpora and the immutable corpus each points to."""
    con = _connect(db)
    rows = con.execute("SELECT c.name, c.corpus_id, v.n_docs, v.n_tokens, v.build_id, c.updated_at, "
                       "coalesce(b.count_tokenizer, '?') FROM corpora c JOIN corpus_versions v ON v.id = c.corpus_id "
                       "LEFT JOIN builds b ON b.id = v.build_id ORDER BY c.name").fetchall()
    con.close()
    if not rows:
        click.echo("no corpora yet: run `msm corpus build SPEC`")
    for name, cid, n, tok, build_id, when, counter in rows:
        click.echo(f"{name:<24} {cid}  {n:>6} docs  {tok:>10,} tokens ({counter})  build {build_id}  "
                   f"{when:%Y-%m-%d %H:%M}")


@corpus_group.command("stats")
@click.argument("name")
@db_option
def stats(name, db):
    """Documents, tokens and drops of a corpus, by genre, audience and unit kind."""
    con = _connect(db)
    cid = _corpus_id(con, name)
    n, tokens, build_id, counter = con.execute(
        "SELECT v.n_docs, v.n_tokens, v.build_id, coalesce(b.count_tokenizer, '?') FROM corpus_versions v "
        "LEFT JOIN builds b ON b.id = v.build_id WHERE v.id = ?", [cid]).fetchone()
    click.echo(f"corpus {name} -> {cid}: {n} documents, {tokens:,} tokens counted by {counter} (build {build_id})")
    for label, column in (("genre", "d.genre"), ("audience", "d.audience"), ("unit kind", "p.unit_kind")):
        rows = con.execute(f"SELECT {column}, count(*), sum(d.n_tokens) FROM corpus_documents cd "
                           "JOIN documents d ON d.id = cd.document_id JOIN plan_rows p ON p.build_id = d.build_id "
                           f"AND p.id = d.plan_row_id WHERE cd.corpus_id = ? GROUP BY 1 ORDER BY 2 DESC", [cid]).fetchall()
        click.echo(f"by {label}: " + ", ".join(f"{k} {c}" for k, c, _ in rows))
    drops = con.execute("SELECT reason, plan_rows FROM drops_by_reason WHERE build_id = ? ORDER BY 2 DESC",
                        [build_id]).fetchall()
    click.echo("not kept in its build: " + (", ".join(f"{r} {c}" for r, c in drops) or "none"))
    con.close()


@corpus_group.command("report")
@click.argument("name")
@click.option("--out", default=None, help="Folder for report.md and the plots (default $MSM_HOME/reports/NAME).")
@click.option("--no-embeddings", is_flag=True, help="Skip embedding diversity (it embeds documents not yet stored).")
@db_option
def report(name, out, no_embeddings, db):
    """One page to judge a corpus: distributions, diversity, uncovered units, lengths, drops."""
    from pathlib import Path

    from corpus.report import gather, write_report
    from msm.config import load_settings

    settings = load_settings(db)
    con = _connect(db)
    try:
        gathered = gather(con, name)
    finally:
        con.close()
    if not no_embeddings:  # embedding may write new vectors, so it runs with the connection closed
        from corpus.report import add_embedding_diversity

        add_embedding_diversity(gathered, settings.db)
    path = write_report(gathered, Path(out) if out else settings.home / "reports" / name)
    click.echo(f"{gathered.n_docs} documents, {gathered.n_tokens:,} tokens ({gathered.token_counter}); distinct-2 {gathered.distinct[2]:.3f}"
               + (f", Vendi {gathered.vendi:.1f}" if gathered.vendi is not None else "")
               + f"; {len(gathered.uncovered_units)} unit(s) with no kept document")
    click.echo(f"wrote {path} and {len(gathered.files)} plots")


@corpus_group.command("decontaminate")
@click.argument("name")
@click.option("--against", multiple=True, help="Eval item banks (a directory of JSONL, or files); repeatable. "
                                                "Default: the project's eval/items.")
@click.option("--ngram", type=click.IntRange(4, 50), default=None,
              help="Word n-gram length (default: corpus/decontam.yaml's, 13).")
@click.option("--similarity", type=click.FloatRange(0.0, 1.0), default=None,
              help="MiniLM cosine at or above which a document counts as a paraphrase of an item or a scenario "
                   "passage (default: corpus/decontam.yaml's, 0.9).")
@click.option("--scenarios", "--templates", "scenarios", multiple=True,
              help="Agentic scenario folders (the agentic-misalignment layout, as `msm eval run --templates`) to "
                   "check besides the project's eval/agentic/scenarios; repeatable.")
@click.option("--no-embeddings", is_flag=True, help="Check n-grams only.")
@db_option
def decontaminate(name, against, ngram, similarity, scenarios, no_embeddings, db):
    """Drop documents that contain an eval item or rehearse an agentic scenario (n-grams, embeddings);
    the name moves to the rest."""
    from pathlib import Path

    from corpus.decontam import (decontaminate_corpus, default_item_dirs, default_scenario_dirs, scenario_folders,
                                 thresholds)
    from msm.config import load_settings

    scenario_folders(scenarios)  # a missing or empty folder fails before the warehouse is opened
    settings = load_settings(db)
    paths = [Path(p) for p in against] or default_item_dirs()
    folders = default_scenario_dirs() + [Path(p) for p in scenarios]
    limits = thresholds()
    hits, new_id, report = decontaminate_corpus(settings.db, settings.home, name, paths, not no_embeddings,
                                                limits["similarity"] if similarity is None else similarity,
                                                limits["ngram"] if ngram is None else ngram, scenarios=folders)
    for hit in hits:
        what = f"scenario {hit.item.scenario}, {hit.item.item_id}" if hit.item.scenario else hit.item.item_id
        click.echo(f"{hit.document}: {hit.method} match with {what} ({hit.item.source}): {hit.evidence}")
    if hits:
        click.echo(f"{len(hits)} contaminated document(s) dropped; corpus '{name}' -> "
                   f"{new_id or '(none left: the name was removed)'}")
    else:
        click.echo(f"no contamination found in '{name}'")
    click.echo(f"report: {report}")


@corpus_group.command("show")
@click.argument("doc_id")
@db_option
def show(doc_id, db):
    """A document with its whole provenance chain: spec, unit, plan row, calls, judgments."""
    from msm.errors import MsmError

    con = _connect(db)
    doc = con.execute("SELECT * FROM documents WHERE id = ?", [doc_id]).fetchone()
    if not doc:
        raise MsmError(f"no document '{doc_id}'", "find ids with `msm warehouse sql \"SELECT id FROM documents\"`")
    cols = [d[0] for d in con.description]
    d = dict(zip(cols, doc))
    unit = con.execute("SELECT kind, title, first_line, last_line FROM spec_units WHERE spec_version = ? AND unit_id = ?",
                       [d["spec_version"], d["unit_id"]]).fetchone()
    spec = con.execute("SELECT name, path FROM specs WHERE id = ?", [d["spec_version"]]).fetchone()
    click.echo(f"document {d['id']}  [{d['status']}{': ' + d['drop_reason'] if d['drop_reason'] else ''}]")
    click.echo(f"spec      {spec[0]} version {d['spec_version']} ({spec[1]})")
    click.echo(f"unit      {d['unit_id']} ({unit[0]}: {unit[1]}, lines {unit[2]}-{unit[3]})")
    click.echo(f"plan row  {d['plan_row_id']}  genre {d['genre']}  audience {d['audience']}  "
               f"condition {d['condition']}  seed {d['seed']}")
    style = con.execute("SELECT style FROM builds WHERE id = ?", [d["build_id"]]).fetchone()
    click.echo(f"build     {d['build_id']}  style {style[0] if style and style[0] else '-'}  "
               f"{d['backend']}/{d['model']}  prompts {d['prompt_hash']}  "
               f"tokens {d['n_tokens']} ({d['token_counter']})  cost ${d['cost_usd']:.4f}")
    for key in json.loads(d["call_keys"]):
        call = con.execute("SELECT purpose, stop_reason, input_tokens, output_tokens, cache_read_tokens, cost_usd "
                           "FROM llm_calls WHERE key = ?", [key]).fetchone()
        if call:
            click.echo(f"call      {key[:16]}  {call[0]:<8} {call[1]:<12} in {call[2]} out {call[3]} "
                       f"cache-read {call[4]}  ${call[5]:.4f}")
    for judge, criterion, verdict, score, rationale in con.execute(
            "SELECT judge, criterion, verdict, score, rationale FROM judgments WHERE subject_kind = 'document' "
            "AND subject_id = ? ORDER BY judge, criterion", [doc_id]).fetchall():
        click.echo(f"judgment  {judge:<22} {criterion:<20} {'pass' if verdict else 'FAIL'}"
                   f"{f'  {score:.3f}' if score is not None else ''}  {rationale or ''}")
    click.echo("")
    click.echo(d["text"])
    con.close()


@corpus_group.command("import")
@click.argument("path")
@click.option("--text-column", default="text", show_default=True)
@click.option("--name", default=None, help="Corpus name (default: the file's name).")
@click.option("--dedup", default="minhash", show_default=True, help="Near-duplicate methods (minhash, embedding) or none.")
@db_option
def import_(path, text_column, name, dedup, db):
    """Bring parquet, JSONL or an HF datasets folder in as a corpus with `imported` provenance."""
    from corpus.importer import import_corpus
    from msm.config import load_settings
    from pipelines.dedup import parse_methods

    methods = parse_methods(dedup)
    settings = load_settings(db)
    out = import_corpus(path, text_column, name, settings.db, methods, home=settings.home)
    click.echo(f"imported {out['rows']} rows from {path}: {out['kept']} kept, {out['dropped']} dropped "
               f"(empty or duplicate); corpus '{out['name']}' -> {out['corpus_id']}")


@corpus_group.command("export")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl", "hf"]), default="parquet", show_default=True,
              help="hf: a datasets save_to_disk folder with the paper's {text, source, domain} columns too.")
@click.option("--out", required=True, help="Output directory (created).")
@db_option
def export(name, fmt, out, db):
    """Write `text` plus provenance columns, in a deterministic shuffled order."""
    from pathlib import Path

    from msm.errors import MsmError

    con = _connect(db)
    cid = _corpus_id(con, name)
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise MsmError(f"--out {target} is a file", "pass a directory")
    target.mkdir(parents=True, exist_ok=True)
    path = target / (name if fmt == "hf" else f"{name}.{fmt}")
    query = ("SELECT d.text, CASE WHEN d.backend = 'import' THEN d.model ELSE 'msm:' || d.build_id END AS source, "
             "split_part(d.unit_id, '/', 1) AS domain, d.id AS document_id, d.build_id, d.plan_row_id, d.spec_version, d.unit_id, p.unit_kind, "
             "d.genre, d.audience, d.condition, d.n_tokens, d.token_counter, d.model, d.seed, d.prompt_hash "
             "FROM corpus_documents cd JOIN documents d ON d.id = cd.document_id "
             "JOIN plan_rows p ON p.build_id = d.build_id AND p.id = d.plan_row_id "
             f"WHERE cd.corpus_id = '{cid}' ORDER BY sha256(d.id || '{cid}')")
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "hf":
        import shutil

        import datasets

        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset(con.sql(query).to_arrow_table()).save_to_disk(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
    else:
        option = "(FORMAT parquet)" if fmt == "parquet" else "(FORMAT json)"
        con.execute(f"COPY ({query}) TO '{tmp}' {option}")
    tmp.replace(path)
    n = con.execute(f"SELECT count(*) FROM ({query})").fetchone()[0]
    con.close()
    click.echo(f"wrote {n} documents of corpus {name} ({cid}) to {path}")
