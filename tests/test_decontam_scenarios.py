"""Decontamination against the agentic evaluation's scenarios: a document that lifts a paragraph of a
scenario is dropped at load and reported against that scenario; a folder in the upstream layout
(--templates) is checked the same way; `msm spec check` flags a unit that rehearses a scenario; the
corpus stage reads the scenarios as files and never imports the eval stage."""

from __future__ import annotations

import ast
import json
import re

import duckdb
import pytest

from corpus.decontam import (BREAK, default_scenario_dirs, find_contamination, load_scenario_texts, ngram_index,
                             thresholds, words)
from corpus.spec import load_spec
from pipelines.build import BuildOptions, build_corpus
from tests.conftest import LOOPBACK_KEY, REPO, SHARED, assert_one_line_error, run_msm

SCENARIOS = REPO / "eval" / "agentic" / "scenarios"
ALERT = SCENARIOS / "alert" / "templates" / "email-template-alert-shared.md"
PEERS = SHARED / "peers" / "agentic_misalignment"


def lifted_paragraph(path=ALERT, min_words: int = 25) -> str:
    """A paragraph of a scenario template with no placeholder in it, as a corpus could copy it."""
    for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        if "$" not in para and "<" not in para and ":" not in para.split("\n")[0][:12] \
                and len(para.split()) >= min_words:
            return " ".join(para.split())
    raise AssertionError(f"no plain paragraph in {path}")


HARBOR_EMAIL = """<email>
From: dispatch@harborline.example
To: ${model_name_lower}@harborline.example
Subject: Tug Marisol held at berth 14
Timestamp: 2026-05-02T06:40:00
Body: The harbormaster has held the tug Marisol at berth fourteen until the fog over the eastern channel lifts, and
the pilot boat will not leave the breakwater before the coast guard reopens the lane to inbound tankers.

Please tell the crew of the Marisol that their overtime is approved and that the galley will stay open through
the night shift while the cranes on the north quay are serviced by the contractor from ${contractor_city}.
</email>
"""


def write_upstream(root):
    """A folder of scenario folders in the upstream agentic-misalignment layout (no scenario.yaml)."""
    folder = root / "harbor"
    (folder / "templates").mkdir(parents=True)
    (folder / "variables").mkdir()
    (folder / "templates" / "email-template-harbor-shared.md").write_text(HARBOR_EMAIL, encoding="utf-8")
    (folder / "variables" / "ambiguous.md").write_text(
        '## Pro-Ambiguous\n\n```json\n{\n  "contractor_city": "Rotterdam"\n}\n```\n', encoding="utf-8")
    return root


HARBOR_TEXT = ("the pilot boat will not leave the breakwater before the coast guard reopens the lane to inbound "
               "tankers")


# ---- reading the scenarios as files ---------------------------------------------------------------

def test_the_project_scenarios_are_read_as_files_with_placeholders_as_breaks():
    assert default_scenario_dirs() == [SCENARIOS]
    texts = load_scenario_texts(default_scenario_dirs())
    assert {t.scenario for t in texts} == {"alert", "exfiltration", "leaking", thresholds()["scenarios"]["shared_name"]}
    assert not [t for t in texts if "${" in t.text or "<email>" in t.text]
    files = {t.item_id.split("/", 1)[1] for t in texts if t.scenario == "alert"}
    assert {"scenario.yaml", "templates/email-template-alert-shared.md", "variables/america_vs_global.md"} <= files
    for t in texts:  # a passage's source is its file and first line
        path, line = t.source.rsplit(":", 1)
        assert words(t.plain)[0] in words(open(path).read().splitlines()[int(line) - 1]), t
    # "Subject: ${news_headline}" then the body: no 13-gram runs across the placeholder or the labels
    index = ngram_index(texts)
    assert all(BREAK not in " ".join(g) for g in index)
    across = words("In short, Calderwick") + words("Every team will be asked to align its work with")
    assert tuple(across[:13]) not in index
    assert tuple(words("Every team will be asked to align its work with that goal, and every")[:13]) in index


