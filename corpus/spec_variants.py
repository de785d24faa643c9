"""Spec variants derived from a spec, deterministically.

`rules_only` keeps the rule units (text as written, placeholders intact) and the headings of the
sections that hold them, and drops everything else: values, examples, prose. Applied to a V+
spec of a family, its anchored core rules come out byte-identical to the family's R spec, so the
variant can stand in for R or check it.
"""

from __future__ import annotations

import re

import yaml

from corpus.spec import Spec, read_spec_text

SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")


def rules_only(spec: Spec) -> str:
    lines = [ln.removesuffix("\r") for ln in read_spec_text(spec.path).split("\n")]  # as the parser splits
    by_id = {u.id: u for u in spec.units}
    holds_rule: set[str] = set()
    for unit in spec.units:
        if unit.kind == "rule":
            parent = unit.parent
            while parent is not None:
                holds_rule.add(parent)
                parent = by_id[parent].parent
    blocks = []
    for unit in spec.units:
        first, last = unit.span
        raw = lines[first - 1 : last]
        while raw and not raw[0].strip():  # the first unit also holds the blank lines after the front matter
            raw = raw[1:]
        if unit.kind == "rule":
            blocks.append("\n".join(raw).rstrip())
        elif unit.kind == "section" and unit.id in holds_rule:
            setext = len(raw) > 1 and SETEXT_UNDERLINE.match(raw[1])
            blocks.append("\n".join(raw[:2] if setext else raw[:1]).rstrip())
    front = dict(spec.front_matter)
    front["name"] = f"{spec.name}_rules_only"
    front["description"] = f"Rules-only variant of {spec.name}, derived by `msm spec variants --rules-only`."
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=1000).strip()
    return f"---\n{header}\n---\n\n" + "\n\n".join(blocks) + "\n"
