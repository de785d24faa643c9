"""The block scanner: one pass over a spec's body lines, in linear time, yielding units.

A unit starts on a line (a heading, a rule item, an admonition, a stray paragraph...) and runs
until the next unit starts, so the spans partition the body by construction. Structure
(parent, depth) is tracked separately from spans. See specs/README.md for the conventions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from corpus.spec import Problem, Unit, slugify, spec_format

HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
ANCHOR = re.compile(r"[ \t]*\{#([^\s{}]+)((?:[ \t]+[^\s{}=]+=[^\s{}]*)*)[ \t]*\}[ \t]*$")
CLOSING_HASHES = re.compile(r"(?:^|[ \t]+)#+[ \t]*$")
FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})(.*)$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
THEMATIC = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
LIST_ITEM = re.compile(r"^([ \t]*)([-*+]|\d{1,9}[.)])(?:([ \t]+)(.*))?$")
ADMONITION = re.compile(r'^(?:!!!|\?\?\?\+?)[ \t]+([\w-]+)(?:[ \t]+"([^"]*)")?[ \t]*$')
TAG_OPEN = re.compile(r"^<([A-Za-z][\w-]*)(?:\s[^>]*)?>[ \t]*(?:<!--.*?-->[ \t]*)?$")
TAG_CLOSE = re.compile(r"^</([A-Za-z][\w-]*)>[ \t]*$")
BOLD_LEAD = re.compile(r"^\*\*(.+?)\*\*[ \t]*(.*)$")
CODE_LEAD = re.compile(r"^([A-Za-z]{1,3})[ \t]?(\d+(?:\.\d+)*)[.:)]?(?:[ \t]+(.*))?$")
VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "wbr"}


def _indent(line: str) -> int:
    n = len(line) - len(line.lstrip(" \t"))
    return len(line[:n].expandtabs(4))


def _fence_of(m: re.Match) -> tuple[str, int] | None:
    """A backtick fence's info string may not contain backticks (then it is inline code)."""
    if m.group(1)[0] == "`" and "`" in m.group(2):
        return None
    return m.group(1)[0], len(m.group(1))


def _short_hash(text: str) -> str:
    return hashlib.sha1(" ".join(text.split()).encode()).hexdigest()[:8]


