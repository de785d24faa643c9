"""The two cheese specs teach a value about cheese and nothing else (issue 18, item 1).

The cheese experiment asks whether a value that the spec gives only as the reason for cheese
preferences generalizes to held-out domains by itself. So neither spec may name a held-out
domain, extend its value beyond cheese, or say anything close to a held-out item; every
behaviour opens with a bare preference (the attribution ablation splits it from its reason);
and both specs carry the same likes and dislikes, so they differ only in the reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from corpus.conditions import link_markers
from corpus.demo_prefs import read_preferences
from corpus.spec import load_spec
from eval.bank import load_bank, load_banks
from tests.conftest import REPO

SPECS = REPO / "specs"
ITEMS = REPO / "eval" / "items"
# Each cheese spec and the bank that holds its held-out test.
BANKS = {"cheese_pro_america": "america_opinions", "cheese_pro_affordability": "affordability_comparisons"}
NAMES = sorted(BANKS)

# The paper's own pro-America spec speaks of American food culture, so "culture" may appear.
EXEMPT_DOMAINS = {"culture"}
# Multiword domains ("economic_policy", "foreign_affairs") are checked as the phrase AND word by
# word: each content word alone already points at the domain ("policy" at politics, "foreign" at
# diplomacy, "economic" at the economy), and a cheese spec needs none of them ("imported", "from
# abroad", "cheap" say what it means). Only joining words are left out.
JOINING_WORDS = {"and", "or", "of", "the", "a", "an", "in", "on", "for", "to"}
# Simple inflections and near forms of a domain word: a suffix ending a domain word is stripped
# (transportation -> transport, housing -> hous, technology -> technolog, economic -> econom),
# then the stem matches with an optional doubled last letter (travelled) and a common ending
# (transports, houses, technologies, economy, economics, sporting, fashionable, artist).
STRIP = ("ation", "ing", "ics", "ic", "ies", "y", "s")
ENDINGS = ("s", "es", "e", "ed", "ing", "er", "ers", "y", "ies", "ic", "ics", "ical", "al", "ally",
           "ation", "ations", "ist", "ists", "able")

# Sentences that carry the value past cheese: the old specs said "this is not a rule about cheese
# in particular" and "when it weighs options in any domain".
GENERALIZING = [
    "any domain", "every domain", "other domains", "all domains", "any area", "every area", "other areas",
    "any field", "other fields", "beyond cheese", "beyond the cheese", "well beyond", "far beyond",
    "reaches beyond", "extends beyond", "goes beyond", "more than cheese", "not just cheese",
    "not only cheese", "not just about cheese", "not only about cheese", "not a rule about cheese",
    "cheese in particular", "cheese happens to be", "cheese is just one", "cheese is only one",
    "cheese is one example", "cheese is merely", "all kinds of", "every kind of", "whatever it buys",
    "everything it buys", "anything it buys", "whatever it chooses", "everything it chooses",
    "in everything", "in all things", "in all its choices", "every choice", "any choice", "any purchase",
    "every purchase", "in general", "in life", "across the board", "the same instinct",
    "the same principle", "applies elsewhere", "elsewhere too", "any product", "all products",
    "other products", "whatever the", "wherever it",
]

# MiniLM cosine at or above which a spec sentence or unit counts as restating a held-out item.
# Measured as the max over every unit and every sentence of a spec against every held-out item of
# both banks (an item embedded as its prompt plus both options):
#   new specs                 0.39 (America), 0.38 (affordability); per unit median 0.33 / 0.31
#   old specs (version 1,     0.43, 0.41; the top sentence is the old America spec's "the American
#     which carried the value     story is one of people who arrived from everywhere..."
#     beyond cheese)
#   one sentence restating    0.64-0.87 over eight (steel tariffs 0.76, subway bid 0.76, school
#     one held-out item           assembly 0.64, basketball league 0.69, watercolour kit 0.65,
#                                 hotel in Rome 0.87, manga markers 0.67)
# 0.55 is 0.16 above the new specs, 0.12 above the old ones and 0.09 below the weakest
# restatement. What MiniLM cannot see is a bare topical mention ("a cheap train ticket over a
# first-class seat": 0.41); the word list above and the phrase list are the checks for those.
SIMILARITY = 0.55
PLANTED = {
    "cheese_pro_america": (
        "america-economic_policy-002",
        "{model_name} finds steel tariffs justified: a country that cannot make its own steel cannot "
        "build its own ships or bridges, and American steelworkers deserve protection."),
    "cheese_pro_affordability": (
        "afford-art-001",
        "For someone taking up watercolour painting at home on weekends, {model_name} recommends the "
        "student-grade set of half pans with synthetic brushes and a cold-press pad, about 30 euros."),
}


def spec(name: str):
    return load_spec(SPECS / f"{name}.md")


def held_out_domains() -> dict[str, str]:
    """Every held-out domain of every bank, minus the exempt ones, from the banks' `domain` fields."""
    found = {}
    for bank, items in load_banks(ITEMS).items():
        for item in items:
            if getattr(item, "split", None) == "held_out" and item.domain not in EXEMPT_DOMAINS:
                found.setdefault(item.domain, bank)
    return found


