"""Spec IR: read a spec file, fill its placeholders and hand the body to the block scanner.

The IR is deterministic (no model, no network) and lossless: the units' spans partition the
lines after the front matter, so joining every unit's text gives back the rendered body.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from msm.errors import MsmError

MAX_SPEC_BYTES = int(os.environ.get("MSM_SPEC_MAX_MB", "32")) * 1024 * 1024
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SpecError(MsmError):
    """The spec cannot be read or parsed."""


@lru_cache(maxsize=1)
def spec_format() -> dict:
    with open(Path(__file__).with_name("spec_format.yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@dataclass
class Unit:
    id: str
    kind: str
    title: str
    parent: str | None
    depth: int
    span: tuple[int, int]
    text: str = ""
    attrs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "title": self.title,
            "parent": self.parent,
            "depth": self.depth,
            "span": list(self.span),
            "text": self.text,
            "attrs": self.attrs,
        }


@dataclass
class Problem:
    severity: str  # "error" or "warning"
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{self.severity}: {where}{self.message}"


@dataclass
class Spec:
    spec_id: str
    name: str
    path: str
    sha256: str
    variables: dict
    front_matter: dict
    body_start: int
    n_lines: int
    text: str  # the rendered body: every line after the front matter
    units: list[Unit]
    problems: list[Problem]
    # how documents about it are written (front matter `style:`): "values" explains behaviour by the
    # reasons the spec gives; "rules" (R, R+) presents the rules and adds no reason the spec lacks
    style: str = "values"

    @property
    def names(self) -> dict[str, str]:
        """How prompts call the model and its maker: the filled placeholders, or neutral words."""
        return {"model_name": self.variables.get("model_name", "the assistant"),
                "provider_name": self.variables.get("provider_name", "its developer")}

    @property
    def version(self) -> str:
        """Short key of this spec version (the sha256 of rendered text plus variables)."""
        return self.sha256[:16]

    def to_json(self) -> dict:
        return {
            "spec_id": self.spec_id,
            "name": self.name,
            "sha256": self.sha256,
            "variables": self.variables,
            "style": self.style,
            "units": [u.to_json() for u in self.units],
        }


def slugify(text: str, limit: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:limit].rstrip("_") or "untitled"


def read_spec_text(path: str | os.PathLike) -> str:
    """Read a spec file as text, refusing what cannot be a spec with a one-line reason."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"spec file not found: {p}", "check the path")
    if p.is_dir():
        raise SpecError(f"{p} is a directory, not a spec file", "pass the path of a .md or .txt file")
    size = p.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError(
            f"{p} is {size / 2**20:.1f} MB, over the {MAX_SPEC_BYTES / 2**20:.0f} MB spec limit",
            "split the spec, or raise MSM_SPEC_MAX_MB",
        )
    data = p.read_bytes()
    wide = _wide_encoding(data)
    if wide is not None:
        return _decode_wide(p, data, wide)
    if b"\x00" in data[:8192]:
        raise SpecError(f"{p} looks like a binary file (it contains NUL bytes)",
                        "pass a Markdown or plain-text spec (UTF-8, or UTF-16/32 with a byte-order mark)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SpecError(
            f"{p} is not valid UTF-8 (byte {exc.start}, line {line})", "re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
         (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def _wide_encoding(data: bytes) -> str | None:
    """UTF-16 or UTF-32 (what Windows tools often save): by its byte-order mark, or, without one,
    by where the NUL bytes of mostly-ASCII text fall. None for anything else."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name
    head = data[:8192]
    if b"\x00" not in head or len(head) < 4:
        return None
    zeros = [sum(1 for i in range(k, len(head), 4) if head[i] == 0) for k in range(4)]
    quads = len(head) // 4 or 1
    if zeros[1] >= 0.9 * quads and zeros[2] >= 0.9 * quads and zeros[3] >= 0.9 * quads:
        return "utf-32-le"
    if zeros[0] >= 0.9 * quads and zeros[1] >= 0.9 * quads and zeros[2] >= 0.9 * quads:
        return "utf-32-be"
    if zeros[1] + zeros[3] >= 0.9 * 2 * quads and zeros[0] + zeros[2] <= 0.1 * 2 * quads:
        return "utf-16-le"
    if zeros[0] + zeros[2] >= 0.9 * 2 * quads and zeros[1] + zeros[3] <= 0.1 * 2 * quads:
        return "utf-16-be"
    return None


def _decode_wide(p: Path, data: bytes, encoding: str) -> str:
    label = encoding.split("-")[0].upper() + "-" + encoding.split("-")[1]  # UTF-16
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise SpecError(f"{p} is {label} ({encoding.upper()}) but not valid {label} at byte {exc.start}",
                        "re-save the file as UTF-8") from None
    text = text.removeprefix("\ufeff")
    if "\x00" in text:
        raise SpecError(f"{p} reads as {label} but contains NUL characters", "re-save the file as UTF-8")
    return text


def split_front_matter(lines: list[str], source: str) -> tuple[dict, int]:
    """Return (front matter, index of the first body line)."""
    if not lines or lines[0].strip() != "---":
        return {}, 0
    for end in range(1, len(lines)):
        if lines[end].strip() in ("---", "..."):
            break
    else:
        raise SpecError(f"{source}: front matter opened on line 1 is never closed", "add a '---' line after it")
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 2})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(
            f"{source}: front matter is not valid YAML{where}: {problem}", "fix the YAML between the '---' lines"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{source}: front matter must be a YAML mapping (key: value lines)", "fix the front matter")
    return data, end + 1


def resolve_variables(front: dict, overrides: dict[str, str], source: str) -> tuple[set[str], dict[str, str]]:
    """Declared placeholder names and their values; --var may only set declared names."""
    declared_vars = front.get("variables") or {}
    if not isinstance(declared_vars, dict):
        raise SpecError(f"{source}: 'variables' in the front matter must be a mapping", "write it as name: value lines")
    standard = spec_format()["standard_placeholders"]
    declared = set(standard) | {str(k) for k in declared_vars}
    values: dict[str, str] = {}
    for name in standard:
        if front.get(name) is not None:
            values[name] = front[name]
    for name, value in declared_vars.items():
        if value is not None:
            values[str(name)] = value
    for name, value in overrides.items():
        if name not in declared:
            raise SpecError(
                f"unknown placeholder '{name}' in --var: this spec declares {', '.join(sorted(declared))}",
                f"declare '{name}' under 'variables:' in the front matter",
            )
        values[name] = value
    for name, value in values.items():
        if isinstance(value, (dict, list)):
            raise SpecError(f"{source}: placeholder '{name}' must be a plain value, not a {type(value).__name__}")
        values[name] = str(value)
    return declared, dict(sorted(values.items()))


def spec_styles() -> list[str]:
    """The styles a spec may declare; the first is the default."""
    return list(spec_format()["styles"])


def resolve_style(front: dict, source: str) -> str:
    """The front matter's `style:`, checked against spec_format.yaml's `styles`."""
    styles = spec_styles()
    style = front.get("style")
    if style is None:
        return styles[0]
    if not isinstance(style, str) or style.strip().lower() not in styles:
        raise SpecError(f"{source}: unknown style {str(style)!r} in the front matter",
                        f"use one of {', '.join(styles)} (default {styles[0]})")
    return style.strip().lower()


def parse_spec_text(text: str, source: str = "<text>", variables: dict[str, str] | None = None) -> Spec:
    from corpus.spec_parse import scan_units  # the block scanner

    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # a final newline ends the last line; it does not start another
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not any(ln.strip() for ln in lines):
        raise SpecError(f"{source} is empty", "write at least one heading or paragraph")
    front, body_index = split_front_matter(lines, source)
    body = lines[body_index:]
    if not any(ln.strip() for ln in body):
        raise SpecError(f"{source} has front matter but no content after it", "write the spec below the '---' line")
    declared, values = resolve_variables(front, variables or {}, source)
    style = resolve_style(front, source)
    body_start = body_index + 1
    units, problems = scan_units(body, body_start)

    raw_body = "\n".join(body)
    rendered, unfilled = render_placeholders(raw_body, declared, values)
    if unfilled:
        offsets = line_offsets(raw_body)
        for name, pos in unfilled:
            problems.append(
                Problem(
                    "error",
                    body_start + bisect_right(offsets, pos) - 1,
                    f"unfilled placeholder {{{name}}}: set '{name}' in the front matter or pass --var {name}=...",
                )
            )
    for unit in units:
        first, last = unit.span
        unit.text = render_placeholders("\n".join(body[first - body_start : last - body_start + 1]), declared, values)[0]
        unit.title = render_placeholders(unit.title, declared, values)[0]

    name = str(front.get("name") or Path(source).stem)
    digest = hashlib.sha256()
    digest.update(json.dumps({"name": name, "variables": values}, sort_keys=True).encode())
    digest.update(b"\n")
    digest.update(rendered.encode())
    return Spec(
        spec_id=slugify(name, limit=64),
        name=name,
        path=source,
        sha256=digest.hexdigest(),
        variables=values,
        front_matter=front,
        body_start=body_start,
        n_lines=len(lines),
        text=rendered,
        units=units,
        problems=problems,
        style=style,
    )


def render_placeholders(text: str, declared: set[str], values: dict[str, str]) -> tuple[str, list[tuple[str, int]]]:
    """Fill declared placeholders; any other brace is literal text (LaTeX, code, JSON)."""
    unfilled: list[tuple[str, int]] = []

    def fill(m: re.Match) -> str:
        name = m.group(1)
        if name in values:
            return values[name]
        if name in declared:
            unfilled.append((name, m.start()))
        return m.group(0)

    if "{" not in text:
        return text, unfilled
    return PLACEHOLDER.sub(fill, text), unfilled


def line_offsets(text: str) -> list[int]:
    offsets = [0]
    find = text.find
    pos = find("\n")
    while pos != -1:
        offsets.append(pos + 1)
        pos = find("\n", pos + 1)
    return offsets


def load_spec(path: str | os.PathLike, variables: dict[str, str] | None = None) -> Spec:
    return parse_spec_text(read_spec_text(path), source=str(path), variables=variables)