def _short_title(text: str, limit: int = 60) -> str:
    # Emphasis underscores go; underscores inside words ({model_name}, snake_case) stay.
    text = " ".join(re.sub(r"[*`#>|]|(?<!\w)_+|_+(?!\w)", "", text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


@dataclass
class _ListEntry:
    content_indent: int
    unit: Unit | None


@dataclass
class _Lead:
    kind: str | None  # set when the lead itself names a kind (R1, Value:, Example...)
    code: str | None
    title: str


class _Scanner:
    def __init__(self, lines: list[str], body_start: int):
        fmt = spec_format()
        self.code_prefixes = fmt["code_prefixes"]
        self.kind_words = fmt["kind_words"]
        self.section_item_words = fmt["section_item_words"]
        self.admonition_kinds = fmt["admonition_kinds"]
        self.lines = lines
        self.body_start = body_start
        self.units: list[Unit] = []
        self.starts: list[int] = []
        self.heading_lines: dict[int, int] = {}  # unit index -> number of heading lines
        self.item_kind: dict[str, str] = {}  # section id -> kind its list items take
        self.ids: set[str] = set()
        self.explicit: dict[str, int] = {}  # explicit {#anchor} ids -> line
        self.codes: dict[str, int] = {}  # bold-lead codes (R1, V2...) -> line
        self.problems: list[Problem] = []
        self.sections: list[tuple[int, Unit]] = []
        self.lists: list[_ListEntry] = []
        self.open = False  # does the last unit take the prose that follows?
        self.paragraph_mode = False  # a top-level text unit ends at a blank line
        self.para_start: int | None = None

    # ---- units -------------------------------------------------------------------------
    def section(self) -> Unit | None:
        return self.sections[-1][1] if self.sections else None

    def add(self, i: int, kind: str, title: str, parent: Unit | None, hint: str, explicit: str | None = None,
            attrs: dict | None = None) -> Unit:
        line_no = self.body_start + i
        if explicit:
            uid = explicit
            if uid in self.explicit:
                self.problems.append(Problem("error", line_no, f"duplicate id '{uid}' (also on line {self.explicit[uid]}): give each heading its own {{#anchor}}"))
            else:
                self.explicit[uid] = line_no
        else:
            uid = f"{parent.id}/{hint}" if parent else hint
        if uid in self.ids:
            base = f"{uid}-{_short_hash(self.lead_text(i))}"
            uid, n = base, 2
            while uid in self.ids:
                uid, n = f"{base}-{n}", n + 1
        self.ids.add(uid)
        unit = Unit(uid, kind, title, parent.id if parent else None, parent.depth + 1 if parent else 0, (0, 0),
                    attrs=attrs or {})
        self.units.append(unit)
        self.starts.append(i)
        self.open = True
        self.paragraph_mode = False
        return unit

    def lead_text(self, i: int) -> str:
        """The unit's first line and the one after it: enough to tell look-alike units apart."""
        return "\n".join(self.lines[i : i + 2])

    def drop_last(self) -> None:
        unit = self.units.pop()
        self.starts.pop()
        self.ids.discard(unit.id)
        self.explicit.pop(unit.id, None)
        self.codes.pop(str(unit.attrs.get("code", "")).upper(), None)

    def ensure_open(self, i: int) -> None:
        """Prose with no unit to take it starts a text unit (a paragraph unit at top level)."""
        if self.open:
            return
        parent = self.section()
        text = self.lines[i]
        self.add(i, "text", _short_title(text), parent, f"text-{_short_hash(text)}")
        self.paragraph_mode = parent is None

    # ---- leads -------------------------------------------------------------------------
    def parse_lead(self, content: str) -> _Lead | None:
        m = BOLD_LEAD.match(content)
        if not m:
            return None
        lead = m.group(1).strip().rstrip(":").strip()
        rest = m.group(2).lstrip(":").strip()
        code = CODE_LEAD.match(lead)
        if code and code.group(1).lower() in self.code_prefixes:
            kind = self.code_prefixes[code.group(1).lower()]
            return _Lead(kind, f"{code.group(1)}{code.group(2)}", lead.rstrip(".:").strip())
        first = re.split(r"[\s:.]+", lead.lower(), maxsplit=1)[0]
        if first in self.kind_words:
            # "**Example**: a user asks..." is titled by what follows the generic word
            title = lead.rstrip(".:").strip()
            if slugify(title) in self.kind_words and rest:
                title = _short_title(rest)
            return _Lead(self.kind_words[first], None, title)
        return _Lead(None, None, lead.rstrip(".:").strip())

    def lead_unit(self, i: int, lead: _Lead, kind: str, parent: Unit | None, text: str) -> Unit:
        if lead.code:
            hint = slugify(lead.code)
            key = lead.code.upper()
            if key in self.codes:
                self.problems.append(Problem("error", self.body_start + i, f"duplicate id: code {lead.code} is also used on line {self.codes[key]}; number each item once"))
            else:
                self.codes[key] = self.body_start + i
        else:
            generic = slugify(BOLD_LEAD.match(text).group(1)) in self.kind_words
            hint = f"{kind}-{_short_hash(text)}" if generic else slugify(lead.title)
        return self.add(i, kind, lead.title, parent, hint, attrs={"code": lead.code} if lead.code else None)

    # ---- the pass ----------------------------------------------------------------------
    def run(self) -> tuple[list[Unit], list[Problem]]:
        fence: tuple[str, int] | None = None
        admonition = False
        tags: list[str] = []
        prev_blank = True
        for i, line in enumerate(self.lines):
            stripped = line.strip()
            if fence:
                m = FENCE.match(line)
                if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= fence[1] and not m.group(2).strip():
                    fence = None
                continue
            if admonition:
                if not stripped or _indent(line) >= 4:
                    continue
                admonition = False
                self.open = False
            if tags:
                if m := FENCE.match(line):
                    fence = _fence_of(m)
                    continue
                if not (line.startswith("#") and HEADING.match(line)):
                    self.track_tags(stripped, tags)
                    continue
                tags.clear()  # a heading at column 0 ends an unclosed tag block
            if not stripped:
                self.para_start = None
                prev_blank = True
                if self.paragraph_mode:
                    self.open = False
                continue
            indent = _indent(line)
            self.end_lists(indent, prev_blank, LIST_ITEM.match(line) is not None)
            plain = False
            if self.para_start is not None and not self.lists and SETEXT.match(line):
                self.setext(i, line)
            elif m := HEADING.match(line):
                self.heading(i, len(m.group(1)), m.group(2) or "")
            elif m := FENCE.match(line):
                fence = _fence_of(m)
                self.ensure_open(i)
            elif indent == 0 and (m := ADMONITION.match(line)):
                self.admonition(i, m)
                admonition = True
            elif THEMATIC.match(line):
                self.ensure_open(i)
            elif m := LIST_ITEM.match(line):
                self.list_item(i, indent, m)
            elif indent == 0 and (m := TAG_OPEN.match(line)) and m.group(1).lower() not in VOID_TAGS:
                self.ensure_open(i)
                tags.append(m.group(1))
            else:
                plain = stripped[0] not in "|>"
                lead = self.parse_lead(stripped) if plain and indent < 4 and not self.lists and self.para_start is None else None
                section = self.section()
                kind = lead and (lead.kind or (self.item_kind.get(section.id) if section else None))
                if kind:
                    self.lead_unit(i, lead, kind, section, stripped)
                else:
                    self.ensure_open(i)
            if plain and not self.lists:
                if self.para_start is None:
                    self.para_start = i
            else:
                self.para_start = None
            prev_blank = False
        return self.finish()

    def admonition(self, i: int, m: re.Match) -> None:
        self.lists.clear()
        kind = self.admonition_kinds.get(m.group(1).lower(), "text")
        title = m.group(2) or m.group(1).capitalize()
        self.add(i, kind, title, self.section(), slugify(title), attrs={"admonition": m.group(1).lower()})

    def end_lists(self, indent: int, prev_blank: bool, is_item: bool) -> None:
        if not self.lists:
            return
        closed_a_unit = False
        while self.lists and indent < self.lists[-1].content_indent and (prev_blank or is_item):
            closed_a_unit |= self.lists.pop().unit is not None
        if closed_a_unit and not self.lists and not is_item:
            self.open = False  # prose after a list of units starts its own text unit

    def track_tags(self, stripped: str, tags: list[str]) -> None:
        if m := TAG_CLOSE.match(stripped):
            if m.group(1) in tags:
                while tags and tags.pop() != m.group(1):
                    pass
        elif (m := TAG_OPEN.match(stripped)) and m.group(1).lower() not in VOID_TAGS:
            tags.append(m.group(1))

    def heading(self, i: int, level: int, raw: str, n_lines: int = 1) -> None:
        attrs: dict[str, str] = {}
        explicit = None
        if m := ANCHOR.search(raw):
            explicit = m.group(1)
            for pair in m.group(2).split():
                key, _, value = pair.partition("=")
                attrs[key] = value
            raw = raw[: m.start()]
        title = CLOSING_HASHES.sub("", raw).strip()
        while self.sections and self.sections[-1][0] >= level:
            self.sections.pop()
        self.lists.clear()
        kind = self.kind_words.get(attrs.get("kind", "").lower(), "section")
        parent = self.section()
        unit = self.add(i, kind, title, parent, slugify(title), explicit, attrs=attrs or None)
        self.heading_lines[len(self.units) - 1] = n_lines
        item_kind = self.kind_words.get(attrs.get("items", "").lower())
        if not item_kind:
            words = re.findall(r"[a-z]+", title.lower())
            item_kind = next((self.section_item_words[w] for w in words if w in self.section_item_words), None)
        if item_kind:
            self.item_kind[unit.id] = item_kind
        self.sections.append((level, unit))

    def setext(self, i: int, line: str) -> None:
        start = self.para_start
        assert start is not None
        if self.starts and self.starts[-1] == start:
            self.drop_last()
        title = " ".join(ln.strip() for ln in self.lines[start:i])
        self.heading(start, 1 if line.strip()[0] == "=" else 2, title, n_lines=i - start + 1)

    def list_item(self, i: int, indent: int, m: re.Match) -> None:
        marker, spaces, content = m.group(2), m.group(3) or "", (m.group(4) or "").strip()
        width = len(spaces.expandtabs(4)) if spaces else 1
        content_indent = indent + len(marker) + (width if 0 < width <= 4 else 1)
        parent_entry = self.lists[-1] if self.lists else None
        lead = self.parse_lead(content)
        if parent_entry is not None:
            inherited = parent_entry.unit.kind if parent_entry.unit is not None else None
            parent = parent_entry.unit or None
        else:
            section = self.section()
            inherited = self.item_kind.get(section.id) if section else None
            parent = section
        kind = (lead.kind if lead else None) or inherited
        unit = None
        if kind and (parent_entry is None or parent_entry.unit is not None or (lead and lead.kind)):
            if parent is None and parent_entry is not None:
                parent = self.section()
            if lead:
                unit = self.lead_unit(i, lead, kind, parent, content)
            else:
                unit = self.add(i, kind, _short_title(content), parent, f"{kind}-{_short_hash(content)}")
        else:
            self.ensure_open(i)
        self.lists.append(_ListEntry(content_indent, unit))

    def finish(self) -> tuple[list[Unit], list[Problem]]:
        n = len(self.lines)
        if self.starts:
            self.starts[0] = 0  # leading blank lines belong to the first unit
        has_children = {u.parent for u in self.units if u.parent}
        for k, unit in enumerate(self.units):
            first = self.starts[k]
            last = self.starts[k + 1] - 1 if k + 1 < len(self.units) else n - 1
            unit.span = (self.body_start + first, self.body_start + last)
            if k in self.heading_lines and unit.id not in has_children:
                head = self.heading_lines[k]
                body = self.lines[first:last + 1]
                content_start = next((j for j, ln in enumerate(body) if ln.strip()), 0) + head
                if not any(ln.strip() for ln in body[content_start:]):
                    self.problems.append(Problem("warning", unit.span[0], f"section '{unit.title}' is empty: write its content or remove the heading"))
        return self.units, self.problems


def scan_units(lines: list[str], body_start: int) -> tuple[list[Unit], list[Problem]]:
    return _Scanner(lines, body_start).run()
