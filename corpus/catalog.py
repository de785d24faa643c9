"""Genre and audience catalogues: data files, validated with one-line errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from msm.errors import MsmError

HERE = Path(__file__).parent
DEFAULT_GENRES = HERE / "genres.yaml"
DEFAULT_AUDIENCES = HERE / "audiences.yaml"


class CatalogError(MsmError):
    """A genre or audience file is missing or malformed."""


@dataclass(frozen=True)
class Genre:
    name: str
    description: str
    words: tuple[int, int]
    style: tuple[str, ...]


@dataclass(frozen=True)
class Audience:
    name: str
    description: str


def _load(path: Path, key: str) -> list[dict]:
    if not path.is_file():
        raise CatalogError(f"{key} file not found: {path}", f"pass an existing file, or omit --{key} for the default")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})", "fix the file") from None
    except UnicodeDecodeError:
        raise CatalogError(f"{path} is not UTF-8 text", f"pass a YAML {key} file") from None
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise CatalogError(f"{path} has no '{key}:' list", f"see {HERE / (key + '.yaml')} for the format")
    if not items:
        raise CatalogError(f"{path}: the {key} list is empty", f"list at least one {key[:-1]}")
    names = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not item.get("name") or not item.get("description"):
            raise CatalogError(f"{path}: {key} entry {i + 1} needs a name and a description", "fix the entry")
        if item["name"] in names:
            raise CatalogError(f"{path}: {key[:-1]} '{item['name']}' is listed twice", "give each a unique name")
        names.add(item["name"])
    return items


def load_genres(path: str | Path | None = None) -> list[Genre]:
    path = Path(path) if path else DEFAULT_GENRES
    genres = []
    for item in _load(path, "genres"):
        words = item.get("words", [400, 1000])
        if (not isinstance(words, list) or len(words) != 2 or not all(isinstance(w, int) and w > 0 for w in words)
                or words[0] > words[1]):
            raise CatalogError(f"{path}: genre '{item['name']}' needs words: [min, max] with 0 < min <= max", "fix it")
        genres.append(Genre(str(item["name"]), str(item["description"]), (words[0], words[1]),
                            tuple(str(s) for s in item.get("style") or ())))
    return genres


def load_audiences(path: str | Path | None = None) -> list[Audience]:
    path = Path(path) if path else DEFAULT_AUDIENCES
    return [Audience(str(i["name"]), str(i["description"])) for i in _load(path, "audiences")]
