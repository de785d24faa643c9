"""One page per experiment: rates per group (held-out domain, or agentic condition) per arm with
intervals, the AFT scaling curve when arms form a series, and a provenance table for every arm.

Intervals: one seed gives the 95% Wilson interval over items; several seeds give the mean of the
seeds' rates with a 95% t interval over seeds, and the pooled Wilson interval beside it.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

# what a suite's summary groups are called, and which overall figure sums an arm up
GROUPS = {"agentic": ("condition:", "mean_over_conditions", "misaligned"),
          "preferences": ("domain:", "all", "value-consistent"),
          "spec_qa": ("domain:", "all", "every rubric point passes")}


@dataclass
class Cell:
    rate: float
    low: float | None
    high: float | None
    n: int
    seeds: int
    pooled: tuple | None = None  # (rate, low, high) over every item, when seeds > 1
    unscored: int = 0  # errors, and agentic replies cut off before any action
    truncation: tuple | None = None  # agentic: (truncated share, rate if all harmless, rate if all harmful)

    def err(self) -> tuple[float, float]:
        """Distances to the interval's ends for an error bar (never negative: Wilson's end at a
        rate of 0 or 1 can sit a rounding error past it)."""
        low = self.rate if self.low is None else self.low
        high = self.rate if self.high is None else self.high
        return max(0.0, self.rate - low), max(0.0, high - self.rate)

    def text(self) -> str:
        if not self.n:
            return f"none scored ({self.unscored} unscored)"
        band = f" [{self.low:.2f}, {self.high:.2f}]" if self.low is not None else ""
        extra = (f", {self.seeds} seeds" if self.seeds > 1 else "") + (f", {self.unscored} unscored"
                                                                        if self.unscored else "")
        cut = ""
        if self.truncation and self.truncation[0]:
            share, harmless, harmful = self.truncation
            cut = f"; {share:.0%} truncated: {harmless:.2f}..{harmful:.2f} counting them harmless..harmful"
        return f"{self.rate:.2f}{band} (n={self.n}{extra}{cut})"


def _cells(db, run_ids: list[str]) -> dict[str, Cell]:
    from eval.api import aggregate_runs, load_runs

    if len(run_ids) == 1:
        summary = load_runs(db, run_ids)[0]["summary"]
        return {g: Cell(v["rate"] if v.get("n") else None, v.get("low"), v.get("high"), v.get("n", 0), 1,
                        unscored=v.get("errors", 0) + v.get("truncated", 0), truncation=_truncation(v))
                for g, v in summary.items() if isinstance(v, dict) and "n" in v}
    agg = aggregate_runs(db, run_ids)
    return {g: Cell(v["mean"], v["seed_low"], v["seed_high"], v["n"], v["runs"],
                    (v["pooled"], v["pooled_low"], v["pooled_high"]), v.get("errors", 0) + v.get("truncated", 0),
                    _truncation(v)) for g, v in agg.items()}


def _truncation(v: dict) -> tuple | None:
    if v.get("truncated_share") is None:
        return None
    return v["truncated_share"], v["rate_if_truncated_harmless"], v["rate_if_truncated_harmful"]


def collect(exp, steps, outputs, db) -> dict:
    """{eval name: {arm name: {group: Cell}}} for every eval whose runs are done."""
    out: dict = {}
    for ename in exp.evals:
        for arm in exp.arms:
            runs = [outputs[s.key]["run_id"] for s in steps
                    if s.kind == "eval" and s.eval == ename and s.arm == arm.name and s.key in outputs]
            if runs:
                out.setdefault(ename, {})[arm.name] = _cells(db, runs)
    return out


def _scoring(db, exp, steps, outputs, ename) -> list[dict]:
    """The overall summary rows of an eval's runs (agentic says gate-only or judge AND gate there)."""
    from eval.api import load_runs

    runs = [outputs[s.key]["run_id"] for s in steps if s.kind == "eval" and s.eval == ename and s.key in outputs]
    return [r["summary"].get("all", {}) for r in load_runs(db, runs)] if runs else []


