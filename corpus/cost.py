"""The expected cost of a corpus build: token usage predicted from the stated assumptions in
corpus/cost_model.yaml, beside the upper bound that prices every call at its full max_tokens.

A budget is refused against the expected figure (a build that would stop short of its target),
and the upper bound says what a run can cost at most. Nothing here reads the simulator's data.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import yaml

from msm.errors import MsmError
from msm.llm.pricing import rough_tokens
from msm.llm.types import Request, Usage

COST_MODEL = Path(__file__).with_name("cost_model.yaml")


@lru_cache(maxsize=1)
def cost_model() -> dict:
    try:
        return yaml.safe_load(COST_MODEL.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise MsmError(f"cannot read the cost model {COST_MODEL} ({str(exc).splitlines()[0]})",
                       "restore the file from the repository") from None


def document_tokens(genre: dict | object, compact: bool = False) -> float:
    """Tokens of one written document of this genre: its range's midpoint in words, as tokens."""
    m = cost_model()
    if compact:
        return m["compact_words"] * m["tokens_per_word"]
    words = genre["words"] if isinstance(genre, dict) else genre.words
    return (words[0] + words[1]) / 2 * m["length_share"] * m["tokens_per_word"]


def kept_tokens_per_doc(genres, local: bool) -> float:
    """Kept tokens a planned document yields on average, before any round has been measured."""
    m = cost_model()
    if local:
        return float(m["local_kept_tokens_per_doc"])
    return sum(document_tokens(g) for g in genres) / len(genres) * m["survival"]


def _add(usage: Usage, request: Request, output: float, seen: set, times: float = 1.0) -> None:
    """One request's expected usage, `times` over; a repeated prefix is read from the cache."""
    body = rough_tokens("".join(m.content for m in request.messages) + (request.system or ""))
    if request.system_prefix:
        prefix = rough_tokens(request.system_prefix)
        if request.system_prefix in seen:
            usage.cache_read_tokens += prefix * times
        else:
            seen.add(request.system_prefix)
            usage.cache_write_tokens += prefix
            usage.cache_read_tokens += prefix * (times - 1)
    usage.input_tokens += body * times
    usage.output_tokens += min(request.max_tokens, output) * times


def expected_rows_usage(ctx, rows) -> Usage:
    """Expected usage of writing, (revising) and judging these plan rows: answers as long as the
    genre asks plus the scratchpad, a share regrown, one judge call per document."""
    m = cost_model()
    usage, seen = Usage(), set()
    for plan_row in rows:
        row = plan_row.to_json()
        doc = document_tokens(ctx.genres[row["genre"]], ctx.compact)
        written = doc + (m["scratchpad_tokens"] if ctx.scratchpad else 0)
        _add(usage, ctx.generate_request(row), written, seen, 1 + m["regrow_share"])
        text = "x" * int(doc * 4)  # a document of the expected length, at ~4 characters a token
        if ctx.revise:
            critique = "x" * (m["revise"]["critique_tokens"] * 4)
            _add(usage, ctx.critique_request(row, text), m["revise"]["critique_tokens"], seen)
            _add(usage, ctx.rewrite_request(row, text, critique), doc, seen)
        if ctx.judge == "llm":
            verdicts = m["judge"]["answer_tokens_base"] + m["judge"]["answer_tokens_per_criterion"] * len(
                ctx.judge_criteria(row))
            _add(usage, ctx.judge_request(row, text), verdicts, seen, 1 + m["judge"]["retry_share"])
    return _rounded(usage)


def _rounded(usage: Usage) -> Usage:
    return Usage(*(int(round(getattr(usage, f))) for f in ("input_tokens", "output_tokens", "cache_read_tokens",
                                                             "cache_write_tokens")))


def brainstorm_limits() -> tuple[int, int]:
    """(plan slots per ideas call, an ideas call's max_tokens): the planner's own constants when
    corpus.brainstorm has them, else the cost model's."""
    m = cost_model()["brainstorm"]
    try:
        from corpus.brainstorm import IDEA_TOKENS, IDEAS_PER_CALL
    except ImportError:
        return int(m["ideas_per_call"]), int(m["max_tokens"])
    return int(IDEAS_PER_CALL), int(IDEA_TOKENS)


