"""Values checked against a dataclass's annotated field types, before anything runs.

YAML gives `docs: many`, `docs: 2.5` and `docs: true` as a str, a float and a bool; each is a
one-line error here rather than a TypeError an hour into a run (or a one-document plan).
"""

from __future__ import annotations

import dataclasses
import math
import re

from msm.errors import MsmError

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}


def _describe(kind: str) -> str:
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "dict": "a mapping", "list": "a list of strings"}.get(kind, kind)


def check_value(where: str, key: str, value, annotation: str, error=MsmError) -> None:
    """One value against an annotation such as `int | None`, `float`, `tuple[str, ...] | None`."""
    parts = [p.strip() for p in str(annotation).split("|")]
    optional = "None" in parts
    kinds = [p for p in parts if p != "None"]
    if value is None:
        if optional or not kinds:
            return
        raise error(f"{where}: '{key}' cannot be null", f"give it {_describe(kinds[0])}")
    for kind in kinds:
        if kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind == "float" else int):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise error(f"{where}: '{key}' is {value}", "give it a finite number")
            return
        if kind in _SCALARS and isinstance(value, _SCALARS[kind]):
            return
        if re.match(r"(tuple|list)\[str", kind) and isinstance(value, (list, tuple)) and \
                all(isinstance(v, str) for v in value):
            return
        if kind in ("object", "Any"):
            return
    if not kinds or all(k not in _SCALARS and not re.match(r"(tuple|list)\[", k) and k not in ("list", "tuple")
                        for k in kinds):
        return  # an annotation this checker does not know: leave it to the consumer
    wanted = " or ".join(_describe("list" if re.match(r"(tuple|list)", k) else k) for k in kinds)
    raise error(f"{where}: '{key}' must be {wanted}{' or null' if optional else ''}, got {value!r}",
                "fix its value")


def check_fields(cls, values: dict, where: str, error=MsmError, skip: set = frozenset()) -> None:
    """Every value whose key names a field of `cls` is checked against that field's annotation."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key in fields and key not in skip:
            check_value(where, key, value, fields[key].type, error)
