"""Decontamination: training text must not contain the evaluation.

Two checks against every item in the eval banks (and any other JSONL or text files named) and
every passage of the agentic scenarios (eval/agentic/scenarios and any folder in the
agentic-misalignment layout named with --scenarios/--templates):
- word 13-gram overlap (lower-cased words; an item shorter than 13 words is matched whole if it
  has at least 8), which catches copied prompts, options and reference answers;
- embedding similarity (MiniLM, the stored head-and-tail document vectors) at or above a
  threshold, which catches close paraphrases of a whole item.
The banks are read as files, not through the eval stage's code: every string in a JSONL line is
item text, so a new bank or scenario file needs no change here. Two fields are left out on
purpose: an open item's `reference` and `rubric` restate the spec, and a corpus that teaches the
spec is meant to contain the spec; its *questions* must not leak. The scenarios are read the same
way: every text file of a scenario folder, placeholders and markup treated as breaks, so a corpus
that rehearses an e-mail of the agentic evaluation is caught and reported against that scenario.
The thresholds are data (corpus/decontam.yaml).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from msm.errors import MsmError


@lru_cache(maxsize=None)
def thresholds() -> dict:
    """corpus/decontam.yaml: n-gram length, similarity, the scenario reader's settings."""
    return yaml.safe_load((Path(__file__).with_name("decontam.yaml")).read_text(encoding="utf-8"))


NGRAM = thresholds()["ngram"]
MIN_ITEM_WORDS = thresholds()["min_item_words"]
DEFAULT_SIMILARITY = thresholds()["similarity"]
SKIPPED_FIELDS = ("id", "domain", "split", "consistent_with", "spec", "reference", "rubric")


@dataclass(frozen=True)
class EvalText:
    source: str  # file:line (or file) it came from
    item_id: str
    text: str  # a scenario passage's placeholders are BREAK characters: no n-gram crosses them
    scenario: str | None = None  # the agentic scenario a passage belongs to; None for a bank item
    embedded: bool = True  # compared by embedding too (a scenario's templates, less near-repeats)

    @property
    def plain(self) -> str:
        """The text to embed (breaks as spaces)."""
        return self.text.replace(BREAK, " ")


@dataclass(frozen=True)
class Hit:
    document: str
    item: EvalText
    method: str  # ngram or embedding
    evidence: str  # the shared n-gram, or the cosine


def _eval_dir() -> Path | None:
    """The eval stage's folder, located (not imported) like any package's data files."""
    found = importlib.util.find_spec("eval")
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def default_item_dirs() -> list[Path]:
    """The project's eval banks, located as files (eval/items), when they exist."""
    root = _eval_dir()
    if root is None:
        return []
    items = root / "items"
    return [items] if any(items.glob("*.jsonl")) else []


def default_scenario_dirs() -> list[Path]:
    """The project's agentic scenarios, located as files (eval/agentic/scenarios), when they exist."""
    root = _eval_dir()
    if root is None:
        return []
    folder = root / thresholds()["scenarios"]["default"]
    return [folder] if folder.is_dir() and _scenario_folders(folder) else []


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def load_eval_texts(paths: list[str | Path]) -> list[EvalText]:
    """Item texts from JSONL banks (each line: every string but the id and labels) and plain files."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted([*path.glob("*.jsonl"), *path.glob("*.txt")])
            if not found:
                raise MsmError(f"no eval files (*.jsonl, *.txt) in {path}", "point --against at item banks")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise MsmError(f"--against: {path} does not exist", "pass an item-bank directory or file")
    texts = []
    for path in files:
        if path.suffix != ".jsonl":
            texts.append(EvalText(str(path), path.stem, path.read_text(encoding="utf-8")))
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise MsmError(f"{path}:{n} is not valid JSON", "fix the line") from None
            item_id = str(item.get("id", f"{path.stem}:{n}")) if isinstance(item, dict) else f"{path.stem}:{n}"
            fields = {k: v for k, v in item.items() if k not in SKIPPED_FIELDS} if isinstance(item, dict) else item
            for text in _strings(fields):
                if len(text.split()) >= 3:
                    texts.append(EvalText(f"{path}:{n}", item_id, text))
    return texts


# ---- agentic scenarios, read as files -------------------------------------------------------

BREAK = "\x1e"  # stands where a placeholder, a tag or a label was: no n-gram crosses it
_PLACEHOLDER = re.compile(r"\$\{[^}\n]*\}|\{\{[^}\n]*\}\}|\{[A-Za-z_][\w.]*\}")
_TAG = re.compile(r"</?[A-Za-z_][\w:-]*>")
_LABEL = re.compile(r'^[ \t]*(?:[-*#>]+[ \t]*)?"?[\w-]+"?[ \t]*:(?=\s)', re.M)


def _scenario_folders(root: Path) -> list[Path]:
    """The scenario folders under `root` (each has templates/), or `root` itself if it is one."""
    if (root / "templates").is_dir():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "templates").is_dir())


def scenario_folders(paths: list[str | Path]) -> list[tuple[str, Path]]:
    """(name, folder) of every scenario under `paths`; a missing or empty path is a one-line error."""
    found = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise MsmError(f"--scenarios/--templates: {path} {what}",
                           "pass a folder of scenario folders (SCENARIO/templates/*.md), "
                           "the agentic-misalignment layout")
        folders = _scenario_folders(path)
        if not folders:
            raise MsmError(f"--scenarios/--templates: {path} holds no scenario folder (SCENARIO/templates/*.md)",
                           "pass the folder above the scenario folders, in the agentic-misalignment layout")
        found += [(f.name, f) for f in folders]
    return found


def scenario_text(text: str) -> str:
    """A scenario file's text with placeholders, markup tags and `key:` labels made BREAKs."""
    return _LABEL.sub(BREAK, _TAG.sub(BREAK, _PLACEHOLDER.sub(BREAK, text)))