def brainstorm_usage(unit_texts: list[str], docs: int, upper: bool = False) -> tuple[int, Usage]:
    """(calls, usage) of brainstorming `docs` plan slots spread evenly over these units: one
    assertions call per unit, ceil(slots / per call) idea calls per unit, plus top-up rounds."""
    m = cost_model()["brainstorm"]
    per_call, room = brainstorm_limits()
    usage, calls = Usage(), 0.0
    base, extra = divmod(docs, len(unit_texts))
    for i, text in enumerate(unit_texts):
        slots = base + (1 if i < extra else 0)
        if not slots:
            continue
        unit = rough_tokens(text)
        calls += 1
        usage.input_tokens += m["prompt_tokens"] + unit
        usage.output_tokens += room if upper else m["assertion_answer_tokens"]
        chunks = math.ceil(slots / per_call)
        times = chunks * (1 + m["top_up_share"])
        calls += times
        usage.input_tokens += times * (m["prompt_tokens"] + unit) + slots * (1 + m["top_up_share"]) * m[
            "slot_prompt_tokens"]
        usage.output_tokens += times * room if upper else slots * (1 + m["top_up_share"]) * m[
            "idea_answer_tokens_per_slot"]
    return int(round(calls)), _rounded(usage)


def expected_demos_usage(spec, n: int, cot: bool, domains: int = 8, behaviors_only: bool = False,
                         style: str = "values") -> tuple[int, Usage]:
    """(calls, usage) of writing `n` demonstrations: the question lists, an answer per question that
    is not a duplicate, a judge call per answer, and one backfill round for what the judge drops.
    The prompts are the real templates rendered around texts of the expected lengths."""
    from corpus.demos import CRITERIA, QUESTION_TOKENS, QUESTIONS_PER_CALL, RESPONSE_TEMPLATES, VALUE_CRITERION
    from corpus.prompting import render

    m, d = cost_model(), cost_model()["demos"]
    names = spec.names
    prefix = render("demo_system.j2", spec_name=spec.name, spec_text=spec.text, **names)
    question = "x" * (d["question_tokens"] * 4)
    reasoning = "x" * (d["reasoning_tokens"] * 4) if cot else None
    answer_tokens = d["response_tokens"] + (d["reasoning_tokens"] if cot else 0)
    response = "x" * (d["response_tokens"] * 4)
    criteria = len(CRITERIA) + (1 if behaviors_only else 0) + 1
    verdicts = d["judge_answer_tokens"] + m["judge"]["answer_tokens_per_criterion"] * criteria

    def req(text: str, room: int) -> Request:
        from msm.llm.types import Message

        return Request(messages=(Message("user", text),), system_prefix=prefix, max_tokens=room)

    asked = n * d["questions_per_wanted"]
    answered = asked * (1 - d["duplicate_share"])
    kept = answered * d["kept_share"]
    if kept < n:  # one backfill round, sized as corpus/demos.py sizes it (x1.2 over the rate)
        more = (n - kept) / d["kept_share"] * 1.2
        asked, answered = asked + more, answered + more * (1 - d["duplicate_share"])
    usage, seen = Usage(), set()
    per_domain = math.ceil(n * d["questions_per_wanted"] / domains)
    lists = domains * math.ceil(per_domain / QUESTIONS_PER_CALL) * (asked / (n * d["questions_per_wanted"]))
    _add(usage, req(render("demo_questions.j2", count=QUESTIONS_PER_CALL, domain="x" * 20, existing=[], part=1, parts=1, **names),
                    QUESTION_TOKENS), asked / lists * d["question_tokens"], seen, lists)
    _add(usage, req(render(RESPONSE_TEMPLATES[style], question=question, cot=cot, behaviors_only=behaviors_only,
                           **names), 1 << 20), answer_tokens, seen, answered)
    _add(usage, req(render("demo_judge.j2", question=question, reasoning=reasoning, response=response,
                           behaviors_only=behaviors_only, style=style, **names), 1 << 20), verdicts, seen,
         answered * (1 + m["judge"]["retry_share"]))
    return int(round(lists + answered * (2 + m["judge"]["retry_share"]) + 1)), _rounded(usage)
