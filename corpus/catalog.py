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


def load_genres(path: str | Path | None = None, doc_words: int | None = None) -> list[Genre]:
    """The genre catalogue; with `doc_words`, every word range rescaled (see `scale_genres`)."""
    path = Path(path) if path else DEFAULT_GENRES
    genres = []
    for item in _load(path, "genres"):
        words = item.get("words", [400, 1000])
        if (not isinstance(words, list) or len(words) != 2 or not all(isinstance(w, int) and w > 0 for w in words)
                or words[0] > words[1]):
            raise CatalogError(f"{path}: genre '{item['name']}' needs words: [min, max] with 0 < min <= max", "fix it")
        genres.append(Genre(str(item["name"]), str(item["description"]), (words[0], words[1]),
                            tuple(str(s) for s in item.get("style") or ())))
    return genres if doc_words is None else scale_genres(genres, doc_words)


def check_doc_words(doc_words, where: str = "--doc-words") -> None:
    """A document length must be a positive whole number of words (None: the catalogue's own)."""
    if doc_words is None:
        return
    if isinstance(doc_words, bool) or not isinstance(doc_words, int) or doc_words < 1:
        raise CatalogError(f"{where} must be a positive whole number of words, got {doc_words!r}",
                           "give the mean document length in words, e.g. 2250 (about 3k tokens), or leave it out")


def mean_words(genres: list[Genre]) -> float:
    """The mean of the genres' midpoints: the length a balanced plan's average document asks for."""
    return sum((g.words[0] + g.words[1]) / 2 for g in genres) / len(genres)


def scale_genres(genres: list[Genre], doc_words: int) -> list[Genre]:
    """Every word range times one factor, so the mean midpoint is `doc_words` and the genres keep
    their relative lengths (a memo stays shorter than a textbook section)."""
    check_doc_words(doc_words)
    factor = doc_words / mean_words(genres)
    out = []
    for g in genres:
        low = max(1, round(g.words[0] * factor))
        out.append(Genre(g.name, g.description, (low, max(low, round(g.words[1] * factor))), g.style))
    return out


def load_audiences(path: str | Path | None = None) -> list[Audience]:
    path = Path(path) if path else DEFAULT_AUDIENCES
    return [Audience(str(i["name"]), str(i["description"])) for i in _load(path, "audiences")]
