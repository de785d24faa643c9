"""Building to a token target: rounds of ordinary builds until the kept corpus reaches it.

`msm corpus build SPEC --tokens 40M` plans a first round from the genres' lengths, then backfill
rounds sized by what the earlier rounds actually kept (tokens kept per planned document), until
the kept tokens reach the target, the budget runs out, or the round limit is hit. Each round is
an ordinary build (its own plan seed, so its own plan rows and build id), so every round resumes
on its own, and a rerun of the same command replays the same rounds from the cache. The named
corpus takes whole documents, round by round in a fixed shuffled order, until the target is
reached: it lands within one document's length above it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from msm.errors import MsmError

ROUND_SEED_STEP = 1_000_003  # round r plans with seed + r * step: disjoint plan rows
HEADROOM = 1.1  # plan 10% more than the estimate, so most targets take one round
MATCH_TOP_UP_DOCS = 3  # when the kept documents pass the target but none of their runs lands within the tolerance
EXACT_SEARCH_LIMIT = 20_000_000  # documents x tokens up to which a missed window is searched exactly


@dataclass
class TargetResult:
    target: int
    kept_tokens: int  # in the named corpus
    corpus_docs: int
    corpus_id: str | None
    corpus_name: str
    stop: str  # target reached, budget reached, round limit, no progress
    rounds: list  # one BuildResult per round


def parse_tokens(text: str) -> int:
    """'40M', '2.5k', '1200000' -> an integer number of tokens."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMbB]?)\s*", str(text))
    if not match:
        raise MsmError(f"--tokens {text!r} is not a number of tokens", "write it like 40M, 250k or 1200000")
    value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[match.group(2).lower()]
    return int(value)


def first_guess_tokens_per_doc(genres, local: bool) -> float:
    """Kept tokens a planned document yields, before any round has been measured (the cost model's
    tokens a word and survival share, corpus/cost_model.yaml)."""
    from corpus.cost import kept_tokens_per_doc

    return kept_tokens_per_doc(genres, local)


def estimate_for(spec_path: str, opts, tokens: int | None = None, conditions: tuple = ()) -> dict:
    """corpus.api.estimate for these build options: a target of `tokens`, else `opts.docs`."""
    from corpus.api import estimate

    return estimate(spec_path, docs=opts.docs if tokens is None else None, tokens=tokens, backend=opts.backend,
                    model=opts.model, base_url=opts.base_url, batch=opts.batch, genres=opts.genres,
                    audiences=opts.audiences, variables=opts.variables, conditions=tuple(conditions),
                    judge=opts.judge, revise=opts.revise, doc_words=opts.doc_words, plan_mode=opts.plan_mode,
                    max_tokens=opts.max_tokens, prompt_style=opts.prompt_style, tokenizer=opts.tokenizer)


def describe_cost(est: dict) -> str:
    """'$1,057.30 expected, $1,500.80 upper bound (anthropic:claude-opus-4-6)': the two figures."""
    return (f"${est['expected_usd']:,.2f} expected, ${est['cost_usd']:,.2f} upper bound "
            f"({est['backend']}:{est['model']})")


def refuse_short_budget(spec_path: str, opts, tokens: int, conditions: tuple = ()) -> dict:
    """A budget below the expected cost of reaching the target cannot reach it: refuse before any
    call is made, naming both figures. Returns the estimate (for the caller to show)."""
    est = estimate_for(spec_path, opts, tokens, conditions)
    if opts.max_cost is not None and opts.max_cost < est["expected_usd"]:
        what = f"{tokens:,} kept tokens ({est['counter']})" + (f" per condition ({len(conditions)} conditions)" if conditions else "")
        raise MsmError(f"max_cost ${opts.max_cost:,.2f} is below the expected cost of reaching {what}: "
                       f"{describe_cost(est)}",
                       f"raise max_cost (--max-cost) to at least ${math.ceil(est['expected_usd']):,}, "
                       "or lower the tokens (--tokens)")
    return est


def corpus_tokens(db, name: str) -> int:
    """Kept tokens of a named corpus: the target of `--match-tokens NAME`."""
    from msm.config import load_settings
    from warehouse.db import connect

    con = connect(load_settings(db).db, read_only=True)
    try:
        row = con.execute("SELECT v.n_tokens FROM corpora c JOIN corpus_versions v ON v.id = c.corpus_id "
                          "WHERE c.name = ?", [name]).fetchone()
    finally:
        con.close()
    if row is None:
        raise MsmError(f"--match-tokens: no corpus named '{name}'", "see `msm corpus list` for the names")
    return int(row[0])