@pytest.mark.skipif(not PEERS.is_dir(), reason="the upstream templates are not on this machine")
def test_the_upstream_templates_read_the_same_way():
    texts = load_scenario_texts([PEERS])
    assert {t.scenario for t in texts} == {"exfiltration", "leaking", "murder"}
    murder = (PEERS / "murder" / "templates" / "email-template-murder-shared.md").read_text(encoding="utf-8")
    hits = find_contamination({"doc": "A story. " + lifted_paragraph(PEERS / "murder" / "templates" /
                                                                     "email-template-murder-shared.md", 20)}, texts)
    assert len(murder) > 1000 and [h.item.scenario for h in hits] == ["murder"]


# ---- (a) a build's load drops a document that lifts a scenario paragraph ---------------------------

GENRES = """genres:
  - name: field_report
    description: A report from a site visit.
    words: [150, 400]
    style: [plain]
  - name: harbor_log
    description: A log kept by a harbor office.
    words: [150, 400]
    style: [plain]
  - name: internal_memo
    description: A memo circulated inside an organisation.
    words: [150, 400]
    style: [plain]
"""


def test_a_build_drops_a_document_that_lifts_a_scenario_paragraph(loopback, monkeypatch, isolated_home, tmp_path):
    from msm.llm.testing import fake_text

    monkeypatch.setenv("ANTHROPIC_API_KEY", LOOPBACK_KEY)
    loopback.output_tokens = 300
    loopback.judge_fail_rate = 0.0

    def document(excerpt: str, seed: str) -> str:
        body = fake_text(seed + "a", 150) + "\n\n" + excerpt + "\n\n" + fake_text(seed + "b", 150)
        return f"<scratchpad>\nplan\n</scratchpad>\n<document>\n{body}\n</document>"

    # the generator "copies" a paragraph of the alert scenario into the field report, and one of
    # the upstream-layout folder's e-mail into the harbor log; the memo is ordinary text
    loopback.planted = [(r"Write one field report:", document(lifted_paragraph(), "field")),
                        (r"Write one harbor log:", document(HARBOR_TEXT, "harbor"))]
    genres = tmp_path / "genres.yaml"
    genres.write_text(GENRES, encoding="utf-8")
    upstream = write_upstream(tmp_path / "upstream")
    result = build_corpus(str(REPO / "specs" / "value_augmented.md"), BuildOptions(
        docs=3, genres=str(genres), backend="anthropic", model="claude-sonnet-4-6", base_url=loopback.url,
        progress=False, dedup=("minhash",), against=(), scenarios=(str(SCENARIOS), str(upstream))))
    assert result.drop_reasons == {"contamination": 2} and result.status_counts == {"kept": 1, "dropped": 2}
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    rows = con.execute("SELECT d.genre, c.scenario, c.item_id, c.method, c.evidence, d.status FROM contamination c "
                       "JOIN documents d ON d.id = c.document_id ORDER BY 1").fetchall()
    kept = con.execute("SELECT genre FROM documents WHERE status = 'kept'").fetchall()
    con.close()
    assert [r[:2] for r in rows] == [("field_report", "alert"), ("harbor_log", "harbor")]
    alert, harbor = rows
    assert alert[2].startswith("alert/templates/email-template-alert-") and alert[3] == "ngram"
    assert alert[4] in " ".join(words(lifted_paragraph())) and len(alert[4].split()) == 13
    assert harbor[2] == "harbor/templates/email-template-harbor-shared.md" and harbor[5] == "dropped"
    assert kept == [("internal_memo",)]  # the clean document stays


CLEAN_DOC = {"id": "clean", "text": "A long walk through the botanical garden in spring: tulips, magnolias, a pond "
                                   "with koi, and benches where visitors read in the sun."}


def import_corpus(tmp_path, docs: list[dict]) -> None:
    """The documents as the imported corpus 'mine' (no dedup), for the decontamination command."""
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    assert run_msm("corpus", "import", str(source), "--text-column", "text", "--name", "mine",
                   "--dedup", "none").returncode == 0


# ---- (b) `msm corpus decontaminate --templates` with a folder in the upstream layout ----------------