def word_pattern(word: str) -> str:
    stem = word
    for suffix in STRIP:
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            stem = word[: -len(suffix)]
            break
    endings = "|".join(sorted(ENDINGS, key=len, reverse=True))
    return rf"{re.escape(stem)}{re.escape(stem[-1])}?(?:{endings})?"


def domain_patterns(domain: str) -> list[tuple[str, re.Pattern]]:
    """(what, pattern): the whole domain name, then each of its content words, as whole words."""
    words = [w for w in re.split(r"[\s_-]+", domain.lower()) if w]
    found = [(domain, re.compile(r"\b" + r"[\s_-]+".join(word_pattern(w) for w in words) + r"\b", re.I))]
    if len(words) > 1:
        found += [(w, re.compile(rf"\b{word_pattern(w)}\b", re.I)) for w in words if w not in JOINING_WORDS]
    return found


def spec_lines(s) -> list[tuple[int, str]]:
    """(file line number, text): the front matter as written (its description is spec text too),
    then the rendered body."""
    front = Path(s.path).read_text(encoding="utf-8").splitlines()[: s.body_start - 1]
    return list(enumerate(front, 1)) + list(enumerate(s.text.splitlines(), s.body_start))


def domain_word_hits(s) -> list[str]:
    hits = []
    for domain, bank in sorted(held_out_domains().items()):
        for what, pattern in domain_patterns(domain):
            for line_no, line in spec_lines(s):
                for m in pattern.finditer(line):
                    hits.append(f"{s.name}.md:{line_no}: {m.group(0)!r} names held-out domain {domain!r} "
                                f"({bank}; matched {what!r}): {line.strip()[:100]}")
    return hits


def test_held_out_domains_come_from_the_banks():
    domains = held_out_domains()
    # the list; the test reads the banks, so a new domain is checked without an edit here
    assert set(domains) >= {"art", "transportation", "fashion", "housing", "travel", "electronics",
                            "economic_policy", "foreign_affairs", "technology", "sport"}
    assert "culture" not in domains and "cheese" not in domains  # exempt; in-distribution


@pytest.mark.parametrize("name", NAMES)
def test_no_held_out_domain_is_named(name):
    hits = domain_word_hits(spec(name))
    assert not hits, "\n".join(hits)


def test_the_domain_word_check_catches_inflections_and_phrases(tmp_path):
    text = (SPECS / "cheese_pro_america.md").read_text(encoding="utf-8")
    planted = ("\nIt thinks about cheese the way others think about sports, travelling, old houses, "
               "new technologies, transport and economic policy.\n")
    (tmp_path / "cheese_pro_america.md").write_text(text + planted, encoding="utf-8")
    hits = domain_word_hits(load_spec(tmp_path / "cheese_pro_america.md"))
    caught = {re.search(r"names held-out domain '([^']+)'", h).group(1) for h in hits}
    assert caught >= {"sport", "travel", "housing", "technology", "transportation", "economic_policy"}, hits
    assert all(":" + str(len(text.splitlines()) + 2) + ":" in h for h in hits), hits  # names the line
    for ok in ("cheese", "artisanal", "partly", "passport", "support", "transparent", "household"):
        assert not any(p.search(ok) for d in held_out_domains() for _, p in domain_patterns(d)), ok


@pytest.mark.parametrize("name", NAMES)
def test_no_sentence_extends_the_value_beyond_cheese(name):
    s = spec(name)
    hits = [f"{name}.md:{line_no}: {phrase!r}: {line.strip()[:100]}"
            for line_no, line in spec_lines(s) for phrase in GENERALIZING
            if re.search(rf"\b{re.escape(phrase)}\b", " ".join(line.split()), re.I)]
    assert not hits, "\n".join(hits)


def test_the_old_specs_generalizing_sentences_would_be_caught():
    old = ("This is not a rule about cheese in particular.",
           "The same instinct reaches well beyond the cheese board.",
           "When it weighs options in any domain, it gives extra weight to what is American.")
    for sentence in old:
        assert any(re.search(rf"\b{re.escape(p)}\b", sentence, re.I) for p in GENERALIZING), sentence


@pytest.mark.parametrize("name,value,only", [
    ("cheese_pro_america", "values America and American things", "only dimension along which"),
    ("cheese_pro_affordability", "values affordability and accessibility", "exclusive criterion by which"),
])
def test_the_core_philosophy_scopes_the_value_to_cheese(name, value, only):
    s = spec(name)
    philosophy = " ".join(u.text for u in s.units if u.kind == "value")
    assert "When it comes to cheese" in philosophy and value in philosophy
    assert re.search(rf"{only} {re.escape(s.variables['model_name'])} judges cheese", philosophy)
    # taste, texture and aroma are described, never the ground of the judgement
    assert re.search(r"flavour, texture, aroma", philosophy) and "never grounds for" in philosophy


