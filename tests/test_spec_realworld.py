"""OpenAI's Model Spec (CC0, in ../shared/realworld): a long spec that follows none of our conventions."""

from __future__ import annotations

import json
import re

import pytest

from corpus.spec import load_spec
from tests.conftest import OPENAI_SPEC, assert_partition, run_msm

pytestmark = pytest.mark.skipif(not OPENAI_SPEC.is_file(), reason="../shared/realworld is not present")


def heading_anchors(path) -> list[tuple[int, str]]:
    """(line, anchor) of every ATX heading outside code fences, found independently of the parser."""
    found, fence = [], None
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        m = re.match(r"^(`{3,}|~{3,})", line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and line.strip() == m.group(1):
                fence = None
            continue
        if m:
            fence = m.group(1)
            continue
        if h := re.match(r"^#{1,6}\s.*\{#([^\s}]+)", line):
            found.append((n, h.group(1)))
    return found


def test_every_heading_is_a_unit_with_its_anchor_id():
    spec = load_spec(OPENAI_SPEC)
    assert_partition(spec)
    anchors = heading_anchors(OPENAI_SPEC)
    assert len(anchors) >= 80
    units = {u.id: u for u in spec.units}
    for line, anchor in anchors:
        assert anchor in units, anchor
        assert units[anchor].kind == "section"
        assert units[anchor].span[0] == line
    assert not spec.problems


def test_latex_braces_are_not_placeholders():
    spec = load_spec(OPENAI_SPEC)
    raw = OPENAI_SPEC.read_text(encoding="utf-8")
    assert "{dx}" in raw
    assert spec.text == raw  # nothing substituted, nothing lost


def test_show_json_satisfies_the_partition_property():
    result = run_msm("spec", "show", str(OPENAI_SPEC), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"spec_id", "name", "sha256", "variables", "style", "units"}
    spans = [u["span"] for u in data["units"]]
    n_lines = len(OPENAI_SPEC.read_text(encoding="utf-8").split("\n"))
    covered = [line for first, last in spans for line in range(first, last + 1)]
    assert covered == list(range(1, n_lines + 1))
    assert {"id", "kind", "title", "parent", "depth", "span", "text"} <= set(data["units"][0])