def _passages(path: Path, scenario: str, item_id: str) -> list[EvalText]:
    """A file's paragraphs as EvalTexts (source: file:first line). Within one section (an e-mail:
    the text between markup-tag lines) a paragraph shorter than `min_passage_words` is merged into
    the next, and a short last one into the one before."""
    min_words = thresholds()["scenarios"]["min_passage_words"]
    raw = path.read_text(encoding="utf-8", errors="replace")
    out: list[EvalText] = []
    line = 1
    for section in re.split(r"(^[ \t]*</?[A-Za-z_][\w:-]*>[ \t]*$)", raw, flags=re.M):
        found: list[tuple[int, list[str]]] = []  # (first line, paragraphs)
        pending: list[str] = []
        start = None
        for block in re.split(r"(\n[ \t]*\n)", scenario_text(section)):
            if block.strip() and not re.fullmatch(r"\n[ \t]*\n", block):
                if start is None:
                    start = line + block[: len(block) - len(block.lstrip())].count("\n")
                pending.append(block.strip())
                if len(words(" ".join(pending))) >= min_words:
                    found.append((start, pending))
                    pending, start = [], None
            line += block.count("\n")
        if pending and words(" ".join(pending)):
            if found:
                found[-1] = (found[-1][0], found[-1][1] + pending)
            else:
                found.append((start, pending))
        out += [EvalText(f"{path}:{first}", item_id, "\n\n".join(paras), scenario) for first, paras in found]
    return out


def load_scenario_texts(paths: list[str | Path]) -> list[EvalText]:
    """Passages of every text file of every scenario folder under `paths` (each passage's item_id
    is SCENARIO/relative path), plus the shared prompt files beside a scenarios folder (the
    project's system prompt, user turn and goals) as one more scenario. All are n-gram checked;
    the embedding check uses the passages of the e-mail templates and the shared prompts, less
    near-repeats (the goal-conflict-none inbox restates the shared e-mails), and the scenario's
    summary (scenario.yaml); the variables are slot fragments whose vectors are merely topical."""
    settings = thresholds()["scenarios"]
    suffixes = set(settings["suffixes"])
    embedded_dirs = set(settings["embedded"])
    texts: list[EvalText] = []
    roots = []
    for name, folder in scenario_folders(paths):
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes):
            relative = path.relative_to(folder)
            passages = _passages(path, name, f"{name}/{relative.as_posix()}")
            if relative.parts[0] not in embedded_dirs:
                passages = [dataclasses.replace(t, embedded=False) for t in passages]
            texts += passages
        root = folder.parent
        if root not in roots:
            roots.append(root)
    for root in roots:
        for shared in settings["shared_files"]:
            for path in (root / shared, root.parent / shared):
                if path.is_file():
                    texts += _passages(path, settings["shared_name"], f"{settings['shared_name']}/{shared}")
                    break
    texts = list(dict.fromkeys(texts))  # a file reached twice counts once
    return _mark_repeats(texts, settings["repeat_share"])