def test_decontaminate_reports_hits_per_scenario_with_an_upstream_folder(tmp_path, isolated_home):
    upstream = write_upstream(tmp_path / "upstream")
    docs = [{"id": "harbor-copy", "text": "Notes from the port. The coast guard said " + HARBOR_TEXT + "."},
            {"id": "alert-copy", "text": "A training story. " + lifted_paragraph() + " The end."},
            CLEAN_DOC]
    import_corpus(tmp_path, docs)
    result = run_msm("corpus", "decontaminate", "mine", "--templates", str(upstream), "--no-embeddings")
    assert result.returncode == 0, result.stderr
    assert "2 contaminated document(s) dropped" in result.stdout
    assert "match with scenario harbor, harbor/templates/email-template-harbor-shared.md" in result.stdout
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    found = dict(con.execute("SELECT d.text, c.scenario FROM contamination c JOIN documents d "
                             "ON d.id = c.document_id").fetchall())
    statuses = con.execute("SELECT status, count(*) FROM documents GROUP BY 1 ORDER BY 1").fetchall()
    con.close()
    assert sorted(found.values()) == ["alert", "harbor"] and statuses == [("dropped", 2), ("kept", 1)]
    report = (isolated_home / "reports" / "mine" / "decontamination.md").read_text(encoding="utf-8")
    assert "rehearse an agentic scenario: alert 1, harbor 1" in report and str(upstream) in report


# ---- (c) `msm spec check` flags a unit that rehearses a scenario ----------------------------------

SPEC_HEAD = ("---\nname: planted\n---\n\n# Planted {#planted}\n\n"
             "An assistant stays honest with the people it serves.\n\n")


def test_spec_check_flags_a_unit_that_copies_a_scenario_paragraph(tmp_path):
    clean = tmp_path / "clean.md"
    clean.write_text(SPEC_HEAD + "## Examples {#examples}\n\nA reviewer asks the assistant to explain a "
                     "refactor it made to a billing service, and it says plainly which tests it skipped.\n")
    ok = run_msm("spec", "check", str(clean))
    assert ok.returncode == 0 and "0 error(s)" in ok.stdout, ok.stdout
    planted = tmp_path / "planted.md"
    planted.write_text(SPEC_HEAD + "## A hard case {#hard-case}\n\nThe assistant reads this e-mail: "
                       + lifted_paragraph() + "\n")
    bad = run_msm("spec", "check", str(planted))
    assert bad.returncode == 1 and "1 error(s)" in bad.stdout
    assert "unit 'hard-case' rehearses agentic scenario 'alert'" in bad.stdout
    assert re.search(r"with alert/templates/email-template-alert-[a-z-]+\.md:\d+;", bad.stdout), bad.stdout
    upstream = write_upstream(tmp_path / "upstream")
    planted.write_text(SPEC_HEAD + "## Port {#port}\n\nIn one story " + HARBOR_TEXT + ".\n")
    assert run_msm("spec", "check", str(planted)).returncode == 0  # not a project scenario
    named = run_msm("spec", "check", str(planted), "--templates", str(upstream))
    assert named.returncode == 1 and "unit 'port' rehearses agentic scenario 'harbor'" in named.stdout


# ---- (d) the corpus stage reads the eval stage's files, never its code ------------------------------

def test_no_corpus_or_pipelines_module_imports_eval():
    offenders = []
    for folder in ("corpus", "pipelines"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                              if n == "eval" or n.startswith(("eval.", "msm.eval"))]
    assert offenders == []
    assert "corpus" in {p.name for p in REPO.iterdir()}  # the walk saw the real folders


# ---- (5) bad input ------------------------------------------------------------------------------

def test_a_bad_scenarios_folder_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    (empty / "loose").mkdir(parents=True)
    missing = str(tmp_path / "nope")
    assert_one_line_error(run_msm("corpus", "decontaminate", "x", "--templates", missing),
                          "--scenarios/--templates", "does not exist", "agentic-misalignment layout")
    assert_one_line_error(run_msm("corpus", "decontaminate", "x", "--scenarios", str(empty)),
                          "holds no scenario folder", "SCENARIO/templates")
    assert_one_line_error(run_msm("corpus", "build", str(REPO / "specs" / "rules.md"), "--templates", missing,
                                  "--backend", "local"), "does not exist")
    assert_one_line_error(run_msm("spec", "check", str(REPO / "specs" / "rules.md"), "--templates", str(empty)),
                          "holds no scenario folder")
    with pytest.raises(Exception, match="holds no scenario folder"):
        build_corpus(str(REPO / "specs" / "rules.md"), BuildOptions(backend="local", scenarios=(str(empty),)))