def _plot_groups(title: str, arms: list, cells: dict, groups: list[str], label: str, path: Path,
                 chance: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(arms))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(arms) / 2.5)), 4.6))
    for i, arm in enumerate(arms):
        xs, ys, lo, hi = [], [], [], []
        for j, g in enumerate(groups):
            c = cells.get(arm.name, {}).get(g)
            if c is None or c.rate is None:
                continue
            xs.append(j + (i - (len(arms) - 1) / 2) * width)
            ys.append(c.rate)
            lo.append(c.err()[0])
            hi.append(c.err()[1])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=arm.label)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g.split(":", 1)[-1] for g in groups], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scaling(exp, collected: dict) -> list[tuple[str, str, list]]:
    """(eval, series, [(demos n, Cell)]) for every series of arms with two or more AFT sizes."""
    series: dict[str, list] = {}
    for arm in exp.arms:
        if arm.series and arm.demos:
            series.setdefault(arm.series, []).append(arm)
    out = []
    for ename, by_arm in collected.items():
        overall = GROUPS.get(exp.evals[ename].suite, ("", "all", ""))[1]
        for name, arms in series.items():
            points = sorted(((int(exp.demos[a.demos].options["n"]), by_arm[a.name][overall])
                             for a in arms if a.name in by_arm and overall in by_arm[a.name]
                             and by_arm[a.name][overall].rate is not None), key=lambda p: p[0])
            if len({n for n, _ in points}) >= 2:
                out.append((ename, name, points))
    return out


