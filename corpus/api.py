"""The corpus stage's public face: what other stages and the experiment runner may call."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from corpus.catalog import load_audiences, load_genres
from corpus.plan import PlanRow, make_plan
from corpus.spec import Spec, load_spec


@dataclass
class Corpus:
    """A named corpus a build registered, with what it cost: the one shape every way of building returns."""

    name: str | None
    corpus_id: str | None
    docs: int
    tokens: int
    token_counter: str
    cost_usd: float
    build_ids: list
    stop: str


def build(spec_path: str, **options):
    """Run a whole corpus build; options are pipelines.build.BuildOptions fields."""
    from pipelines.build import BuildOptions, build_corpus

    return build_corpus(spec_path, BuildOptions(**options))


def build_named(spec_path: str, tokens: int | str | None = None, tolerance: float | None = None,
                **options) -> Corpus:
    """A build of `docs` documents, or one that plans rounds until `tokens` kept tokens (e.g. "40M");
    with `tolerance`, the corpus must land within tokens * (1 +- tolerance) (token matching)."""
    from pipelines.build import BuildOptions, build_corpus
    from pipelines.target import build_to_target, parse_tokens

    opts = BuildOptions(**options)
    if tokens is None:
        r = build_corpus(spec_path, opts)
        kept = r.status_counts.get("kept", 0)
        return Corpus(r.corpus_name, r.corpus_id, kept, r.kept_tokens, r.token_counter, r.cost_usd, [r.build_id],
                      "complete" if r.complete else "incomplete (rerun to resume)")
    t = build_to_target(spec_path, dataclasses.replace(opts, docs=None), parse_tokens(tokens), tolerance=tolerance)
    counter = t.rounds[0].token_counter if t.rounds else ""
    return Corpus(t.corpus_name, t.corpus_id, t.corpus_docs, t.kept_tokens, counter,
                  sum(r.cost_usd for r in t.rounds), [r.build_id for r in t.rounds], t.stop)


def ablate(spec_path: str, conditions: tuple[str, ...], tokens: int | str | None = None, tolerance: float = 0.02,
           **options) -> dict[str, Corpus]:
    """Token-matched corpora, one per condition (every cell generated under each): condition -> Corpus."""
    from pipelines.ablate import build_ablation
    from pipelines.build import BuildOptions
    from pipelines.target import parse_tokens

    r = build_ablation(spec_path, BuildOptions(**options), tuple(conditions), tolerance,
                       target_tokens=parse_tokens(tokens) if tokens is not None else None)
    counter = r.rounds[0].token_counter if r.rounds else ""
    share = r.cost_usd / max(1, len(r.reports))
    return {c.condition: Corpus(c.corpus_name, c.corpus_id, c.matched_docs, c.matched_tokens, counter, share,
                                list(r.builds), r.stop) for c in r.reports}


def demos(spec_path: str, db: str | None = None, log=lambda line: None, *, match_tokens_of: str | None = None,
          tolerance: float = 0.02, **options):
    """Build a demonstration set (a corpus.demos.DemoResult); options are corpus.demos.DemoOptions fields.

    Responses follow the spec's style (`style: rules` or values; `style=` overrides). With
    `match_tokens_of` (a demo set's warehouse name or id), the set's assistant tokens match that
    set's within `tolerance` (`n`, optional then, only sizes the first round): the result's
    `tokens`, `target_tokens`, `ratio` and `token_counter` say how close; a build that cannot
    match raises MsmError and names no set.
    """
    from corpus.demos import DemoOptions, build_demos

    opts = DemoOptions(match_tokens_of=match_tokens_of, tolerance=tolerance, **options)
    return build_demos(spec_path, opts, log=log, db=db)


def build_option_names() -> set[str]:
    """The keyword options `build_named` and `ablate` accept (BuildOptions fields)."""
    from pipelines.build import BuildOptions

    return {f.name for f in dataclasses.fields(BuildOptions)}


def demo_option_names() -> set[str]:
    """The keyword options `demos` accepts (DemoOptions fields, match_tokens_of and tolerance among them)."""
    from corpus.demos import DemoOptions

    return {f.name for f in dataclasses.fields(DemoOptions)}


def check_demo_options(**options) -> None:
    """Refuse impossible demo settings before any work starts: wrong types (n, style, match_tokens_of,
    tolerance...), cot with from_preferences, neither n nor match_tokens_of, a tolerance outside (0, 1)."""
    from corpus.demos import DemoOptions
    from msm.typecheck import check_fields

    check_fields(DemoOptions, options, "demos")
    DemoOptions(**options).validate()


def check_build_options(where: str, options: dict) -> None:
    """Types and ranges of build options as an experiment file gives them (BuildOptions fields plus
    `tokens`, `tolerance`, `match_tokens_of`): a one-line error before any work starts."""
    from msm.errors import MsmError
    from msm.typecheck import check_fields, check_value
    from pipelines.build import BuildOptions
    from pipelines.target import parse_tokens

    check_fields(BuildOptions, options, where, skip={"slurm"})
    for key, annotation in (("tolerance", "float | None"), ("match_tokens_of", "str | None")):
        if key in options:
            check_value(where, key, options[key], annotation)
    tokens = options.get("tokens")
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, (int, str)):
            raise MsmError(f"{where}: 'tokens' must be a count such as 40M or 1200000, got {tokens!r}",
                           "write it like 40M, 250k or 1200000")
        if parse_tokens(tokens) < 1:
            raise MsmError(f"{where}: 'tokens' is {tokens!r}", "ask for at least one token, e.g. 40M")
    for key, low in (("docs", 1), ("tasks", 1), ("workers", 1), ("concurrency", 1), ("max_tokens", 1)):
        if options.get(key) is not None and options[key] < low:
            raise MsmError(f"{where}: '{key}' is {options[key]}", f"use {low} or more")
    from corpus.catalog import check_doc_words

    check_doc_words(options.get("doc_words"), f"{where}: 'doc_words'")
    if options.get("max_cost") is not None and options["max_cost"] <= 0:
        raise MsmError(f"{where}: 'max_cost' is {options['max_cost']}", "give a budget in USD above 0, or null")
    if options.get("tolerance") is not None and not 0 < options["tolerance"] < 1:
        raise MsmError(f"{where}: 'tolerance' is {options['tolerance']}", "give a share in (0, 1), e.g. 0.02")


def parse_conditions(text: str) -> tuple[str, ...]:
    """Ablation condition names (corpus/conditions.yaml), checked; an unknown name is a one-line error."""
    from corpus.conditions import parse_conditions as parse

    return parse(text)


def price_rows(spec, rows, genres, audiences, backend: str | None = None, model: str | None = None,
               base_url: str | None = None, batch: bool = False, judge: str | None = None,
               revise: bool = False, doc_words: int | None = None, max_tokens: int | None = None,
               prompt_style: str | None = None) -> dict:
    """USD of writing (revising) and judging these plan rows, two ways: `cost_usd`, an upper bound
    (every call at its full max_tokens), and `expected_usd`, from the assumptions in
    corpus/cost_model.yaml (answers as long as the genre asks, a share regrown or retried). Both
    read the spec prefix once, then from the prompt cache. Also says which backend and model."""
    from corpus.cost import expected_rows_usage
    from corpus.plan import plan_units
    from msm.llm.pricing import estimate as price
    from msm.llm.pricing import load_prices
    from msm.llm.select import choose, make_backend
    from pipelines.context import make_context

    name, model, base_url = choose(backend, model, base_url)
    if model is None:
        model = make_backend(name, None, base_url)[0].default_model
    ctx = make_context(spec, plan_units(spec), genres, audiences, name, model, base_url, judge=judge, revise=revise,
                       doc_words=doc_words, max_tokens=max_tokens, prompt_style=prompt_style)
    table = load_prices()
    requests = [ctx.generate_request(r.to_json()) for r in rows]
    if ctx.revise:  # a critique and a rewrite of a document as long as the longest answer
        requests += [q for r in rows for q in (ctx.critique_request(r.to_json(), "x" * 4 * 1200),
                                               ctx.rewrite_request(r.to_json(), "x" * 4 * 1200, "x" * 1600))]
    if ctx.judge == "llm":
        requests += [ctx.judge_request(r.to_json(), "x" * 4 * 1200) for r in rows]
    upper = price(requests, name, model, table, batch=batch)
    expected = expected_rows_usage(ctx, rows)
    return {"backend": name, "model": model, "cost_usd": upper["cost_usd"],
            "expected_usd": table.cost(name, model, expected, batch=batch), "calls": upper["requests"],
            "output_tokens": upper["usage"].output_tokens, "expected_output_tokens": expected.output_tokens}


def expected_demos_cost(spec_path: str, n: int, backend: str, model: str, cot: bool = False, domains: int = 8,
                        behaviors_only: bool = False, style: str | None = None, batch: bool = False,
                        variables: dict | None = None) -> float:
    """The expected USD of writing `n` demonstrations (corpus/cost_model.yaml `demos:`)."""
    from corpus.cost import expected_demos_usage
    from corpus.demos import spec_style
    from msm.llm.pricing import load_prices

    spec = load_spec(spec_path, variables or {})
    _, usage = expected_demos_usage(spec, n, cot, domains, behaviors_only, spec_style(spec, style))
    return load_prices().cost(backend, model, usage, batch=batch)


def estimate(spec_path: str, docs: int | None = None, tokens: int | str | None = None, backend: str | None = None,
             model: str | None = None, base_url: str | None = None, batch: bool = False, genres: str | None = None,
             audiences: str | None = None, variables: dict | None = None, conditions: tuple = (),
             judge: str | None = None, revise: bool = False, doc_words: int | None = None,
             plan_mode: str = "cells", max_tokens: int | None = None, prompt_style: str | None = None,
             tokenizer: str | None = None, **_ignored) -> dict:
    """What a build would make and cost, without calling a model: planned documents (`docs`), the
    documents and kept tokens expected in the named corpus (`kept_docs`, `tokens`), and USD both
    as an upper bound (`cost_usd`) and as expected (`expected_usd`, corpus/cost_model.yaml).
    `counter` names the tokenizer that would count the kept tokens (msm.tokens.counter_name: the
    trained model's `tokenizer` when it is on this machine, else SmolLM2's, stated as a fallback).

    With a token target, `docs` is what the first round plans (pipelines.target: the target over
    the kept tokens a planned document is expected to yield, with its headroom; an ablation plans
    cells for its matched share). Rows are priced over a sample of up to 200, scaled to the whole
    build; brainstormed planning adds its assertions and idea calls (corpus.cost.brainstorm_usage).
    """
    import math

    from corpus.conditions import ablation_units
    from corpus.cost import brainstorm_usage, cost_model, kept_tokens_per_doc
    from corpus.plan import plan_units
    from msm.llm.pricing import load_prices
    from msm.llm.select import choose
    from pipelines.build import prompt_style as choose_style
    from pipelines.target import HEADROOM, parse_tokens

    spec = load_spec(spec_path, variables or {})
    genre_list, audience_list = load_genres(genres, doc_words), load_audiences(audiences)
    name, chosen_model, _ = choose(backend, model, base_url)
    local = name == "local"
    style = choose_style(name, chosen_model or "", prompt_style)
    per_doc = kept_tokens_per_doc(genre_list, local)
    copies = max(1, len(conditions))
    share = cost_model()["ablation_cell_share"] if conditions else 1.0
    if tokens is not None:
        target = parse_tokens(tokens)
        docs = math.ceil(target / (per_doc * share) * (1.0 if conditions else HEADROOM))
        kept_tokens = target * copies
    else:
        docs = docs if docs is not None else 24
        kept_tokens = int(per_doc * share * docs * copies)
    if style == "compact" or local:  # short documents: the kept count follows the survival share
        kept_docs = docs * copies * share * cost_model()["survival"]
    else:
        kept_docs = kept_tokens / (per_doc / cost_model()["survival"])
    sample = make_plan(spec, genre_list, audience_list, min(docs, 200), seed=0)
    priced = price_rows(spec, sample, genre_list, audience_list, backend, model, base_url, batch, judge, revise,
                        doc_words=doc_words, max_tokens=max_tokens, prompt_style=style)
    scale = docs * copies / len(sample)
    cost, expected = priced["cost_usd"] * scale, priced["expected_usd"] * scale
    calls = priced["calls"] * scale
    if plan_mode == "brainstorm":
        units = [u.text for u in (ablation_units(spec) if conditions else plan_units(spec))]
        table = load_prices()
        n, upper_usage = brainstorm_usage(units, docs, upper=True)
        cost += table.cost(priced["backend"], priced["model"], upper_usage, batch=batch)
        expected += table.cost(priced["backend"], priced["model"], brainstorm_usage(units, docs)[1], batch=batch)
        calls += n
    from msm.tokens import counter_name

    return {"backend": priced["backend"], "model": priced["model"], "docs": docs * copies,
            "counter": counter_name(tokenizer),
            "kept_docs": int(round(kept_docs)), "tokens": int(kept_tokens), "cost_usd": cost,
            "expected_usd": expected, "calls": int(calls), "output_tokens": int(priced["output_tokens"] * scale),
            "expected_output_tokens": int(priced["expected_output_tokens"] * scale)}


__all__ = ["Corpus", "PlanRow", "Spec", "ablate", "build", "build_named", "build_option_names", "check_build_options",
           "check_demo_options",
           "demo_option_names",
           "demos", "estimate", "expected_demos_cost", "load_audiences", "load_genres", "load_spec", "make_plan",
           "parse_conditions", "price_rows"]