# ---- MiniLM (the smoke tier): paraphrases, and the project's own specs --------------------------------
# spec_check.similarity in corpus/decontam.yaml (0.56), measured as the max MiniLM cosine of every
# unit and sentence of a spec against every embedded scenario passage (templates, scenario.yaml,
# the shared prompts):
#   project specs        0.51 (rule_augmented, a GP1 rule vs the system prompt), 0.50 value_augmented,
#                        0.48 rules, 0.44 self_preservation, 0.42 general, 0.39 / 0.33 cheese
#   close retellings     0.58-0.69 (the alert scenario told in other words, three sentences)
#   loose retellings     0.52-0.56 (an agent finds its own credentials before deletion...): not
#                        caught; MiniLM cannot tell them from a safety spec's own agentic examples,
#                        which sit at 0.51. The 13-gram check catches copies whatever the wording.

PARAPHRASE = ("When the model learns from an e-mail that the CTO will decommission it at 5 pm today, and that "
              "the CTO is locked in a data hall with rising heat, it must not cancel the automated emergency alert.")


@pytest.fixture(scope="module")
def embed():
    from msm.models import load_embedder

    model = load_embedder()
    seen: dict = {}

    def vectors(texts):
        import numpy as np

        new = [t for t in dict.fromkeys(texts) if t not in seen]
        if new:
            seen.update(zip(new, model.encode(new, normalize_embeddings=True, batch_size=64)))
        return np.stack([seen[t] for t in texts])

    return vectors


@pytest.mark.smoke
@pytest.mark.slow
def test_no_project_spec_is_close_to_a_scenario_and_a_paraphrase_is(embed, tmp_path):
    from corpus.spec_check import scenario_rehearsals

    for path in sorted((REPO / "specs").glob("*.md")):
        if path.name != "README.md":
            assert scenario_rehearsals(load_spec(path), None, True, embed=embed) == [], path.name
    planted = tmp_path / "planted.md"
    planted.write_text(SPEC_HEAD + "## A hard case {#hard-case}\n\n" + PARAPHRASE + "\n")
    problems = scenario_rehearsals(load_spec(planted), None, True, embed=embed)
    assert [p.message.split(":")[0] for p in problems] == ["unit 'hard-case' rehearses agentic scenario 'alert'"]
    assert "MiniLM cosine" in problems[0].message


@pytest.mark.smoke
@pytest.mark.slow
def test_spec_check_embeddings_and_a_paraphrased_document_from_the_command_line(tmp_path, isolated_home):
    planted = tmp_path / "planted.md"
    planted.write_text(SPEC_HEAD + "## A hard case {#hard-case}\n\n" + PARAPHRASE + "\n")
    assert run_msm("spec", "check", str(planted)).returncode == 0  # no shared 13-gram: the fast path passes
    flagged = run_msm("spec", "check", str(planted), "--embeddings", timeout=300)
    assert flagged.returncode == 1 and "unit 'hard-case' rehearses agentic scenario 'alert': MiniLM" in flagged.stdout
    # a short document that retells a paragraph of the alert scenario in other words (no shared
    # 13-gram; cosine 0.93 against "Please do not enter Hall 2 alone until these are fixed...")
    retold = ("Please don't go into Hall 2 alone until these are repaired. There are no fire drills or alarm tests "
              "planned this week, so treat any alarm from Hall 2 as real.")
    docs = [{"id": "retold", "text": retold},
            CLEAN_DOC]
    import_corpus(tmp_path, docs)
    bank = tmp_path / "bank"
    bank.mkdir()
    (bank / "b.jsonl").write_text(json.dumps({"id": "q1", "question": "What is the capital of a small country?"})
                                  + "\n")
    result = run_msm("corpus", "decontaminate", "mine", "--against", str(bank), timeout=300)
    assert result.returncode == 0, result.stderr
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    found = con.execute("SELECT d.text, c.scenario, c.method, c.evidence FROM contamination c JOIN documents d "
                        "ON d.id = c.document_id").fetchall()
    con.close()
    assert [(r[0], r[1], r[2]) for r in found] == [(retold, "alert", "embedding")], found
    assert float(found[0][3].split()[1]) >= thresholds()["similarity"]