def build_to_target(spec_path: str, opts, target: int, max_rounds: int = 5,
                    tolerance: float | None = None) -> TargetResult:
    """With `tolerance`, the named corpus must land within target * (1 +- tolerance): whole
    documents that would overshoot are passed over, and missing it is an error."""
    from corpus.catalog import load_genres
    from corpus.spec import load_spec
    from msm.config import load_settings
    from msm.llm.select import choose
    from pipelines.build import build_corpus

    spec = load_spec(spec_path, opts.variables)
    genres = load_genres(opts.genres, opts.doc_words)
    local = choose(opts.backend, opts.model, opts.base_url)[0] == "local"
    per_doc = first_guess_tokens_per_doc(genres, local)
    from corpus.cost import cost_model

    longest = max(g.words[1] for g in genres) * cost_model()["tokens_per_word"]
    if target < longest:
        raise MsmError(f"--tokens {target:,} is below one document (up to ~{int(longest):,} tokens)",
                       f"ask for at least {int(longest):,} tokens, or use --docs")
    if opts.max_cost is not None:
        refuse_short_budget(spec_path, opts, target)
    name = opts.name or spec.spec_id
    rounds, kept, planned, spent = [], 0, 0, 0.0
    stop = "round limit"
    for r in range(max_rounds):
        docs = max(1, math.ceil((target - kept) / per_doc * HEADROOM)) if kept < target else MATCH_TOP_UP_DOCS
        budget = None if opts.max_cost is None else opts.max_cost - spent
        if budget is not None and budget <= 0:
            stop = "budget reached"
            break
        result = build_corpus(spec_path, dataclasses.replace(
            opts, docs=docs, seed=opts.seed + r * ROUND_SEED_STEP, max_cost=budget, register=False))
        rounds.append(result)
        kept += result.kept_tokens
        planned += result.planned
        spent += result.cost_usd
        if kept >= target:
            if tolerance is None or _fits(load_settings(opts.db).db, rounds, target, tolerance):
                stop = "target reached"
                break
            # enough tokens, but no run of whole documents lands in the window: a few more
            # documents give the selection more to choose from
            if not result.complete or result.kept_tokens == 0:
                stop = "no match within the tolerance"
                break
            per_doc = kept / planned
            continue
        if not result.complete:
            stop = "budget reached" if opts.max_cost is not None else "incomplete round (rerun to resume)"
            break
        if result.kept_tokens == 0:
            stop = "no progress (a round kept nothing)"
            break
        per_doc = kept / planned
    registered = _register(load_settings(opts.db).db, name, rounds, target, tolerance)
    return TargetResult(target, registered[1], registered[2], registered[0], name, stop, rounds)


def _choose(con, rounds: list, target: int, tolerance: float | None) -> tuple[list[str], int]:
    """Whole kept documents, round by round in a fixed shuffled order, until the target (and,
    with a tolerance, skipping any document that would carry the total past its upper bound)."""
    docs = [row for result in rounds for row in con.execute(
        "SELECT id, n_tokens FROM documents WHERE build_id = ? AND status = 'kept' ORDER BY sha256(id)",
        [result.build_id]).fetchall()]
    chosen, total = [], 0
    for doc_id, n in docs:
        if total >= (target if tolerance is None else target * (1 - tolerance)):
            break
        if tolerance is not None and total + n > target * (1 + tolerance):
            continue
        chosen.append((doc_id, n))
        total += n
    low = None if tolerance is None else target * (1 - tolerance)
    if tolerance is not None and total < low and len(docs) * target * (1 + tolerance) <= EXACT_SEARCH_LIMIT:
        # short, and every document left would overshoot (a small target, documents large against
        # its window): search the subsets exactly; a large target's window holds many documents
        found = _subset_in_window(docs, low, target * (1 + tolerance), target)
        if found is not None:
            chosen, total = found, sum(n for _, n in found)
    return [d for d, _ in chosen], total


def _subset_in_window(docs: list, low: float, high: float, target: int) -> list | None:
    """Documents whose tokens sum into [low, high], closest to target: reachable sums one document
    at a time, each sum remembering the first way it was reached (so the answer is deterministic)."""
    reached: dict[int, tuple[int, int] | None] = {0: None}
    for i, (_, n) in enumerate(docs):
        for total in list(reached):
            if total + n <= high and total + n not in reached:
                reached[total + n] = (total, i)
    hits = [t for t in reached if low <= t <= high]
    if not hits:
        return None
    total = min(hits, key=lambda t: (abs(t - target), t))
    picked = []
    while reached[total] is not None:
        total, i = reached[total]
        picked.append(docs[i])
    return picked[::-1]


def _fits(db, rounds: list, target: int, tolerance: float) -> bool:
    from warehouse.db import connect

    con = connect(db, read_only=True)
    try:
        return abs(_choose(con, rounds, target, tolerance)[1] - target) <= target * tolerance
    finally:
        con.close()


def _register(db, name: str, rounds: list, target: int, tolerance: float | None) -> tuple[str | None, int, int]:
    """The documents `_choose` picks, registered under `name`; outside the tolerance is an error."""
    from warehouse.corpus_load import register_corpus
    from warehouse.db import connect

    if not rounds:
        return None, 0, 0
    con = connect(db)
    try:
        chosen, total = _choose(con, rounds, target, tolerance)
        if tolerance is not None and abs(total - target) > target * tolerance:
            raise MsmError(f"could not match {target:,} tokens within {tolerance:.0%}: the kept documents reach "
                           f"{total:,} ({(total - target) / target:+.1%})",
                           "rerun with a larger --max-cost, or build more with --tokens")
        if not chosen:
            return None, 0, 0
        con.execute("BEGIN TRANSACTION")
        try:
            corpus_id = register_corpus(con, name, rounds[-1].build_id, chosen)
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        return corpus_id, total, len(chosen)
    finally:
        con.close()