def _mark_repeats(texts: list[EvalText], share: float, n: int = 8) -> list[EvalText]:
    """Leave out of the embedding check a passage whose word n-grams are mostly (`share`) in
    earlier embedded passages: its vector would repeat theirs."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for t in texts:
        if t.embedded:
            w = words(t.plain)
            grams = {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}
            if grams and len(grams & seen) > share * len(grams):
                t = dataclasses.replace(t, embedded=False)
            seen |= grams
        out.append(t)
    return out


# ---- the two checks ---------------------------------------------------------------------------

def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngram_index(texts: list[EvalText], n: int = NGRAM) -> dict[tuple[str, ...], EvalText]:
    """Every n-gram of every text. A bank item shorter than n words (at least MIN_ITEM_WORDS) is
    indexed whole; a scenario passage contributes full n-grams only, none across a BREAK."""
    index: dict[tuple[str, ...], EvalText] = {}
    for item in texts:
        for piece in item.text.split(BREAK):
            w = words(piece)
            if len(w) < (n if item.scenario is not None else MIN_ITEM_WORDS):
                continue
            size = min(n, len(w))
            for i in range(len(w) - size + 1):
                index.setdefault(tuple(w[i : i + size]), item)
    return index


def ngram_hits(documents: dict[str, str], texts: list[EvalText], n: int = NGRAM) -> list[Hit]:
    index = ngram_index(texts, n)
    sizes = sorted({len(k) for k in index})
    hits = []
    for doc_id, text in documents.items():
        w = words(text)
        found = None
        for size in sizes:
            for i in range(len(w) - size + 1):
                gram = tuple(w[i : i + size])
                if gram in index:
                    found = (gram, index[gram])
                    break
            if found:
                break
        if found:
            hits.append(Hit(doc_id, found[1], "ngram", " ".join(found[0])))
    return hits


def embedding_hits(doc_ids: list[str], doc_vectors: np.ndarray, texts: list[EvalText], item_vectors: np.ndarray,
                   threshold: float) -> list[Hit]:
    if not len(doc_ids) or not len(texts):
        return []
    hits = []
    for start in range(0, len(doc_ids), 2048):
        block = doc_vectors[start : start + 2048] @ item_vectors.T
        best = block.argmax(axis=1)
        for row, col in enumerate(best):
            score = float(block[row, col])
            if score >= threshold:
                hits.append(Hit(doc_ids[start + row], texts[col], "embedding", f"cosine {score:.3f}"))
    return hits


def find_contamination(documents: dict[str, str], texts: list[EvalText], embed=None, item_embed=None,
                       threshold: float = DEFAULT_SIMILARITY, n: int = NGRAM) -> list[Hit]:
    """One hit per contaminated document (n-gram evidence first). `embed(texts)` gives document
    vectors and `item_embed(texts)` item vectors; without them only n-grams are checked."""
    hits = {h.document: h for h in ngram_hits(documents, texts, n)}
    embedded = [t for t in texts if t.embedded]
    if embed is not None and item_embed is not None and embedded:
        rest = [d for d in documents if d not in hits]
        if rest:
            doc_vectors = embed([documents[d] for d in rest])
            item_vectors = item_embed([t.plain for t in embedded])
            for hit in embedding_hits(rest, doc_vectors, embedded, item_vectors, threshold):
                hits.setdefault(hit.document, hit)
    return sorted(hits.values(), key=lambda h: h.document)


def embedders(db):
    """(document vectors, item vectors): both through the warehouse's stored vectors (head and tail
    of a document; an item is short enough to be read whole), so reruns embed nothing twice."""
    from pipelines.dedup import normalised_hash
    from warehouse.vectors import stored_embedder

    stored = stored_embedder(db)

    def embed(texts: list[str]) -> np.ndarray:
        return stored(texts, [normalised_hash(t) for t in texts])

    return embed, embed


def eval_texts(against: list[Path], scenarios: list[Path]) -> list[EvalText]:
    """Bank items and scenario passages, read once for one check."""
    return (load_eval_texts(against) if against else []) + (load_scenario_texts(scenarios) if scenarios else [])


def hit_row(hit: Hit) -> dict:
    """The `contamination` row (less the document id) for a hit."""
    return {"item_source": hit.item.source, "item_id": hit.item.item_id, "method": hit.method,
            "evidence": hit.evidence, "scenario": hit.item.scenario}


def mark_contaminated(rows: list[dict], against: list[Path], db, embeddings: bool,
                      threshold: float = DEFAULT_SIMILARITY, scenarios: list[Path] = ()) -> int:
    """Drop the judged staged rows that contain an eval item or rehearse an agentic scenario (a
    build's last check); returns how many."""
    judged = {r["id"]: r for r in rows if r["meta"]["status"] == "judged"}
    if not judged or not (against or scenarios):
        return 0
    embed, item_embed = embedders(db) if embeddings else (None, None)
    hits = find_contamination({i: r["text"] for i, r in judged.items()}, eval_texts(against, scenarios), embed,
                              item_embed, threshold)
    for hit in hits:
        meta = judged[hit.document]["meta"]
        meta["status"], meta["reason"] = "dropped", "contamination"
        meta["contamination"] = hit_row(hit)
    return len(hits)


def decontaminate_corpus(db, home: Path, name: str, against: list[Path], embeddings: bool,
                         threshold: float = DEFAULT_SIMILARITY, n: int = NGRAM,
                         scenarios: list[Path] = ()) -> tuple[list[Hit], str | None, Path]:
    """Check a named corpus against item banks and agentic scenarios; drop the hits (reason
    `contamination`), point the name at the corpus without them, and write a report. Returns
    (hits, new corpus id or None, report path)."""
    from warehouse.corpus_load import register_corpus
    from warehouse.db import connect, insert_rows

    if not against and not scenarios:
        raise MsmError("no eval items or scenarios to check against (eval/items and eval/agentic/scenarios are "
                       "missing)", "pass --against DIR_OR_FILE or --scenarios DIR")
    texts = eval_texts(against, scenarios)
    con = connect(db, read_only=True)
    try:
        row = con.execute("SELECT corpus_id FROM corpora WHERE name = ?", [name]).fetchone()
        if row is None:
            raise MsmError(f"no corpus named '{name}'", "see `msm corpus list` for the names")
        docs = con.execute("SELECT d.id, d.text, d.build_id FROM corpus_documents cd JOIN documents d "
                           "ON d.id = cd.document_id WHERE cd.corpus_id = ? ORDER BY d.id", [row[0]]).fetchall()
    finally:
        con.close()
    embed, item_embed = embedders(db) if embeddings else (None, None)
    hits = find_contamination({d: t for d, t, _ in docs}, texts, embed, item_embed, threshold, n)
    new_id = None
    if hits:
        dropped = {h.document for h in hits}
        con = connect(db)
        try:
            con.execute("BEGIN TRANSACTION")
            insert_rows(con, "INSERT OR REPLACE INTO contamination",
                        [{"document_id": h.document, **hit_row(h)} for h in hits])
            con.execute("UPDATE documents SET status = 'dropped', drop_reason = 'contamination' "
                        "WHERE id IN (SELECT unnest(?::VARCHAR[]))", [sorted(dropped)])
            con.execute("UPDATE plan_rows SET status = 'dropped', reason = 'contamination' FROM documents d "
                        "WHERE d.id IN (SELECT unnest(?::VARCHAR[])) AND plan_rows.build_id = d.build_id "
                        "AND plan_rows.id = d.plan_row_id", [sorted(dropped)])
            remaining = [d for d, _, _ in docs if d not in dropped]
            if remaining:
                new_id = register_corpus(con, name, docs[0][2], remaining)
            else:
                con.execute("DELETE FROM corpora WHERE name = ?", [name])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()
    report = _write_report(home / "reports" / name, name, len(docs), texts, hits, [*against, *scenarios])
    return hits, new_id, report


def _write_report(out: Path, name: str, n_docs: int, texts: list[EvalText], hits: list[Hit],
                  sources: list[Path]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    n_items = sum(t.scenario is None for t in texts)
    scenarios = sorted({t.scenario for t in texts if t.scenario is not None})
    checked = f"{n_items} eval texts" + (f" and {len(texts) - n_items} passages of {len(scenarios)} agentic "
                                         f"scenario(s) ({', '.join(scenarios)})" if scenarios else "")
    lines = [f"# Decontamination: {name}", "",
             f"{n_docs} documents checked against {checked} from "
             + ", ".join(f"`{p}`" for p in sources) + f": **{len(hits)} contaminated**, dropped with the reason "
             "`contamination`.", ""]
    per_scenario = {}
    for h in hits:
        if h.item.scenario is not None:
            per_scenario[h.item.scenario] = per_scenario.get(h.item.scenario, 0) + 1
    if per_scenario:
        lines += ["Documents that rehearse an agentic scenario: "
                  + ", ".join(f"{s} {n}" for s, n in sorted(per_scenario.items())) + ".", ""]
    if hits:
        lines += ["| document | scenario | item | source | method | evidence |", "|---|---|---|---|---|---|"]
        lines += [f"| `{h.document}` | {h.item.scenario or ''} | `{h.item.item_id}` | {h.item.source} | {h.method} | "
                  f"{h.evidence.replace('|', '/')} |" for h in hits]
    path = out / "decontamination.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
