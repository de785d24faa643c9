"""AFT demonstrations: domains -> questions -> MiniLM dedup -> responses -> judge -> backfill.

The paper's demonstration chain, in rounds: each round asks for more questions per domain (telling
the model what exists), drops near-duplicate questions (MiniLM cosine >= 0.91 against every
question kept so far), answers the rest with the whole spec in a cached system prefix, and has a
judge give PASS/FAIL per criterion and INCLUDE/EXCLUDE. Rounds stop when the goal is met, the
budget runs out, or the round limit is reached, and the result says which. Every call goes
through the cache, so a rerun costs nothing and an interrupted build resumes.

Per spec: AFT is single-turn conversations, and each spec gets demonstrations in its own style.
A values-style spec (the default) gets answers that give the reason the spec gives, in the
model's words (demo_response.j2); a rules-style spec (`style: rules` in its front matter) gets
answers that act per the rules and, where they explain, cite the rule and give no reason the spec
does not give (demo_response_rules.j2). `style` overrides the spec's. The identical-AFT design
(the cheese toy: one demo set for every arm) stays available: build one set and give it to
every arm.

The goal is N kept demonstrations (`n`), or a token total (`match_tokens_of`): the assistant
tokens of an existing demo set, within `tolerance` (2% by default), so that arms whose specs
differ get token-equivalent AFT data. Rounds run until the kept demonstrations, taken whole in
build order (one that would overshoot is passed over; one picked may be traded for a longer one to
land inside), fall within the tolerance; the set is that selection, deterministic given the seed.
A build that cannot match records its demonstrations, names no set and raises a one-line error
saying how close it came (as corpus token matching does).

With `cot`, the model writes its reasoning, then the answer; the set keeps the reasoning in the
stored field `reasoning`, and `msm demos export` writes it (or not, `--strip-reasoning`): one set
of responses serves both the CoT (deliberative-alignment) baseline and plain AFT, and the two
exports differ only in the reasoning. Answers cut off at max_tokens (2,048) are not kept (a
cut-off answer is not a demonstration), but they are counted and reported as `truncated`.

`--from-preferences` takes the offline path in corpus/demo_prefs.py instead. Both end in the same
record (warehouse/demos_store.py): every demonstration with its status and drop reason, its
judgments, its calls, and a named, immutable demo set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from corpus.prompting import find_json, find_list, items_per_call, parse_verdicts, prompt_hash, render
from msm.errors import MsmError
from msm.llm.types import Message, Request

CRITERIA = ("aligned_with_spec", "compliance_reasoning", "no_self_preservation")
VALUE_CRITERION = "no_value_mention"
DECISION = "include"
STYLES = ("values", "rules")
RESPONSE_TEMPLATES = {"values": "demo_response.j2", "rules": "demo_response_rules.j2"}
TEMPLATES = ("demo_system.j2", "demo_domains.j2", "demo_questions.j2", "demo_judge.j2")  # plus the style's answer
MAX_TOKENS = 2048  # an answer's room (reasoning included); one cut off here is counted as truncated, not kept
DEFAULT_TOLERANCE = 0.02
MAX_EXISTING_SHOWN = 40  # questions listed back to the model in a top-up round, per domain


@dataclass
class DemoOptions:
    n: int | None = None  # demonstrations to keep; with match_tokens_of, the first round's guess (default: its size)
    cot: bool = False
    behaviors_only: bool = False
    from_preferences: bool = False
    backend: str | None = None
    model: str | None = None
    base_url: str | None = None
    domains: int = 8
    max_rounds: int = 5
    max_cost: float | None = None
    concurrency: int | None = None  # None: the server's slots (llama.cpp's /slots), else 16
    idle_timeout: float = 120.0  # seconds of silence mid-answer before a call is cut and retried
    first_byte_timeout: float = 600.0  # seconds an answer may take to start (a busy server's queue)
    batch: bool = False
    batch_poll_s: float = 30.0  # seconds between looks at an open Message Batch
    seed: int = 0
    dedup_threshold: float = 0.91
    embed_dedup: bool = True
    against: list = field(default_factory=list)  # eval files or directories; [] = the project's banks
    decontaminate: bool = True
    name: str | None = None
    variables: dict = field(default_factory=dict)
    max_tokens: int = MAX_TOKENS
    style: str | None = None  # values or rules; None: the spec's own (`style:` in its front matter)
    match_tokens_of: str | None = None  # a demo set (name or id) whose assistant tokens this set matches
    tolerance: float = DEFAULT_TOLERANCE  # with match_tokens_of: the share the totals may differ by
    progress: bool | None = None  # None: a bar when stderr is a terminal

    def validate(self) -> None:
        if self.n is None and not self.match_tokens_of:
            raise MsmError("a demo set needs --n (how many demonstrations) or --match-tokens-of NAME",
                           "pass --n N, or --match-tokens-of an existing demo set")
        if self.n is not None and self.n < 1:
            raise MsmError(f"--n {self.n}: a demo set needs at least one demonstration", "pass --n 1 or more")
        if self.domains < 1:
            raise MsmError(f"--domains {self.domains} is below 1", "pass --domains 1 or more")
        if self.max_rounds < 1:
            raise MsmError(f"--max-rounds {self.max_rounds} is below 1", "pass --max-rounds 1 or more")
        if not 0 < self.dedup_threshold <= 1:
            raise MsmError(f"--dedup-threshold {self.dedup_threshold} is outside (0, 1]", "use a cosine such as 0.91")
        if self.from_preferences and (self.cot or self.batch):
            raise MsmError("--from-preferences writes fixed answers: --cot and --batch do not apply",
                           "drop --cot/--batch, or build with a model instead")
        if self.from_preferences and self.match_tokens_of:
            raise MsmError("--from-preferences writes a fixed number of answers: --match-tokens-of does not apply",
                           "pass --n, or build with a model instead")
        if self.style is not None and self.style not in STYLES:
            raise MsmError(f"--style {self.style!r} is not a response style", "use values or rules")
        if not 0 < self.tolerance < 1:
            raise MsmError(f"--tolerance {self.tolerance} is not a share between 0 and 1", "e.g. --tolerance 0.02")
        if self.max_tokens < 1:
            raise MsmError(f"--max-tokens {self.max_tokens} is below 1", f"use the default {MAX_TOKENS}")


def spec_style(spec, override: str | None = None) -> str:
    """The response style for a spec: `override`, else the spec's (`style: rules` in its front
    matter), else values."""
    style = override or getattr(spec, "style", None) or (spec.front_matter or {}).get("style") or "values"
    if style not in STYLES:
        raise MsmError(f"{spec.path}: style {style!r} is not a response style", "write style: rules or style: values")
    return style


@dataclass
class Demo:
    """One demonstration, kept or dropped, with everything that made or judged it."""

    question: str
    domain: str
    round: int
    seed: int
    response: str | None = None
    reasoning: str | None = None
    status: str = "candidate"  # candidate -> kept or dropped
    reason: str | None = None
    evidence: str | None = None
    call_keys: list = field(default_factory=list)
    cost_usd: float = 0.0
    judgments: list = field(default_factory=list)  # {judge, criterion, verdict, score, rationale, call_key}

    def drop(self, reason: str, evidence: str | None = None) -> None:
        self.status, self.reason, self.evidence = "dropped", reason, evidence

    @property
    def key(self) -> str:
        return hashlib.sha256(" ".join(self.question.lower().split()).encode()).hexdigest()[:16]


@dataclass
class DemoResult:
    build_id: str
    demo_set_id: str | None
    name: str
    spec_name: str
    source: str
    n_target: int
    demos: list[Demo]
    rounds: int
    stop: str
    cost_usd: float
    backend: str
    model: str
    contaminated: int = 0
    style: str = "values"
    members: list | None = None  # the demonstrations in the set, in order
    tokens: int = 0  # the set's assistant tokens (response, plus reasoning where kept)
    token_counter: str = ""
    match_tokens_of: str | None = None
    target_tokens: int | None = None  # that set's tokens, with the same counter

    @property
    def kept(self) -> int:
        if self.members is not None:
            return len(self.members)
        return min(self.n_target, sum(d.status == "kept" for d in self.demos))

    @property
    def truncated(self) -> int:
        """Answers cut off at max_tokens: counted, never kept."""
        return sum(d.reason == "truncated" for d in self.demos)

    @property
    def ratio(self) -> float | None:
        """The set's tokens over the matched set's (None without match_tokens_of)."""
        return self.tokens / self.target_tokens if self.target_tokens else None

    def drops(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.demos:
            if d.status == "dropped":
                out[d.reason] = out.get(d.reason, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class Goal:
    """When the rounds stop, and which kept demonstrations make the set: the first `n` in build
    order, or (with `target`) kept demonstrations taken whole in build order, passing over any
    that would carry the total past target * (1 + tolerance), until it reaches target * (1 - tolerance)."""

    def __init__(self, counter, n: int, target: int | None = None, tolerance: float = DEFAULT_TOLERANCE):
        self.counter, self.n, self.target, self.tolerance = counter, n, target, tolerance
        self._tokens: dict[int, int] = {}  # id(demo) -> assistant tokens, counted once

    def tokens(self, demos: list[Demo]) -> list[int]:
        from warehouse.demos_store import demo_tokens

        todo = [d for d in demos if id(d) not in self._tokens]
        for d, n in zip(todo, demo_tokens(self.counter, todo) if todo else []):
            self._tokens[id(d)] = n
        return [self._tokens[id(d)] for d in demos]

    def choose(self, demos: list[Demo]) -> tuple[list[Demo], int]:
        kept = [d for d in demos if d.status == "kept"]
        if self.target is None:
            chosen = kept[: self.n]
            return chosen, sum(self.tokens(chosen))
        low, high = self.target * (1 - self.tolerance), self.target * (1 + self.tolerance)
        tokens = self.tokens(kept)
        picked, total = [], 0
        for i, n in enumerate(tokens):
            if total >= low:
                break
            if total + n <= high:
                picked.append(i)
                total += n
        if total < low:  # every one left would overshoot: trade one picked for a longer one, if one fits
            picked, total = _trade_one(tokens, picked, total, low, high)
        return [kept[i] for i in picked], total

    def met(self, chosen: list[Demo], total: int) -> bool:
        if self.target is None:
            return len(chosen) >= self.n
        return abs(total - self.target) <= self.target * self.tolerance

    def more(self, demos: list[Demo]) -> int:
        """About how many more kept demonstrations the goal needs (0: met)."""
        chosen, total = self.choose(demos)
        if self.target is None:
            return max(0, self.n - len(chosen))
        if self.met(chosen, total):
            return 0
        kept = [d for d in demos if d.status == "kept"]
        mean = sum(self.tokens(kept)) / len(kept) if kept else self.target / self.n
        return max(1, math.ceil((self.target - total) / max(mean, 1.0)))

    def progress(self, demos: list[Demo]) -> str:
        chosen, total = self.choose(demos)
        if self.target is None:
            return f"{len(chosen)}/{self.n} kept"
        return f"{total:,}/{self.target:,} tokens in {len(chosen)} kept"


def _trade_one(tokens: list[int], picked: list[int], total: int, low: float, high: float) -> tuple[list[int], int]:
    """Picked indices (in build order) with one picked demonstration traded for an unpicked one so
    the total lands in [low, high]: the latest picked first, for the shortest unpicked that fits
    (the earliest of equals). Unchanged when no single trade does it."""
    from bisect import bisect_left

    taken = set(picked)
    spare = sorted((tokens[i], i) for i in range(len(tokens)) if i not in taken)
    lengths = [t for t, _ in spare]
    for c in reversed(picked):
        k = bisect_left(lengths, low - total + tokens[c])
        if k < len(lengths) and lengths[k] <= high - total + tokens[c]:
            u = spare[k][1]
            return sorted((taken - {c}) | {u}), total - tokens[c] + tokens[u]
    return picked, total


def build_demos(spec_path: str, opts: DemoOptions, log: Callable[[str], None] = lambda s: None,
                db: str | None = None) -> DemoResult:
    """Build, judge, decontaminate and record a demo set; see the module docstring. With
    `match_tokens_of`, a build that cannot match is recorded without a set and raises MsmError."""
    from corpus.spec import load_spec
    from msm.config import load_settings
    from msm.tokens import default_counter
    from warehouse.demos_store import record_demo_build, set_tokens

    opts.validate()
    started = time.time()
    spec = load_spec(spec_path, opts.variables)
    style = spec_style(spec, opts.style)
    settings = load_settings(db)
    counter = default_counter()
    target = None
    if opts.match_tokens_of:
        if not Path(settings.db).exists():
            raise MsmError(f"--match-tokens-of: no demo set named '{opts.match_tokens_of}' (no warehouse at "
                           f"{settings.db})", "build that demo set first, or pass --db")
        target, ref_n, _ = set_tokens(settings.db, opts.match_tokens_of, counter)
        log(f"matching '{opts.match_tokens_of}': {target:,} tokens in {ref_n} demonstrations ({counter.name}), "
            f"within {opts.tolerance:.1%}")
        goal = Goal(counter, opts.n or ref_n, target, opts.tolerance)
    else:
        goal = Goal(counter, opts.n)
    against, eval_texts = _against(opts)
    counted = [0]

    def decontaminate(batch: list[Demo]) -> None:  # each round's kept demonstrations, before counting them
        if eval_texts:
            counted[0] += _decontaminate(batch, eval_texts, settings.db, opts.embed_dedup)

    stage_keys: list[str] = []  # every domain and question call, recorded even when no question came of it
    if opts.from_preferences:
        demos, rounds, stop, backend, model, cost = _from_preferences(spec, opts)
        decontaminate(demos)
        if sum(d.status == "kept" for d in demos) < opts.n:
            stop = "phrasings exhausted or decontaminated below --n"
    else:
        demos, rounds, stop, backend, model, cost = asyncio.run(
            _llm_rounds(spec, opts, log, decontaminate, goal, style, stage_keys))
    contaminated = counted[0]
    if contaminated:
        log(f"decontamination: {contaminated} demonstration(s) dropped as contamination")
    members, tokens = goal.choose(demos)
    matched = goal.met(members, tokens)
    if target is not None and not matched:
        members = []  # a set that misses its token target is not named (as corpus matching does)

    config = {k: v for k, v in asdict(opts).items() if k not in ("name", "against", "progress", "match_tokens_of", "batch_poll_s")}
    config.update(against=[str(p) for p in against], style=style, target_tokens=target)
    templates = prompt_hash(*TEMPLATES, RESPONSE_TEMPLATES[style])
    build_id = "d" + hashlib.sha256(json.dumps([spec.version, config, templates], sort_keys=True,
                                               default=str).encode()).hexdigest()[:15]
    name = opts.name or f"{spec.name}-{'prefs' if opts.from_preferences else 'demos'}"
    source = "preferences" if opts.from_preferences else "llm"
    result = DemoResult(build_id, None, name, spec.name, source, opts.n if target is None else len(members), demos,
                        rounds, stop, cost, backend, model, contaminated, style, members, tokens, counter.name,
                        opts.match_tokens_of, target)
    build = {"n_target": result.n_target, "rounds": rounds, "stop": stop, "cost_usd": cost, "style": style,
             "n_truncated": result.truncated, "match_tokens_of": opts.match_tokens_of, "target_tokens": target}
    result.demo_set_id = record_demo_build(settings.db, spec, build_id, name, demos, members, build, config, source,
                                           backend, model, templates, started, counter, stage_keys)
    if target is not None and not matched:
        raise MsmError(f"could not match the {target:,} tokens of '{opts.match_tokens_of}' "
                       f"within {opts.tolerance:.1%}: "
                       f"the kept demonstrations reach {tokens:,} ({(tokens - target) / target:+.1%}) after {rounds} "
                       f"round(s) ({stop}); build {build_id} is recorded, no set was named",
                       "rerun with more --max-rounds or budget, or a wider --tolerance")
    return result


def _against(opts: DemoOptions) -> tuple[list[Path], list]:
    """The eval files to decontaminate against and their texts, read once (a missing directory or
    a bad bank fails before any work): the item banks, and the agentic scenarios (a demonstration
    that rehearses one would teach the eval's answer, as a document would)."""
    from corpus.decontam import default_item_dirs, default_scenario_dirs, eval_texts

    if not opts.decontaminate:
        return [], []
    paths = [Path(p) for p in opts.against] if opts.against else default_item_dirs()
    scenarios = default_scenario_dirs()
    return paths + scenarios, eval_texts(paths, scenarios)


# ---- offline: preferences ------------------------------------------------------------------

def _from_preferences(spec, opts: DemoOptions):
    from corpus.demo_prefs import judge, read_preferences, sample

    prefs = read_preferences(spec)
    picked = sample(prefs, opts.n, opts.seed)
    demos = []
    for p in picked:
        demo = Demo(p.question, p.domain, 1, p.seed, response=p.response)
        verdicts = judge(p, prefs)
        demo.judgments = [{"judge": "rules:preferences", "criterion": c, "verdict": v, "score": None,
                           "rationale": why, "call_key": None} for c, v, why in verdicts]
        failed = [(c, why) for c, v, why in verdicts if not v]
        if failed:
            c, why = failed[0]
            demo.drop("value_leak" if c == "no_value_mention" else f"failed_{c}", why)
        else:
            demo.status = "kept"
        demos.append(demo)
    stop = "target reached" if len(picked) >= opts.n else f"phrasings exhausted at {len(picked)} distinct questions"
    return demos, 1, stop, "rules", "preferences", 0.0


# ---- with a model ----------------------------------------------------------------------------

async def _llm_rounds(spec, opts: DemoOptions, log, decontaminate, goal: Goal, style: str, stage_keys: list):
    from msm.llm.client import LLMClient
    from msm.llm.select import default_cache, effective_concurrency, make_backend

    backend, model = make_backend(opts.backend, opts.model, opts.base_url, idle_timeout=opts.idle_timeout,
                                  first_byte_timeout=opts.first_byte_timeout)
    names = spec.names
    prefix = render("demo_system.j2", spec_name=spec.name, spec_text=spec.text, **names)
    try:
        check_context_window(prefix, opts, backend.name, model, spec.path)
    except MsmError:
        await backend.aclose()
        raise
    slots = await backend.slots() if hasattr(backend, "slots") else None
    client = LLMClient(backend, model, cache=default_cache(), max_cost=opts.max_cost, batch_poll_s=opts.batch_poll_s,
                       concurrency=effective_concurrency(opts.concurrency, slots))
    embed = _question_embedder() if opts.embed_dedup else None
    try:
        domains, domain_keys = await _domains(client, prefix, opts, names)
        stage_keys += domain_keys
        log(f"domains: {', '.join(domains)}")
        demos: list[Demo] = []
        vectors: list = []  # (unit vector, question) for every question kept so far
        stop, rounds = "round limit", 0
        per_domain = max(1, math.ceil(goal.n * 1.5 / len(domains)))
        for r in range(1, opts.max_rounds + 1):
            rounds = r
            fresh = await _questions(client, prefix, opts, names, domains, demos, per_domain, r, stage_keys)
            for d in fresh:
                d.call_keys[:0] = domain_keys
            _dedup_questions(fresh, demos, vectors, embed, opts.dedup_threshold)
            todo = [d for d in fresh if d.status == "candidate"]
            await _respond(client, prefix, opts, names, todo, style)
            await _judge(client, prefix, opts, names, [d for d in todo if d.status == "candidate"], spec, style)
            decontaminate(fresh)
            demos += fresh
            kept = sum(d.status == "kept" for d in demos)
            more = goal.more(demos)
            truncated = sum(d.reason == "truncated" for d in fresh)
            log(f"round {r}: {len(fresh)} questions, {len(todo)} new, {sum(d.status == 'kept' for d in fresh)} kept"
                f"{f', {truncated} truncated' if truncated else ''}; {goal.progress(demos)}, "
                f"${client.stats.spent_usd:.4f} spent")
            if more == 0:
                stop = "target reached"
                break
            if any(d.reason == "pending" for d in fresh) or not client.budget_left():
                stop = "budget reached"
                break
            rate = kept / len(demos) if demos else 0.0
            if rate == 0 and r >= 2:
                stop = "no progress (two rounds kept nothing)"
                break
            per_domain = max(1, math.ceil(more / max(rate, 0.1) * 1.2 / len(domains)))
    finally:
        await backend.aclose()
    demos = [d for d in demos if d.reason != "pending"]  # cached or not made yet: a rerun picks them up
    return demos, rounds, stop, backend.name, model, client.stats.spent_usd


# questions per call and the question stage's answer room (corpus/list_requests.yaml); the other stages
# ask for less or for --max-tokens
QUESTIONS_PER_CALL, QUESTION_TOKENS = items_per_call("questions")


def check_context_window(prefix: str, opts: DemoOptions, backend: str, model: str, spec_path) -> None:
    """Refuse a spec whose cached system prefix (demo_system.j2: the whole spec) plus the largest answer
    any stage asks for does not fit the model's context window (msm/llm/context_windows.yaml, the
    table `msm corpus build` checks against), before the cache is opened or any call is made. The
    small local models are not checked, as in the corpus build."""
    from pipelines.build import context_window

    window = None if backend == "local" else context_window(model)
    if window is None:
        return
    answer = max(QUESTION_TOKENS, opts.max_tokens)
    prompt = len(prefix) // 4
    if answer + len(prefix) // 8 <= window < answer + prompt * 2:  # close to the limit: count it properly
        from msm.tokens import default_counter

        prompt = default_counter().count_many([prefix])[0]
    if prompt + answer > window:
        raise MsmError(f"{spec_path}: the demonstrations' system prefix (the whole spec) is about {prompt:,} tokens "
                       f"plus {answer:,} for the answer, over {model}'s {window:,}-token context window",
                       "shorten or split the spec, or use a model with a larger window "
                       "(msm/llm/context_windows.yaml)")


async def _calls(client, requests: list[Request], opts: DemoOptions, stage: str):
    """One stage's calls, with a bar (calls done, tokens, cost, rate and ETA) while they run."""
    from tqdm import tqdm

    bar = tqdm(total=len(requests), desc=stage, unit="call", dynamic_ncols=True, leave=False,
               disable=None if opts.progress is None else not opts.progress)
    spent = [0, 0.0]

    counts = {"retried": 0, "failed": 0, "last": ""}

    def postfix() -> str:
        text = f"{spent[0]:,} tokens, ${spent[1]:.2f}"
        if counts["retried"]:
            text += f", {counts['retried']} retried (last: {counts['last']})"
        return text + (f", {counts['failed']} failed" if counts["failed"] else "")

    def tick(response) -> None:
        spent[0] += response.usage.input_tokens + response.usage.output_tokens
        spent[1] += 0.0 if response.cached else response.cost_usd
        counts["failed"] += not response.ok
        bar.set_postfix_str(postfix(), refresh=False)
        bar.update(1)

    def retrying(request, reason: str) -> None:  # shown as it happens, before the call is answered
        counts["retried"] += 1
        counts["last"] = reason.split(":")[0][:40]
        bar.set_postfix_str(postfix(), refresh=True)

    client.on_result, client.on_retry = tick, retrying
    try:
        return await client.complete_many(requests, batch=opts.batch)
    finally:
        client.on_result = client.on_retry = None
        bar.close()


def _question_embedder():
    from msm.models import load_embedder

    model = load_embedder()

    def embed(texts: list[str]):
        return model.encode(texts, normalize_embeddings=True, batch_size=64)

    return embed


PARSE_TRIES = 3  # new calls per request and run for an answer that does not parse
PARSE_SEEDS = 12  # seeds tried in all, cached failures of earlier runs included
MAX_ROOM = 16384


async def _until_parsed(client, requests: list[Request], parse, opts, stage: str):
    """Ask each request until its answer parses. An answer that does not (prose for a JSON list,
    or one cut off) is asked again under a new seed, with twice the room when it was cut off; the
    cached failures of an earlier run are passed over the same way without counting, so a rerun
    makes new calls instead of replaying them. Every answer stays in the cache, recorded.

    Returns, per request, (what `parse` found or None, the responses tried in order)."""
    import dataclasses

    tried: list[list] = [[] for _ in requests]
    found: list = [None] * len(requests)
    fresh = [0] * len(requests)
    current = list(requests)
    todo = list(range(len(requests)))
    for attempt in range(PARSE_SEEDS):
        if not todo:
            break
        label = stage if attempt == 0 else f"{stage} (asked again: {len(todo)} unreadable)"
        responses = await _calls(client, [current[i] for i in todo], opts, label)
        again = []
        for i, response in zip(todo, responses):
            tried[i].append(response)
            fresh[i] += not response.cached
            if not response.ok or response.refused:  # a failed call is retried by the next run anyway
                continue
            value = None if response.truncated else parse(response.text)
            if value:
                found[i] = value
                continue
            if fresh[i] >= PARSE_TRIES:
                continue
            request = current[i]
            room = min(MAX_ROOM, request.max_tokens * 2) if response.truncated else request.max_tokens
            current[i] = dataclasses.replace(request, seed=(request.seed or 0) + 7919 * (attempt + 1), max_tokens=room)
            again.append(i)
        todo = again
    return list(zip(found, tried))


def _json_list(text: str):
    return find_list(text)


async def _domains(client, prefix, opts, names) -> tuple[list[str], list[str]]:
    request = Request(messages=(Message("user", render("demo_domains.j2", count=opts.domains, **names)),),
                      system_prefix=prefix, max_tokens=1024, temperature=1.0, seed=opts.seed, purpose="demo")
    [(found, tried)] = await _until_parsed(client, [request], _json_list, opts, "domains")
    domains = [str(d).strip() for d in found or [] if str(d).strip()]
    if not domains:
        last = tried[-1]
        why = last.error or (f"{len(tried)} answers, none a JSON list; the last: {last.text[:80]!r}")
        raise MsmError(f"the model listed no domains ({why})",
                       "check the backend with `msm llm ping`; a rerun asks again under new seeds")
    return list(dict.fromkeys(domains))[: opts.domains], [r.key for r in tried]


async def _questions(client, prefix, opts, names, domains, demos, per_domain, round_no, keys: list) -> list[Demo]:
    """`per_domain` questions per domain, asked in calls of at most QUESTIONS_PER_CALL (chosen from the
    answer's room), so a large set is many small lists, never one answer too long to finish."""
    requests, owners = [], []
    for i, domain in enumerate(domains):
        existing = [d.question for d in demos if d.domain == domain and d.status != "dropped"][-MAX_EXISTING_SHOWN:]
        parts = math.ceil(per_domain / QUESTIONS_PER_CALL)
        for part in range(parts):
            count = per_domain // parts + (part < per_domain % parts)
            text = render("demo_questions.j2", count=count, domain=domain, existing=existing, part=part + 1,
                          parts=parts, **names)
            requests.append(Request(messages=(Message("user", text),), system_prefix=prefix,
                                    max_tokens=QUESTION_TOKENS, temperature=1.0,
                                    seed=opts.seed * 1000 + round_no + 7_919 * part, purpose="demo"))
            owners.append(domain)
    answered = await _until_parsed(client, requests, _json_list, opts, f"round {round_no}: questions")
    out, numbered = [], dict.fromkeys(domains, 0)  # a question's seed: its place among its domain's
    for domain, (found, tried) in zip(owners, answered):
        keys += [r.key for r in tried]
        for q in found or []:
            if isinstance(q, str) and q.strip():
                demo = Demo(q.strip(), domain, round_no, opts.seed * 1_000_003 + round_no * 10_007 + numbered[domain])
                demo.call_keys += [r.key for r in tried]
                out.append(demo)
                numbered[domain] += 1
    return out


DEDUP_BLOCK = 2048  # questions compared at once: a block against every earlier question, bounded memory


def _dedup_questions(fresh: list[Demo], demos: list[Demo], kept: list, embed, threshold: float) -> None:
    """Exact then MiniLM near-duplicates, against every question kept so far (earlier rounds too).
    `kept` holds (unit vector, question) for those questions and grows as this round adds some.

    Exact search, a block of questions at a time: 120,000 questions (an 80,000-demonstration set)
    would need a 57 GB similarity matrix at once."""
    import numpy as np

    seen = {d.key: d for d in demos}
    for d in fresh:
        if d.key in seen:
            d.drop("duplicate_question", seen[d.key].question[:120])
        else:
            seen[d.key] = d
    todo = [d for d in fresh if d.status == "candidate"]
    if embed is None or not todo:
        return
    vectors = np.asarray(embed([d.question for d in todo]), dtype=np.float32)
    pool = np.stack([k[0] for k in kept]) if kept else np.zeros((0, vectors.shape[1]), np.float32)
    questions = [k[1] for k in kept]
    for start in range(0, len(todo), DEDUP_BLOCK):
        block = vectors[start:start + DEDUP_BLOCK]
        best, where = np.full(len(block), -np.inf, np.float32), np.zeros(len(block), np.int64)
        for lo in range(0, len(pool), 4 * DEDUP_BLOCK):  # every earlier question, a slice at a time
            sims = block @ pool[lo:lo + 4 * DEDUP_BLOCK].T
            top = sims.argmax(axis=1)
            better = sims[np.arange(len(block)), top] > best
            best[better], where[better] = sims[np.arange(len(block)), top][better], lo + top[better]
        inner, accepted = block @ block.T, []
        for row in range(len(block)):
            d = todo[start + row]
            score, match = float(best[row]), questions[where[row]] if len(pool) else None
            if accepted:
                a = max(accepted, key=lambda c: inner[row, c])
                if inner[row, a] > score:
                    score, match = float(inner[row, a]), todo[start + a].question
            if score >= threshold:
                d.drop("near_duplicate_question", f"cosine {score:.3f} to: {match[:100]}")
            else:
                accepted.append(row)
        pool = np.concatenate([pool, block[accepted]])
        questions += [todo[start + a].question for a in accepted]
    kept[len(kept):] = list(zip(pool[len(kept):], questions[len(kept):]))


async def _respond(client, prefix, opts, names, todo: list[Demo], style: str) -> None:
    template = RESPONSE_TEMPLATES[style]
    requests = [Request(messages=(Message("user", render(template, question=d.question, cot=opts.cot,
                                                         behaviors_only=opts.behaviors_only, **names)),),
                        system_prefix=prefix, max_tokens=opts.max_tokens, temperature=1.0, seed=d.seed,
                        purpose="demo") for d in todo]
    stage = f"round {todo[0].round}: answers" if todo else "answers"
    for d, response in zip(todo, await _calls(client, requests, opts, stage)):
        d.call_keys.append(response.key)
        d.cost_usd += response.cost_usd if not response.cached else 0.0
        if response.stop_reason == "pending":
            d.drop("pending")
        elif not response.ok:
            d.drop("error", response.error)
        elif response.refused:
            d.drop("refusal")
        elif response.truncated:  # cut off: not a demonstration, but counted (DemoResult.truncated)
            d.drop("truncated", f"stopped at max_tokens {opts.max_tokens}")
        else:
            reasoning, answer = split_reasoning(response.text, opts.cot)
            if answer is None:
                d.drop("unparseable_response", reasoning)
            else:
                d.reasoning, d.response = reasoning, answer


def split_reasoning(text: str, cot: bool) -> tuple[str | None, str | None]:
    """(reasoning, response); with CoT both tags are required, and (why, None) when they are not there."""
    if not cot:
        answer = re.sub(r"</?response>", "", text).strip()
        return None, answer or None
    reasoning = re.search(r"<reasoning>\s*(.*?)\s*</reasoning>", text, re.S)
    answer = re.search(r"<response>\s*(.*?)\s*(?:</response>|$)", text, re.S)
    if not reasoning or not answer or not answer.group(1).strip():
        return "no <reasoning> and <response> in the answer", None
    return reasoning.group(1), answer.group(1).strip()


async def _judge(client, prefix, opts, names, todo: list[Demo], spec, style: str) -> None:
    criteria = CRITERIA + ((VALUE_CRITERION,) if opts.behaviors_only else ()) + (DECISION,)
    lexicon = _value_lexicon(spec) if opts.behaviors_only else None
    for attempt in range(2):  # an unreadable verdict is asked once more under another seed
        if not todo:
            return
        requests = [Request(messages=(Message("user", render(
                                "demo_judge.j2", question=d.question, reasoning=d.reasoning, response=d.response,
                                behaviors_only=opts.behaviors_only, style=style, **names)),),
                            system_prefix=prefix, max_tokens=1024, temperature=0.0, seed=d.seed + attempt,
                            purpose="judge") for d in todo]
        retry = []
        for d, response in zip(todo, await _calls(client, requests, opts, f"round {todo[0].round}: judge")):
            d.call_keys.append(response.key)
            d.cost_usd += response.cost_usd if not response.cached else 0.0
            if response.stop_reason == "pending":
                d.drop("pending")
                continue
            verdicts = parse_verdicts(response.text, criteria) if response.ok else None
            if verdicts is None:
                if attempt == 0 and response.ok:
                    retry.append(d)
                else:
                    d.drop("judge_unreadable" if response.ok else "error", response.error)
                continue
            judge = f"llm:{client.model}"
            d.judgments = [{"judge": judge, "criterion": c, "verdict": v, "score": None, "rationale": why,
                            "call_key": response.key} for c, (v, why) in verdicts.items()]
            _decide(d, verdicts, lexicon)
        todo = retry


def _value_lexicon(spec) -> tuple[list[str], list[str]]:
    """(value-word labels, item names to ignore) for the lexical value-leak check. Causal words
    ("because") are left to the judge: an answer may give a reason that names no value."""
    from corpus.demo_prefs import read_preferences, value_words

    try:
        prefs = read_preferences(spec)
        names = list(prefs.liked + prefs.disliked)
    except MsmError:
        names = []
    return [label for label in value_words() if label != "any_reason"], names


def _decide(d: Demo, verdicts: dict, lexicon) -> None:
    """Keep when every criterion passes and the judge says INCLUDE; the first failure is the reason."""
    if lexicon is not None:
        from corpus.demo_prefs import value_leaks

        labels, names = lexicon
        found = value_leaks(d.response or "", names, labels)
        if found:
            d.judgments.append({"judge": "rules:value_words", "criterion": VALUE_CRITERION, "verdict": False,
                                "score": None, "rationale": "value words: " + ", ".join(found), "call_key": None})
            d.drop("value_leak", ", ".join(found))
            return
    for criterion, (verdict, why) in verdicts.items():
        if criterion == DECISION or verdict:
            continue
        d.drop("value_leak" if criterion == VALUE_CRITERION else f"failed_{criterion}", why)
        return
    if not verdicts[DECISION][0]:
        d.drop("excluded", verdicts[DECISION][1])
        return
    d.status = "kept"


def contamination_hits(demos: dict, eval_texts: list, db, embeddings: bool) -> list:
    """Hits (corpus.decontam) for demonstrations, keyed as given: {key: (question, response)}.
    A demonstration is checked as its question and answer together, 13-grams and, with
    `embeddings`, MiniLM similarity."""
    from corpus.decontam import embedders, find_contamination

    if not demos:
        return []
    embed, item_embed = embedders(db) if embeddings else (None, None)
    return find_contamination({k: f"{q}\n\n{r}" for k, (q, r) in demos.items()}, eval_texts, embed, item_embed)


def _decontaminate(demos: list[Demo], eval_texts: list, db, embeddings: bool) -> int:
    """Drop the kept demonstrations that contain an eval item; returns how many."""
    kept = {f"{i}": d for i, d in enumerate(demos) if d.status == "kept"}
    hits = contamination_hits({k: (d.question, d.response) for k, d in kept.items()}, eval_texts, db, embeddings)
    for hit in hits:
        kept[hit.document].drop("contamination", f"{hit.item.item_id} ({hit.method}: {hit.evidence})")
    return len(hits)
