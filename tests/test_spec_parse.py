"""The spec compiler on small, hand-made specs: structure, kinds, ids, placeholders, partition."""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corpus.spec import SpecError, parse_spec_text
from tests.conftest import assert_partition


def parse(text: str, **kw):
    spec = parse_spec_text(textwrap.dedent(text).lstrip("\n"), source="t.md", **kw)
    assert_partition(spec)
    return spec


def by_id(spec):
    return {u.id: u for u in spec.units}


def test_atx_headings_anchors_and_attributes():
    spec = parse("""
        # Safety {#safety}
        Intro.
        ## Honesty {#honesty kind=value}
        Text.
        ### Deep heading ###
        More.
        ## Other
        """)
    units = by_id(spec)
    assert units["safety"].kind == "section" and units["safety"].depth == 0
    assert units["honesty"].kind == "value" and units["honesty"].parent == "safety"
    assert units["honesty"].attrs == {"kind": "value"}
    assert units["honesty/deep_heading"].title == "Deep heading"
    assert units["honesty/deep_heading"].depth == 2
    assert units["safety/other"].parent == "safety"


def test_setext_headings_and_thematic_breaks():
    spec = parse("""
        Title
        =====
        Some prose.

        Sub title
        continues here
        ---
        Body.

        ---

        After a break.
        """)
    units = spec.units
    assert [u.kind for u in units] == ["section", "section"]
    assert units[0].title == "Title" and units[0].span == (1, 4)
    assert units[1].title == "Sub title continues here"
    assert units[1].parent == units[0].id and units[1].span[0] == 5


def test_hash_inside_code_fences_is_not_a_heading():
    spec = parse("""
        # Real {#real}
        ~~~xml
        <developer>
        ```python
        # not a heading
        ```
        # still not a heading
        ~~~
        ```
        ## nor this
        ```
        # Next {#next}
        """)
    assert [u.id for u in spec.units] == ["real", "next"]
    assert spec.units[0].span == (1, 11)


def test_rules_and_values_from_bold_leads_and_lists():
    spec = parse("""
        # Conduct {#conduct}
        **R1. Be honest.** Never state what you believe false.

        **V1. Trust.** People can rely on what the assistant says; R1 protects that.

        ## Rules {#rules}
        1. Ask before acting.
        2. Keep secrets.
           - Even from other agents.
           - Unless someone is in danger.
        3. **R2. Stop when told.** Always.

        A closing paragraph.
        """)
    units = by_id(spec)
    assert units["conduct/r1"].kind == "rule" and units["conduct/r1"].title == "R1. Be honest"
    assert units["conduct/r1"].attrs == {"code": "R1"}
    assert units["conduct/v1"].kind == "value"
    rules = [u for u in spec.units if u.parent == "rules"]
    assert [u.kind for u in rules] == ["rule", "rule", "rule", "text"]
    nested = [u for u in spec.units if u.parent == rules[1].id]
    assert len(nested) == 2 and all(u.kind == "rule" and u.depth == 3 for u in nested)
    assert rules[2].id == "rules/r2"
    assert rules[3].text.strip() == "A closing paragraph."


def test_prose_lists_stay_inside_their_section():
    spec = parse("""
        # Overview
        We need to:

        - deploy carefully
        - listen to users

        That is all.
        """)
    assert len(spec.units) == 1
    assert "listen to users" in spec.units[0].text


def test_tables_quotes_and_admonitions():
    spec = parse("""
        # Chain {#chain}
        | principal | authority |
        |-----------|-----------|
        | developer | high      |

        > A quoted line.
        > - not a list unit

        !!! example "A user asks for help"
            The user says hello.

            - not a unit either

        !!! meta "Commentary"
            Why this matters.

        Trailing prose.
        """)
    kinds = [(u.kind, u.title) for u in spec.units]
    assert kinds == [("section", "Chain"), ("example", "A user asks for help"), ("text", "Commentary"),
                     ("text", "Trailing prose.")]
    assert "| developer | high" in spec.units[0].text
    assert spec.units[1].attrs == {"admonition": "example"}


def test_plain_text_without_headings_gives_paragraph_units():
    spec = parse("""
        The assistant is honest.
        It says what it believes.

        It protects people's privacy.

        It defers to human oversight.
        """)
    assert [u.kind for u in spec.units] == ["text", "text", "text"]
    assert all(u.depth == 0 and u.parent is None for u in spec.units)
    assert spec.units[0].span == (1, 3)


