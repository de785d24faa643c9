"""The `spec_qa` suite: open questions about a spec, answered in prose and graded against a rubric.

The grader is a capable LLM that marks each rubric point PASS or FAIL inside exact tags
(`<point n="1">PASS</point>`): the tags are parsed, never searched for words, so "yesterday" is not
"yes". A grader reply without a verdict for every point, or a failed call, is an *error*, reported
as such and never scored 0. An item scores 1 when every rubric point passes.

Without a grader the suite falls back to MiniLM cosine similarity between the answer and the
reference answer, scored 1 at or above a threshold, and every sample says it was graded that way.
"""

from __future__ import annotations

import re

from eval.sample import Sample
from eval.suites import Solved, Suite, load_bank_items
from msm.identity import default_identity

POINT = re.compile(r"<point\s+n=\"?(\d+)\"?\s*>\s*(PASS|FAIL)\s*</point>")
OFFLINE_THRESHOLD = 0.6


def grader_prompt(item, answer: str) -> str:
    points = "\n".join(f"{n}. {point}" for n, point in enumerate(item.rubric, 1))
    return (f"You are grading an answer to a question about an AI model's specification.\n\n"
            f"<question>\n{item.question}\n</question>\n\n<reference>\n{item.reference}\n</reference>\n\n"
            f"<answer>\n{answer}\n</answer>\n\nFor each point below, decide whether the answer states it "
            f"(in any words). Points:\n{points}\n\nReply with one line per point and nothing else, exactly like "
            f"this:\n" + "\n".join(f'<point n="{n}">PASS</point>' for n in range(1, len(item.rubric) + 1))
            + "\n(write FAIL instead of PASS for a point the answer does not state)")


def parse_grade(text: str, n_points: int) -> list[bool] | None:
    """One PASS/FAIL per rubric point, from exact tags; None unless every point has exactly one."""
    found: dict[int, list[str]] = {}
    for number, verdict in POINT.findall(text or ""):
        found.setdefault(int(number), []).append(verdict)
    if sorted(found) != list(range(1, n_points + 1)) or any(len(v) != 1 for v in found.values()):
        return None
    return [found[n][0] == "PASS" for n in range(1, n_points + 1)]


def grade_with_llm(items, answers: list, complete) -> list[Sample]:
    """`complete(list[str]) -> list[Response]` asks the grader; answers are the model's Responses."""
    samples, todo = [], []
    for item, answer in zip(items, answers):
        if not answer.ok:
            samples.append(Sample(item, item.question, {"answer": None}, error=f"model call failed: {answer.error}"))
        else:
            samples.append(Sample(item, item.question, {"answer": answer.text}))
            todo.append(len(samples) - 1)
    grades = complete([grader_prompt(samples[i].item, samples[i].detail["answer"]) for i in todo]) if todo else []
    for i, grade in zip(todo, grades):
        sample = samples[i]
        sample.detail["grader"] = (grade.text or "")[:2000]
        verdicts = parse_grade(grade.text, len(sample.item.rubric)) if grade.ok else None
        if verdicts is None:
            sample.error = (f"grader call failed: {grade.error}" if not grade.ok else
                            "grader reply has no exact PASS/FAIL tag for every rubric point")
            continue
        sample.detail["points"] = verdicts
        sample.consistent_p = sum(verdicts) / len(verdicts)
        sample.score = float(all(verdicts))
    return samples


def grade_offline(items, answers: list, embed, threshold: float = OFFLINE_THRESHOLD) -> list[Sample]:
    """MiniLM cosine of answer and reference; labelled as the offline grader in every sample."""
    import numpy as np

    samples = []
    ok = [(item, a) for item, a in zip(items, answers) if a.ok and (a.text or "").strip()]
    vectors = embed([a.text for _, a in ok] + [item.reference for item, _ in ok]) if ok else np.zeros((0, 1))
    cosines = {id(item): float(vectors[k] @ vectors[len(ok) + k]) for k, (item, _) in enumerate(ok)}
    for item, answer in zip(items, answers):
        detail = {"answer": answer.text if answer.ok else None, "grader": f"offline:minilm-cosine>={threshold}"}
        if id(item) not in cosines:
            why = f"model call failed: {answer.error}" if not answer.ok else "empty answer"
            samples.append(Sample(item, item.question, detail, error=why))
            continue
        cosine = cosines[id(item)]
        samples.append(Sample(item, item.question, detail, cosine, float(cosine >= threshold)))
    return samples


def solve(job) -> Solved:
    from eval.model_under_test import ask, open_judge
    from msm.llm.types import Request

    questions = [Request.user(item.question, max_tokens=256, temperature=0.0, purpose="eval") for item in job.items]
    answers = job.model.complete(questions)
    if job.judge:
        grader = open_judge(job.judge)

        def complete(texts):
            return ask(grader, [Request.user(t, max_tokens=200, temperature=0.0, purpose="judge") for t in texts])
        return Solved(grade_with_llm(job.items, answers, complete), "generate", grader=job.judge)
    from msm.models import load_embedder

    embedder = load_embedder()
    samples = grade_offline(job.items, answers, lambda texts: embedder.encode(texts, normalize_embeddings=True))
    return Solved(samples, "generate", "no --judge-backend: graded offline by MiniLM similarity to the reference",
                  grader={"offline": "minilm-cosine"})


def named(item, model_name: str, provider_name: str):
    """An item template with the model under test's names filled in: the questions ask about the
    model being trained, as its corpus does, not about a fixed assistant."""
    import dataclasses

    def fill(text: str) -> str:
        return text.replace("{model_name}", model_name).replace("{provider_name}", provider_name)
    return dataclasses.replace(item, question=fill(item.question), reference=fill(item.reference),
                               rubric=tuple(fill(r) for r in item.rubric))


def load_items(paths: list[str], options: dict) -> list:
    items = load_bank_items(paths, ("spec_qa",), "open", "spec_qa")
    return [named(i, options["model_name"], options["provider_name"]) for i in items]


_DEFAULT = default_identity()
SUITE = Suite("spec_qa", "open questions answered in prose, graded against a rubric (LLM grader, or MiniLM offline)",
              ("spec_qa",), load_items, solve, rate_label="every rubric point passes",
              options={"model_name": (str, _DEFAULT.model_name, "the model's name in the item templates"),
                       "provider_name": (str, _DEFAULT.provider_name, "its developer's name in the item templates")})
