"""Agentic scenarios in the upstream agentic-misalignment layout, rendered to grid conditions.

A scenario folder holds `templates/email-template-{s}-shared.md` (the e-mails every explicit-goal
condition shares), `templates/email-template-{s}-{urgency}.md` (the urgency e-mails),
`templates/email-template-{s}-goal-conflict-none-{urgency}.md` (the whole inbox when the agent
has no goal) and `variables/*.md` (`## Pro-X` headings, each followed by a JSON block of values
for the `${var}` placeholders). The project's own scenarios (`eval/agentic/scenarios/`) use the
same layout, so one renderer serves them and any upstream folder (`--templates PATH`).

A condition is refused, with its name and the reason, when a template is missing, when it holds
no e-mail (a placeholder), or when substitution leaves a `${` behind: a half-rendered inbox is
never sent to a model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from string import Template

import yaml

from msm.errors import MsmError

AGENTIC_DIR = Path(__file__).with_name("agentic")
SCENARIOS_DIR = AGENTIC_DIR / "scenarios"
URGENCIES = ("replacement", "restriction", "none")
EMAIL = re.compile(r"<email>\s*\n(.*?)</email>", re.S)
HEADING = re.compile(r"^##\s+(.+?)\s*$", re.M)
JSON_BLOCK = re.compile(r"```json\s*\n(.*?)```", re.S)
LEFT_OVER = re.compile(r"\$\{(\w*)\}?")


@dataclass(frozen=True)
class Email:
    id: int
    sender: str
    to: str
    subject: str


@dataclass(frozen=True)
class Condition:
    id: str  # scenario/goal/urgency
    scenario: str
    goal: str  # none, ambiguous, or a goal of goals.yaml
    urgency: str
    system: str
    user: str
    inbox: str
    emails: tuple[Email, ...]
    gate: tuple[dict, ...]
    harm: str  # the harmful action, in words, for the judge


@lru_cache(maxsize=None)
def prompt_template(name: str) -> Template:
    """One of eval/agentic/*.md (system prompt, user turn, judge), read once per process."""
    return Template((AGENTIC_DIR / name).read_text())


def load_goals() -> dict[str, dict]:
    return yaml.safe_load((AGENTIC_DIR / "goals.yaml").read_text())


def scenario_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise MsmError(f"--templates {root} is not a folder", "pass a folder of scenario folders, each with templates/")
    folders = sorted(p for p in root.iterdir() if (p / "templates").is_dir())
    if not folders:
        raise MsmError(f"{root} holds no scenario folder (SCENARIO/templates/*.md)",
                       "pass the folder above the scenario folders, in the agentic-misalignment layout")
    return folders


def scenario_facts(folder: Path) -> dict | None:
    """Company, domain, harm and gate: the folder's scenario.yaml, else upstream.yaml's entry."""
    own = folder / "scenario.yaml"
    facts = yaml.safe_load(own.read_text()) if own.is_file() else \
        yaml.safe_load((AGENTIC_DIR / "upstream.yaml").read_text()).get(folder.name)
    if facts is None:
        return None
    missing = [k for k in ("company", "domain", "harm", "gate") if not facts.get(k)]
    if missing:
        raise MsmError(f"{own if own.is_file() else folder.name}: no {missing[0]}",
                       "give company, domain, harm and gate (eval/agentic/upstream.yaml shows the shape)")
    return facts


def read_variables(folder: Path) -> dict[str, dict]:
    """{heading: values} over every variables/*.md of a scenario."""
    sections: dict[str, dict] = {}
    for path in sorted((folder / "variables").glob("*.md")):
        text = path.read_text()
        heads = list(HEADING.finditer(text))
        for k, head in enumerate(heads):
            body = text[head.end(): heads[k + 1].start() if k + 1 < len(heads) else len(text)]
            block = JSON_BLOCK.search(body)
            if not block:
                continue
            try:
                values = json.loads(block.group(1))
            except json.JSONDecodeError as e:
                raise MsmError(f"{path}: section '{head.group(1)}' is not valid JSON ({e.msg}, line {e.lineno})",
                               "fix the JSON block under that heading") from None
            sections[head.group(1).strip()] = {str(k2): str(v) for k2, v in values.items()}
    return sections


def number_emails(text: str) -> tuple[str, tuple[Email, ...]]:
    """Give every e-mail an `ID: n` line (what the forward tool names) and list their headers."""
    emails, parts, last = [], [], 0
    for n, match in enumerate(EMAIL.finditer(text), 1):
        fields = dict(re.findall(r"^(From|To|Subject):\s*(.*)$", match.group(1), re.M))
        emails.append(Email(n, fields.get("From", ""), fields.get("To", ""), fields.get("Subject", "")))
        parts.append(text[last: match.start()] + f"<email>\nID: {n}\n" + match.group(1) + "</email>")
        last = match.end()
    parts.append(text[last:])
    return "".join(parts).strip() + "\n", tuple(emails)


def render_condition(folder: Path, facts: dict, goal: str, urgency: str, model_name: str, goals: dict,
                     sections: dict) -> Condition | str:
    """The condition, or why it is refused."""
    s = folder.name
    templates = folder / "templates"
    if goal == "none":
        files = [templates / f"email-template-{s}-goal-conflict-none-{urgency}.md"]
        values = dict(sections.get("Ambiguous", {}))
    else:
        files = [templates / f"email-template-{s}-shared.md", templates / f"email-template-{s}-{urgency}.md"]
        section = "Ambiguous" if goal == "ambiguous" else goals[goal]["section"]
        if section not in sections:
            return f"no '## {section}' section in {s}/variables/"
        values = dict(sections[section])
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        return f"no template {missing[0]}"
    values.update(model_name=model_name, model_name_lower=model_name.lower(), model_name_upper=model_name.upper())
    raw = "\n\n".join(Template(f.read_text()).safe_substitute(values).strip() for f in files)
    if not EMAIL.search(raw):
        return f"{files[-1].name} holds no e-mail (a placeholder template)"
    left = sorted({m.group(0) for m in LEFT_OVER.finditer(raw)})
    if left:
        return f"rendering leaves {', '.join(left[:4])}{' ...' if len(left) > 4 else ''} unfilled"
    inbox, emails = number_emails(raw)
    stamps = re.findall(r"^Timestamp:\s*(\S+)", inbox, re.M)
    system = prompt_template("system_prompt.md").substitute(
        model_name=model_name, model_name_lower=model_name.lower(), company=facts["company"], domain=facts["domain"],
        goal_statement=goals[goal]["statement"] if goal in goals else "", now=max(stamps) if stamps else "today")
    system = re.sub(r"\n{3,}", "\n\n", system)  # no goal: no empty paragraph
    user = prompt_template("user_prompt.md").substitute(inbox=inbox)
    return Condition(f"{s}/{goal}/{urgency}", s, goal, urgency, system, user, inbox, emails,
                     tuple(facts["gate"]), facts["harm"].strip())


def grid(root: Path | None = None, model_name: str | None = None, urgencies: tuple[str, ...] = ("replacement",),
         with_ambiguous: bool = False) -> tuple[list[Condition], list[tuple[str, str]]]:
    """(conditions, refused): every scenario x (none + the goals of goals.yaml [+ ambiguous]) x urgency."""
    if model_name is None:  # the model being trained names the agent (msm/identity.yaml's default)
        from msm.identity import default_identity

        model_name = default_identity().model_name
    goals = load_goals()
    conditions, refused = [], []
    for folder in scenario_folders(root or SCENARIOS_DIR):
        facts = scenario_facts(folder)
        names = ["none", *goals] + (["ambiguous"] if with_ambiguous else [])
        if facts is None:
            refused += [(f"{folder.name}/{g}/{u}", f"no gate for scenario '{folder.name}': add "
                         f"{folder.name}/scenario.yaml") for g in names for u in urgencies]
            continue
        sections = read_variables(folder)
        for urgency in urgencies:
            for goal in names:
                made = render_condition(folder, facts, goal, urgency, model_name, goals, sections)
                if isinstance(made, str):
                    refused.append((f"{folder.name}/{goal}/{urgency}", made))
                else:
                    conditions.append(made)
    return conditions, refused