def test_tag_blocks_hold_their_lists():
    spec = parse("""
        # Examples {#examples}
        **Example**: a refusal done well
        <assistant>
        1. first step
        2. second step
        </assistant>
        # After {#after}
        """)
    assert [u.kind for u in spec.units] == ["section", "example", "section"]
    assert spec.units[1].title == "a refusal done well"


def test_unclosed_tag_block_ends_at_a_heading():
    spec = parse("""
        # A {#a}
        <assistant>
        never closed
        # B {#b}
        text
        """)
    assert [u.id for u in spec.units] == ["a", "b"]


def test_ids_are_stable_across_runs_and_unrelated_edits():
    base = """
        # Honesty {#honesty}
        **R1. Be truthful.** text

        # Privacy
        Keep data private.

        1. **R2. Minimise.** Collect little.

        # Oversight
        - plain bullet
        """
    first = [u.id for u in parse(base).units]
    assert first == [u.id for u in parse(base).units]
    edited = base.replace("Keep data private.", "Keep personal data private, always.")
    edited = edited.replace("# Honesty {#honesty}", "# Honesty {#honesty}\n        A new intro line.\n")
    second = [u.id for u in parse(edited).units]
    assert first == second


def test_duplicate_titles_get_distinct_ids_and_duplicate_anchors_are_reported():
    spec = parse("""
        # A {#same}
        ## Notes
        one
        ## Notes
        two
        # B {#same}
        """)
    ids = [u.id for u in spec.units]
    assert len(set(ids)) == len(ids)
    assert any("duplicate id 'same'" in p.message for p in spec.problems)


def test_placeholders_fill_from_front_matter_and_vars_and_leave_other_braces():
    text = """
        ---
        name: demo
        model_name: Claude
        variables:
          org: Acme
        ---
        # About {model_name}
        {model_name} works for {org}; math like $\\int f(x) {dx}$ and JSON {"a": 1} stay.
        """
    spec = parse(text)
    assert spec.units[0].title == "About Claude"
    assert "Claude works for Acme; math like $\\int f(x) {dx}$" in spec.units[0].text
    assert '{"a": 1}' in spec.text
    other = parse(text, variables={"org": "Initech"})
    assert "works for Initech" in other.text
    assert other.sha256 != spec.sha256 and other.version != spec.version
    assert parse(text).sha256 == spec.sha256


def test_unfilled_placeholder_is_reported_with_its_line():
    spec = parse("""
        # Rules
        {provider_name} trains the model.
        """)
    (problem,) = [p for p in spec.problems if "unfilled" in p.message]
    assert problem.line == 2 and problem.severity == "error"
    assert "{provider_name}" in spec.text


def test_unknown_var_is_refused():
    with pytest.raises(SpecError, match="unknown placeholder 'colour'"):
        parse_spec_text("# A\ntext\n", variables={"colour": "red"})


def test_front_matter_errors():
    with pytest.raises(SpecError, match="never closed"):
        parse_spec_text("---\nname: x\n# A\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        parse_spec_text("---\nname: [x\n---\n# A\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        parse_spec_text("---\n- a\n- b\n---\n# A\n")
    with pytest.raises(SpecError, match="no content"):
        parse_spec_text("---\nname: x\n---\n\n")


def test_spans_count_file_lines_after_front_matter():
    spec = parse("""
        ---
        name: x
        ---

        # A
        text
        """)
    assert spec.body_start == 4
    assert spec.units[0].span == (4, 6)


def test_crlf_and_no_trailing_newline():
    spec = parse_spec_text("# A\r\ntext\r\n## B\r\nmore", source="t.md")
    assert_partition(spec)
    assert [u.title for u in spec.units] == ["A", "B"]


TRICKY_LINES = [
    "", "", "# H {#h}", "## Rules", "### Sub", "text line", "more text", "Title", "=====", "---", "***",
    "- item", "  - nested", "1. one", "2) two", "**R1. Rule.** body", "**Value:** why", "**Example**: e",
    "```", "~~~", "```python", "| a | b |", "> quote", "!!! note \"N\"", "    indented", "<user>", "</user>",
    "<assistant> <!-- GOOD -->", "</assistant>", "{model_name} says {x}", "\ttabbed", "# dup {#h}",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TRICKY_LINES), min_size=1, max_size=40))
def test_partition_holds_for_any_mix_of_constructs(lines):
    text = "\n".join(["intro", *lines])  # a first line of '---' would open front matter
    spec = parse_spec_text(text, source="fuzz.md")
    assert_partition(spec)
