"""Validation beyond parsing: what `msm spec check` reports."""

from __future__ import annotations

import difflib
from bisect import bisect_right

from corpus.spec import PLACEHOLDER, Problem, Spec, line_offsets, spec_format


def check_spec(spec: Spec) -> list[Problem]:
    problems = list(spec.problems)
    known = spec_format()["front_matter_keys"]
    for key in spec.front_matter:
        if key not in known:
            problems.append(Problem("warning", 1, f"unknown front-matter key '{key}': known keys are {', '.join(known)}"))
    problems += near_miss_placeholders(spec)
    return sorted(problems, key=lambda p: (p.line or 0, p.severity))


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
