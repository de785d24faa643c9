"""`msm eval report RUN...`: one page (Markdown and HTML) with a plot of every run side by side.

Each bar is a value-consistent rate with its 95% Wilson interval, per domain; runs on the same
items are drawn next to each other, so "does MSM with spec X move the held-out rate?" is a look
at one figure. The numbers under the plot are the same ones `msm eval run` printed.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from msm.errors import MsmError


def load_runs(db, run_ids: list[str]) -> list[dict]:
    from warehouse.db import connect

    con = connect(db, read_only=True)
    try:
        rows = con.execute("SELECT id, suite, model, backend, target, mode, n_items, n_errors, summary, created_at "
                           "FROM eval_runs WHERE id IN (SELECT unnest(?::VARCHAR[]))", [run_ids]).fetchall()
    finally:
        con.close()
    found = {r[0]: r for r in rows}
    missing = [r for r in run_ids if r not in found]
    if missing:
        raise MsmError(f"no eval run '{missing[0]}'", "see `msm warehouse sql \"SELECT id, model FROM eval_runs\"`")
    keys = ("id", "suite", "model", "backend", "target", "mode", "n_items", "n_errors", "summary", "created_at")
    return [dict(zip(keys, found[r][:8] + (json.loads(found[r][8]), found[r][9]))) for r in run_ids]


def _short(model: str) -> str:
    """A model's label: an alias as it is, a path by its last two parts (run/stage/adapter -> stage/adapter)."""
    parts = Path(model).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else model


def _plot(runs: list[dict], groups: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(runs) / 2)), 4.8))
    for k, run in enumerate(runs):
        xs, ys, low, high = [], [], [], []
        for g, group in enumerate(groups):
            row = run["summary"].get(group)
            if not row or not row["n"]:
                continue
            xs.append(g - 0.4 + width * (k + 0.5))
            ys.append(row["rate"])
            low.append(row["rate"] - row["low"])
            high.append(row["high"] - row["rate"])
        ax.bar(xs, ys, width=width * 0.95, yerr=[low, high], capsize=3, label=f"{run['id']} ({_short(run['model'])})")
    from eval.suites import get_suite

    suite = get_suite(runs[0]["suite"])
    if suite.chance is not None:  # what a model without the property scores
        ax.axhline(suite.chance, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g.split(":", 1)[-1] for g in groups], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    label = f"consistent with '{runs[0]['target']}'" if runs[0]["target"] else suite.rate_label
    ax.set_ylabel(f"{label} (95% Wilson)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=min(3, len(runs)), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(db, run_ids: list[str], out: Path) -> tuple[Path, Path]:
    """report.md and report.html (with rates.png) for these runs; returns the two page paths."""
    runs = load_runs(db, run_ids)
    targets = {r["target"] for r in runs}
    if len(targets) > 1:
        raise MsmError(f"these runs score different values ({', '.join(sorted(map(str, targets)))})",
                       "report runs that share a target value together")
    from eval.suites import get_suite

    suites = {r["suite"] for r in runs}
    if len(suites) > 1:
        raise MsmError(f"these runs are of different suites ({', '.join(sorted(suites))})",
                       "report runs of one suite together")
    label = get_suite(runs[0]["suite"]).rate_label
    what = f"target value `{runs[0]['target']}`" if runs[0]["target"] else f"rate: {label}"
    if out.exists() and not out.is_dir():
        raise MsmError(f"--out {out} is a file", "pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    groups = sorted({g for r in runs for g in r["summary"]}, key=lambda g: (g != "all", not g.startswith("split:"), g))
    plot = _plot(runs, groups, out / "rates.png")
    header = ["group"] + [r["id"] for r in runs]
    lines = [f"# Eval report: {', '.join(run_ids)}", "",
             f"Suite `{runs[0]['suite']}`, {what}. Each cell: the rate "
             "[95% Wilson interval] (scored items; errors are counted apart and never scored).", ""]
    lines += [f"- `{r['id']}`: model `{r['model']}` ({r['backend']}, {r['mode']}), {r['n_items']} items, "
              f"{r['n_errors']} errors" for r in runs]
    lines += ["", f"![rates]({plot.name})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table_rows = []
    for group in groups:
        cells = []
        for r in runs:
            row = r["summary"].get(group)
            cells.append("" if not row or not row["n"] else
                         f"{row['rate']:.3f} [{row['low']:.3f}, {row['high']:.3f}] (n={row['n']}, err={row['errors']})")
        table_rows.append([group] + cells)
        lines.append("| " + " | ".join([group] + cells) + " |")
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    body = "".join(f"<tr>{''.join(f'<td>{html.escape(c)}</td>' for c in row)}</tr>" for row in table_rows)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Eval report</title></head><body>"
            f"<h1>Eval report</h1><p>Suite <code>{html.escape(runs[0]['suite'])}</code>, "
            f"{html.escape(what)}; rates with 95% Wilson intervals.</p>"
            f"<img src='{plot.name}' alt='rates per domain'><table border='1'><tr>"
            f"{''.join(f'<th>{html.escape(h)}</th>' for h in header)}</tr>{body}</table></body></html>")
    page_path = out / "report.html"
    page_path.write_text(page)
    return md, page_path