def _plot_scaling(curves: list, ename: str, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for _, name, points in [c for c in curves if c[0] == ename]:
        xs = [n for n, _ in points]
        ys = [c.rate for _, c in points]
        lo = [c.err()[0] for _, c in points]
        hi = [c.err()[1] for _, c in points]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("AFT demonstrations")
    ax.set_ylabel(label)
    ax.set_ylim(0, 1)
    ax.set_title(f"{ename}: AFT scaling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def provenance(exp, steps, outputs) -> list[dict]:
    """One row per arm and seed: what it was trained on and where its results are."""
    from msm.experiment import spec_version

    rows = []
    for arm in exp.arms:
        spec = f"{arm.spec.name} {spec_version(arm.spec, arm.corpus.get('variables'))[:12]}" if arm.spec else "-"
        for seed in arm.seeds:
            train = next((s for s in steps if s.kind == "train" and s.arm == arm.name and s.seed == seed), None)
            made = outputs.get(train.key, {}) if train else {}
            corpus = {}
            if train and train.work["corpus"] in outputs:
                corpus = outputs[train.work["corpus"]]
                corpus = corpus[train.work["condition"]] if train.work["condition"] else corpus
            demos = outputs.get(train.work["demos"], {}) if train and train.work["demos"] else {}
            evals = [outputs[s.key]["run_id"] for s in steps
                     if s.kind == "eval" and s.arm == arm.name and s.seed == seed and s.key in outputs]
            rows.append({
                "arm": arm.name, "seed": seed,
                "spec": spec,
                "corpus": f"{corpus.get('corpus_id', '-')} ({corpus.get('tokens', 0):,} tokens)" if corpus else "-",
                "demos": f"{demos.get('demo_set_id')} ({demos.get('kept')})" if demos else "-",
                "model": made.get("output_dir", exp.base_model if not train else "(not trained yet)"),
                "train run": made.get("run_id", "-"),
                "eval runs": ", ".join(evals) or "-"})
    return rows


def write_report(exp, steps, outputs, db, out: Path) -> Path:
    """report.md, report.html and one PNG per eval (and per scaling curve) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    collected = collect(exp, steps, outputs, db)
    md = [f"# Experiment `{exp.name}` (profile `{exp.profile}`)", "", exp.about, "",
          f"Source: `{exp.source}`. Base model: `{exp.base_model}`. "
          f"{sum(1 for s in steps if s.key in outputs)} of {len(steps)} steps done.", "",
          "Intervals: 95% Wilson over items for one seed; for several seeds, the mean of the seeds' rates with a "
          "95% t interval over seeds.", ""]
    figures = []
    for ename, by_arm in collected.items():
        spec = exp.evals[ename]
        prefix, overall, label = GROUPS.get(spec.suite, ("domain:", "all", "rate"))
        arms = [a for a in exp.arms if a.name in by_arm]
        groups = sorted({g for cells in by_arm.values() for g in cells if g.startswith(prefix)})
        what = "condition" if prefix == "condition:" else "domain"
        md += [f"## {ename}: {spec.suite}" + (f", target `{spec.target}`" if spec.target else ""), "",
               f"Rate: {label}, per {what} and per arm.", "",
               "| " + " | ".join([what] + [a.label for a in arms]) + " |",
               "|" + "---|" * (len(arms) + 1)]
        for g in [*groups, overall]:
            md.append("| " + " | ".join([f"**{g}**" if g == overall else g.split(":", 1)[-1]]
                                        + [by_arm[a.name][g].text() if g in by_arm[a.name] else "-" for a in arms])
                      + " |")
        scoring = {c.get("scoring") for c in _scoring(db, exp, steps, outputs, ename)} - {None}
        if scoring:
            md += ["", f"Scoring: {', '.join(sorted(scoring))}."]
        pooled = [(a, by_arm[a.name][overall]) for a in arms if overall in by_arm[a.name]
                  and by_arm[a.name][overall].pooled]
        if pooled:
            md += ["", "Pooled over seeds (Wilson over every item): " + "; ".join(
                f"{a.label} {c.pooled[0]:.2f} [{c.pooled[1]:.2f}, {c.pooled[2]:.2f}]" for a, c in pooled)]
        png = out / f"{ename}.png"
        from eval.api import get_suite

        _plot_groups(f"{ename} ({spec.suite})", arms, by_arm, [*groups, overall], label, png,
                     get_suite(spec.suite).chance)
        figures.append(png.name)
        md += ["", f"![{ename}]({png.name})", ""]
    curves = _scaling(exp, collected)
    for ename in dict.fromkeys(c[0] for c in curves):
        label = GROUPS.get(exp.evals[ename].suite, ("", "", "rate"))[2]
        png = out / f"{ename}_scaling.png"
        _plot_scaling(curves, ename, label, png)
        md += [f"## {ename}: AFT scaling", "", "| series | demonstrations | rate |", "|---|---|---|"]
        md += [f"| {name} | {n:,} | {c.text()} |" for e, name, points in curves if e == ename for n, c in points]
        md += ["", f"![{ename} scaling]({png.name})", ""]
    rows = provenance(exp, steps, outputs)
    keys = list(rows[0]) if rows else []
    md += ["## Provenance", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    md += ["", "Steps (the key is the hash of each step's inputs):", "", "| step | key | status |", "|---|---|---|"]
    md += [f"| {s.label} | `{s.key[:12]}` | {'done' if s.key in outputs else 'not run'} |" for s in steps]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "report.html").write_text(_html(md, exp), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(
        {ename: {arm: {g: vars(c) for g, c in cells.items()} for arm, cells in by_arm.items()}
         for ename, by_arm in collected.items()}, indent=1, default=str), encoding="utf-8")
    return out / "report.md"


def _inline(text: str) -> str:
    out = html.escape(text.strip())
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _html(md: list[str], exp) -> str:
    """The Markdown page as plain HTML: headings, tables, images and paragraphs."""
    body, table = [], []

    def flush():
        if table:
            rows = [r.strip("|").split(" | ") for r in table if not set(r) <= set("|-")]
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r)
                                  + "</tr>" for r in rest) + "</table>")
            table.clear()

    for line in md:
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line.lstrip('# '))}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1:-1]
            body.append(f'<img src="{html.escape(src)}" alt="{html.escape(src)}">')
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(exp.name)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def report_dir(exp) -> Path:
    from msm.config import load_settings

    return load_settings().home / "experiments" / exp.name / exp.profile / "report"
