"""Spec parse time on OpenAI's Model Spec, and on a 10x synthetic spec (the parse must be linear).

Run: .venv/bin/python benchmarks/spec_parse.py [path-to-spec] [--quick]
The figures come last, as `name = value` lines.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from corpus.spec import parse_spec_text  # noqa: E402

DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "realworld" / "openai_model_spec.md"


def best_of(text: str, repeats: int) -> tuple[float, int]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        spec = parse_spec_text(text, source="bench.md")
        times.append(time.perf_counter() - start)
    return min(times), len(spec.units)


def scaled(text: str, factor: int) -> str:
    """`factor` copies of the spec, anchors renamed per copy so ids stay unique as in a real spec."""
    copies = [re.sub(r"\{#([^\s}]+)", lambda m, k=k: "{#" + f"{m.group(1)}_{k}", text) for k in range(factor)]
    return "\n".join(copies)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--quick"]
    quick = "--quick" in sys.argv[1:]  # fewer repeats, no goals (smoke)
    path = Path(args[0]) if args else DEFAULT
    if not path.is_file():
        sys.exit(f"spec not found: {path} (pass a path, or put ../shared/realworld beside the repo)")
    text = path.read_text(encoding="utf-8")
    big = scaled(text, 10)
    best_of(text, 2)  # warm up imports, regex caches and the format file
    repeats = (3, 1, 1) if quick else (15, 5, 2)
    t1, n1 = best_of(text, repeats[0])
    t10, n10 = best_of(big, repeats[1])
    t40, _ = best_of(scaled(text, 40), repeats[2])
    print(f"input: {path.name}, {len(text.encode()) / 1024:.0f} KiB, {n1} units; 10x: {len(big.encode()) / 2**20:.2f} MiB, {n10} units")
    print(f"best of {repeats[0]} at 1x, {repeats[1]} at 10x, {repeats[2]} at 40x; python {sys.version.split()[0]}")
    print(f"t(40x)/t(10x) = {t40 / t10:.2f} (4.0 is linear)")
    print(f"spec_parse_s_openai = {t1:.4f}")
    print(f"spec_parse_10x_ratio = {t10 / t1:.2f}")


if __name__ == "__main__":
    main()
