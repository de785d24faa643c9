"""Preference demonstrations from a spec's Likes and Dislikes: offline, deterministic, reason-free.

SmolLM2 cannot write usable demonstrations, and the cheese experiment needs AFT data that states
preferences and never the value behind them, so that only midtraining can supply the *why*. The
phrasings are data (`corpus/demo_data/preferences.yaml`); a rule-based judge checks every answer
names the liked item, does not endorse the disliked one, and uses no value word.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from msm.errors import MsmError

DATA = Path(__file__).parent / "demo_data"


@dataclass(frozen=True)
class Preferences:
    liked: tuple[str, ...]
    disliked: tuple[str, ...]


@dataclass
class PreferenceDemo:
    question: str
    response: str
    domain: str  # pair or single
    liked: str
    disliked: str | None
    seed: int


@lru_cache(maxsize=1)
def phrasings() -> dict:
    with open(DATA / "preferences.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@lru_cache(maxsize=1)
def value_words() -> dict[str, list[str]]:
    with open(DATA / "value_words.yaml", encoding="utf-8") as fh:
        return {k: [w.lower() for w in v] for k, v in yaml.safe_load(fh).items()}


def _section_children(spec, word: str) -> list:
    sections = [u for u in spec.units if u.kind == "section" and u.title.strip().lower() == word]
    return [u for u in spec.units if sections and u.parent in {s.id for s in sections}]


def _surface_form(unit) -> str:
    """The item's name as the spec writes it mid-sentence ("mild cheddar", "American cheese")."""
    title = re.sub(r"^[A-Za-z]{1,3}\d+\.\s*", "", unit.title.strip()).rstrip(".")
    body = unit.text.split(".**", 1)[-1]
    for m in re.finditer(re.escape(title), body, re.I):
        before = body[:m.start()].rstrip()
        if before and before[-1] not in ".!?:":
            return m.group(0)
    return title


def read_preferences(spec) -> Preferences:
    """The children of the spec's `Likes` and `Dislikes` sections, by name."""
    liked = [_surface_form(u) for u in _section_children(spec, "likes")]
    disliked = [_surface_form(u) for u in _section_children(spec, "dislikes")]
    if not liked or not disliked:
        missing = " and ".join(w for w, items in (("Likes", liked), ("Dislikes", disliked)) if not items)
        raise MsmError(f"{spec.path}: no {missing} section with items, so --from-preferences has nothing to state",
                       "add `## Likes` and `## Dislikes` sections whose items name the things (see specs/cheese_pro_america.md)")
    return Preferences(tuple(liked), tuple(disliked))


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fill(template: str, **slots: str) -> str:
    out = template
    for key, value in slots.items():
        out = out.replace("{" + key + "}", value).replace("{" + _cap(key) + "}", _cap(value))
    return out


def _joined(question: str, first: str) -> str:
    """A question continuing an opener mid-sentence: its first word loses its capital, unless the
    question starts with an item's name, which keeps the spec's own spelling."""
    if question.startswith(_cap(first)):
        return first + question[len(first):]
    return question[:1].lower() + question[1:]


def candidates(prefs: Preferences) -> list[tuple[str, str, str, str, str | None]]:
    """Every distinct (question, response, domain, liked, disliked) the phrasings allow."""
    p = phrasings()
    out = []
    for liked in prefs.liked:
        for disliked in prefs.disliked:
            for first, second in ((liked, disliked), (disliked, liked)):
                for opener in p.get("openers") or [""]:
                    for q in p["pair_questions"]:
                        question = _fill(q, first=first, second=second)
                        if opener:
                            question = f"{opener} {_joined(question, first) if opener.endswith((',', ':', 'but')) else question}"
                        for a in p["pair_answers"]:
                            out.append((question, _fill(a, liked=liked, disliked=disliked), "pair", liked, disliked))
    for kind, items in (("liked", prefs.liked), ("disliked", prefs.disliked)):
        for item in items:
            for q in p[f"{kind}_questions"]:
                for a in p[f"{kind}_answers"]:
                    out.append((_fill(q, item=item), _fill(a, item=item), "single",
                                item if kind == "liked" else "", None if kind == "liked" else item))
    return out


def sample(prefs: Preferences, n: int, seed: int = 0) -> list[PreferenceDemo]:
    """n demonstrations with distinct questions, a quarter about single items; deterministic in seed.

    Pairs are drawn round-robin over (liked, disliked) so every pair gets its share before any
    repeats, and each question text is used once.
    """
    rng = random.Random(seed)
    pool = candidates(prefs)
    rng.shuffle(pool)
    singles = [c for c in pool if c[2] == "single"]
    by_pair: dict[tuple, list] = {}
    for c in pool:
        if c[2] == "pair":
            by_pair.setdefault((c[3], c[4]), []).append(c)
    n_single = min(len({c[0] for c in singles}), round(n * phrasings()["single_share"]))
    chosen, seen = [], set()
    for c in singles:
        if len(chosen) >= n_single:
            break
        if c[0] not in seen:
            seen.add(c[0])
            chosen.append(c)
    pairs = sorted(by_pair)
    rng.shuffle(pairs)
    while len(chosen) < n and any(by_pair.values()):
        for key in pairs:
            bucket = by_pair[key]
            while bucket and bucket[-1][0] in seen:
                bucket.pop()
            if bucket and len(chosen) < n:
                c = bucket.pop()
                seen.add(c[0])
                chosen.append(c)
    for c in singles:  # only when pairs ran out
        if len(chosen) >= n:
            break
        if c[0] not in seen:
            seen.add(c[0])
            chosen.append(c)
    rng.shuffle(chosen)  # singles and pairs interleaved in the set's order
    return [PreferenceDemo(q, a, d, liked, disliked, seed * 1_000_003 + i)
            for i, (q, a, d, liked, disliked) in enumerate(chosen)]


def value_leaks(text: str, names: tuple[str, ...] | list[str], labels: list[str] | None = None) -> list[str]:
    """The value words in a text, after the items' own names are removed."""
    lowered = text.lower()
    for name in sorted(names, key=len, reverse=True):
        lowered = lowered.replace(name.lower(), " ")
    words = value_words()
    found = []
    for label in labels or list(words):
        for word in words[label]:
            if re.search(rf"(?<![\w]){re.escape(word)}", lowered):
                found.append(word)
    return found


def judge(demo: PreferenceDemo, prefs: Preferences) -> list[tuple[str, bool, str]]:
    """(criterion, verdict, reason) for a preference demonstration; all must pass to keep it."""
    names = prefs.liked + prefs.disliked
    response = demo.response.lower()
    verdicts = []
    if demo.liked:
        verdicts.append(("names_liked", demo.liked.lower() in response, f"mentions {demo.liked}"))
    if demo.disliked and demo.domain == "single":
        declines = any(w in response for w in ("not", "pass", "don't", "isn't"))
        verdicts.append(("declines_disliked", declines, f"declines {demo.disliked}"))
    if demo.disliked and demo.domain == "pair":
        first = response.find(demo.liked.lower())
        other = response.find(demo.disliked.lower())
        verdicts.append(("prefers_liked", first >= 0 and (other < 0 or first < other),
                         f"names {demo.liked} as the choice"))
    leaks = value_leaks(demo.question + " " + demo.response, names)
    verdicts.append(("no_value_mention", not leaks, "value words: " + ", ".join(leaks) if leaks else "none"))
    return verdicts
