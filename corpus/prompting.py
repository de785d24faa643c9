"""Prompt templates (Jinja2 files, StrictUndefined: an unfilled slot is an error) and output parsing."""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

PROMPTS = Path(__file__).parent / "prompts"
JUDGE_CRITERIA = ("faithful", "fits_genre_audience", "realistic", "names_correct")


@lru_cache(maxsize=1)
def environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(PROMPTS)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=False, autoescape=False)


def render(name: str, **slots) -> str:
    return environment().get_template(name).render(**slots).strip()


def render_string(source: str, **slots) -> str:
    """A template held in a data file (a condition's instruction), with the same strict rules."""
    return environment().from_string(source).render(**slots).strip()


def prompt_hash(*names: str) -> str:
    """Identifies the exact template text a document was made with."""
    digest = hashlib.sha256()
    for name in names:
        digest.update((PROMPTS / name).read_bytes())
    return digest.hexdigest()[:16]


def extract_document(text: str, tagged: bool) -> tuple[str | None, str | None]:
    """(content, None) or (None, why not). With tags, only the text inside <document> is kept."""
    if "<document>" in text:
        after = text.split("<document>", 1)[1]
        if "</document>" not in after:
            return None, "unclosed <document>"
        content = after.split("</document>", 1)[0].strip()
        return (content, None) if content else (None, "empty <document>")
    if tagged:
        return None, "no <document> in the answer"
    content = text.strip()
    return (content, None) if content else (None, "empty answer")


_SENTENCE_END = re.compile(r"[.!?][\"'”’)]*(?=\s|$)")


def trim_to_boundary(text: str) -> str | None:
    """A cut-off answer shortened to its last whole paragraph (or, failing that, sentence), so a
    small model that never stops still yields a document that ends cleanly. None when nothing
    whole remains."""
    text = text.rstrip()
    cut = text.rfind("\n\n")
    if cut >= len(text) // 2:
        return text[:cut].rstrip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]].rstrip() if ends else None


def find_json(text: str | None, shape: str = "object"):
    """The outermost JSON object (or list) in a model's answer, or None: models wrap JSON in prose."""
    pattern = r"\{.*\}" if shape == "object" else r"\[.*\]"
    match = re.search(pattern, text or "", re.S)
    if not match:
        return None
    try:
        return json.loads(match.group(0))
    except json.JSONDecodeError:
        return None


LIST_LINE = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+(.+?)\s*$", re.M)
MARKDOWN_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")


def find_list(text: str | None) -> list | None:
    """A list the model was asked for as JSON: the JSON list, or else its numbered or bulleted lines
    (small models write Markdown lists however they are asked), or None."""
    found = find_json(text, "list")
    if found:
        return found
    items = [MARKDOWN_LINK.sub(r"\1", m).strip().strip("*_\"'`").strip() for m in LIST_LINE.findall(text or "")]
    return [i for i in items if i] or None


def parse_verdicts(text: str, criteria: tuple[str, ...] = JUDGE_CRITERIA) -> dict[str, tuple[bool, str]] | None:
    """The judge's JSON verdicts, or None when the answer is not the JSON asked for."""
    data = find_json(text)
    if data is None:
        return None
    verdicts = {}
    for criterion in criteria:
        entry = data.get(criterion) if isinstance(data, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("verdict"), bool):
            verdicts[criterion] = (entry["verdict"], str(entry.get("reason", "")))
        elif isinstance(entry, bool):
            verdicts[criterion] = (entry, "")
        else:
            return None
    return verdicts


def items_per_call(kind: str) -> tuple[int, int]:
    """(items one list request asks for, its max_tokens) from corpus/list_requests.yaml."""
    import yaml

    sizes = yaml.safe_load((Path(__file__).parent / "list_requests.yaml").read_text())[kind]
    return max(1, int(sizes["max_tokens"] // (sizes["tokens_per_item"] * sizes["headroom"]))), int(sizes["max_tokens"])
