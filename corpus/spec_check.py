"""Validation beyond parsing: what `msm spec check` reports."""

from __future__ import annotations

import difflib
import re
from bisect import bisect_right
from pathlib import Path

from corpus.spec import PLACEHOLDER, Problem, Spec, line_offsets, spec_format


def check_spec(spec: Spec, scenarios: list[str | Path] | None = None, embeddings: bool = False) -> list[Problem]:
    """Every problem of a spec. `scenarios`: agentic scenario folders a unit must not rehearse
    (None: the project's eval/agentic/scenarios); `embeddings`: compare with MiniLM too (slow)."""
    problems = list(spec.problems)
    known = spec_format()["front_matter_keys"]
    for key in spec.front_matter:
        if key not in known:
            problems.append(Problem("warning", 1, f"unknown front-matter key '{key}': known keys are {', '.join(known)}"))
    problems += near_miss_placeholders(spec)
    problems += scenario_rehearsals(spec, scenarios, embeddings)
    return sorted(problems, key=lambda p: (p.line or 0, p.severity))


def unit_texts(spec: Spec, min_words: int) -> list[tuple[int, str]]:
    """(unit index, text): every unit whole, then each of its sentences, so that one sentence
    close to a scenario cannot hide in a long unit (bold leads and headings left out of these)."""
    out = []
    for k, unit in enumerate(spec.units):
        if not unit.text.strip():
            continue
        out.append((k, unit.text))
        prose = re.sub(r"^#+ .*$", " ", re.sub(r"\*\*[^*]+\*\*", " ", unit.text), flags=re.M)
        out += [(k, x) for x in re.split(r"(?<=[.!?;:])\s+", " ".join(prose.split())) if len(x.split()) >= min_words]
    return out


def scenario_rehearsals(spec: Spec, scenarios: list[str | Path] | None = None, embeddings: bool = False,
                        embed=None) -> list[Problem]:
    """Units that share a word n-gram with an agentic scenario's text, and (with `embeddings`) units
    or sentences whose MiniLM cosine to a scenario passage reaches corpus/decontam.yaml's
    spec_check.similarity: a spec must not rehearse an eval scenario. `embed(texts)` gives unit
    vectors (default: MiniLM)."""
    from corpus.decontam import default_scenario_dirs, load_scenario_texts, ngram_index, thresholds, words

    limits = thresholds()["spec_check"]
    texts = load_scenario_texts(default_scenario_dirs() if scenarios is None else list(scenarios))
    if not texts:
        return []
    n = limits["ngram"]
    index = ngram_index(texts, n)
    found: dict[int, Problem] = {}
    for k, unit in enumerate(spec.units):
        w = words(unit.text)
        for i in range(len(w) - n + 1):
            passage = index.get(tuple(w[i : i + n]))
            if passage is not None:
                found[k] = Problem("error", unit.span[0], f"unit '{unit.id}' rehearses agentic scenario "
                                   f"'{passage.scenario}': it shares the {n} words \"{' '.join(w[i : i + n])}\" with "
                                   f"{_where(passage)}; write examples far from the evaluation")
                break
    texts = [t for t in texts if t.embedded]
    if embeddings and texts:
        import numpy as np

        if embed is None:
            from msm.models import load_embedder

            model = load_embedder()

            def embed(batch):
                return model.encode(batch, normalize_embeddings=True, batch_size=64)

        pairs = [(k, t) for k, t in unit_texts(spec, limits["min_sentence_words"]) if k not in found]
        if pairs:
            sims = np.asarray(embed([t for _, t in pairs])) @ np.asarray(embed([t.plain for t in texts])).T
            best = sims.argmax(axis=1)
            for row in np.argsort(-sims.max(axis=1)):
                k, score = pairs[row][0], float(sims[row, best[row]])
                if score < limits["similarity"]:
                    break
                if k in found:
                    continue
                unit, passage = spec.units[k], texts[best[row]]
                found[k] = Problem("error", unit.span[0], f"unit '{unit.id}' rehearses agentic scenario "
                                   f"'{passage.scenario}': MiniLM cosine {score:.2f} (at least {limits['similarity']}) "
                                   f"to {_where(passage)}; write examples far from the evaluation")
    return list(found.values())


def _where(passage) -> str:
    """SCENARIO/file:line of a scenario passage."""
    return f"{passage.item_id}:{passage.source.rsplit(':', 1)[1]}"


def near_miss_placeholders(spec: Spec) -> list[Problem]:
    """`{model_nmae}` is literal text by the rules; it is almost surely a typo, so say so."""
    declared = set(spec_format()["standard_placeholders"]) | set(spec.front_matter.get("variables") or {})
    found = []
    offsets = None
    for m in PLACEHOLDER.finditer(spec.text):
        name = m.group(1)
        if name in declared:
            continue
        close = difflib.get_close_matches(name, declared, n=1, cutoff=0.8)
        if close:
            offsets = offsets or line_offsets(spec.text)
            line = spec.body_start + bisect_right(offsets, m.start()) - 1
            found.append(Problem("warning", line, f"{{{name}}} is not a placeholder: did you mean {{{close[0]}}}?"))
    return found