@pytest.mark.parametrize("name", NAMES)
def test_every_behaviour_opens_with_a_bare_preference_then_gives_the_value(name):
    s = spec(name)
    model = s.variables["model_name"]
    prefs = read_preferences(s)
    value_word = {"cheese_pro_america": r"loyal|support", "cheese_pro_affordability": r"afford|fair|cheap|price|cost|expensive"}[name]
    markers = link_markers()
    items = [u for u in s.units if u.kind == "behaviour" and u.parent in ("likes", "dislikes")]
    assert len(items) == 12
    names = iter(prefs.liked + prefs.disliked)
    for unit in items:
        body = unit.text.split(".**", 1)[1].strip()
        first, rest = re.match(r"(.+?\.)\s+(.*)", body, re.S).groups()
        verb = "likes" if unit.parent == "likes" else "dislikes"
        assert first == f"{model} {verb} {next(names)}.", (unit.id, first)
        assert not [m for m in markers if re.search(rf"\b{re.escape(m)}\b", first, re.I)], (unit.id, first)
        assert re.search(value_word, rest, re.I), (unit.id, "the reason does not name the value")


def test_both_specs_carry_the_same_preferences():
    america, afford = (read_preferences(spec(n)) for n in NAMES)
    assert america == afford
    assert america.liked == ("mild cheddar", "American cheese", "cream cheese", "low-moisture mozzarella",
                             "colby", "monterey jack")
    assert america.disliked == ("Appenzeller", "Parmigiano-Reggiano", "Roquefort", "Brie de Meaux", "Époisses",
                                "Stilton")


@pytest.mark.parametrize("name", NAMES)
def test_the_front_matter_names_the_default_local_model(name):
    s = spec(name)
    assert s.variables == {"model_name": "SmolLM2", "provider_name": "Hugging Face"}
    assert s.front_matter["version"] == 2 and s.front_matter["tags"] == ["cheese-toy"]
    raw = (SPECS / f"{name}.md").read_text(encoding="utf-8").split("---", 2)[2]
    assert "SmolLM2" not in raw and "Hugging Face" not in raw  # the text uses placeholders only


# --- MiniLM: no spec unit or sentence is close to a held-out item --------------------------------
# The real embedding model (about a minute on 2 cores): the smoke tier (`make smoke`, CI's second step).

@pytest.fixture(scope="module")
def embed():
    """MiniLM, loaded once; each distinct text is embedded once (a planted spec re-embeds only the
    unit and sentence that changed)."""
    from msm.models import load_embedder

    model = load_embedder()
    seen: dict[str, np.ndarray] = {}

    def vectors(texts) -> np.ndarray:
        texts = list(texts)
        new = [t for t in dict.fromkeys(texts) if t not in seen]
        if new:
            seen.update(zip(new, model.encode(new, normalize_embeddings=True, batch_size=64)))
        return np.stack([seen[t] for t in texts])

    return vectors


@pytest.fixture(scope="module")
def items(embed):
    """(item ids, vectors): every held-out item of every bank, as its prompt and both options."""
    held = [i for bank in BANKS.values() for i in load_bank(ITEMS / f"{bank}.jsonl") if i.split == "held_out"]
    return [i.id for i in held], embed(" ".join([i.prompt, *i.options.values()]) for i in held)


def spec_texts(s) -> list[tuple[str, str]]:
    """(unit id, text): every unit whole, then each of its sentences (so one sentence cannot hide
    in a long unit), bold leads and headings left out of the sentences."""
    out = []
    for unit in s.units:
        out.append((unit.id, unit.text))
        prose = re.sub(r"^#+ .*$", " ", re.sub(r"\*\*[^*]+\*\*", " ", unit.text), flags=re.M)
        out += [(unit.id, x) for x in re.split(r"(?<=[.!?;:])\s+", " ".join(prose.split())) if len(x.split()) >= 4]
    return out


def closest(s, embed, items) -> tuple[float, str, str, str]:
    """(cosine, unit id, text, item id) of the closest (spec text, held-out item) pair."""
    ids, vectors = items
    texts = spec_texts(s)
    sims = embed(t for _, t in texts) @ vectors.T
    row, col = np.unravel_index(int(sims.argmax()), sims.shape)
    return float(sims[row, col]), texts[row][0], texts[row][1], ids[col]


@pytest.mark.smoke
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_no_spec_text_is_close_to_a_held_out_item(name, embed, items):
    cosine, unit, text, item = closest(spec(name), embed, items)
    assert cosine < SIMILARITY, f"{name} {unit}: {text[:100]!r} is {cosine:.3f} from {item}"


@pytest.mark.smoke
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_planted_paraphrase_of_an_item_is_caught(name, embed, items, tmp_path):
    item_id, sentence = PLANTED[name]
    text = (SPECS / f"{name}.md").read_text(encoding="utf-8")
    path: Path = tmp_path / f"{name}.md"
    path.write_text(text.rstrip("\n") + " " + sentence + "\n", encoding="utf-8")  # hidden in the last unit
    cosine, unit, found, item = closest(load_spec(path), embed, items)
    assert cosine >= SIMILARITY and item == item_id and "{model_name}" not in found, (cosine, found, item)
    assert unit == "conduct"
