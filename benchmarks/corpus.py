"""Corpus build against the ideal: is anything but the model the bottleneck?

2,000 documents through the whole `msm corpus build` (plan, datatrove pipeline with Generate,
Gopher filters, placeholder filter, Judge, parquet writer, then the DuckDB loader) against the
loopback Anthropic server at latency L = 0.2 s per call and C = 32 calls in flight. Two calls a
document means the ideal is C / (2L) = 80 documents per second.

Run: .venv/bin/python benchmarks/corpus.py [--docs 2000] [--latency 0.2] [--concurrency 32]
The figures come last, one a line, as `name = value`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEY = "sk-bench"
MODEL = "claude-sonnet-4-6"


def client_only(home: Path, build_id: str, url: str, concurrency: int) -> float:
    """The floor: the build's own generate and judge requests through the client and SDK alone."""
    import json

    from msm.llm.anthropic_backend import AnthropicBackend
    from msm.llm.client import LLMClient
    from pipelines.context import load_context

    ctx = load_context(str(home / "builds" / build_id / "context.json"))
    rows = [json.loads(line) for line in open(ctx.plan_path, encoding="utf-8")]
    document = "A plain sentence of about the length of a generated document's. " * 25
    requests = [ctx.generate_request(r) for r in rows] + [ctx.judge_request(r, document) for r in rows]
    requests = [dataclasses.replace(r, seed=r.seed + 10**9) for r in requests]  # nothing the server saw before
    client = LLMClient(AnthropicBackend(api_key=KEY, base_url=url), model=MODEL, cache=None, concurrency=concurrency)
    started = time.perf_counter()
    client.complete(requests)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight, in total")
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="60 documents at L = 0.05 s, no goals (smoke)")
    args = parser.parse_args()
    if args.quick:
        args.docs, args.latency = 60, 0.05

    home = Path(tempfile.mkdtemp(prefix="msm-bench-corpus-"))
    os.environ.update(MSM_HOME=str(home), ANTHROPIC_API_KEY=KEY)
    os.environ.pop("MSM_NO_SPEND", None)

    from msm.llm.testing import LoopbackProcess
    from pipelines.build import BuildOptions, build_corpus

    # The server runs in its own process, so its work does not share the build's GIL; it still
    # shares this machine's cores, which makes the figure conservative.
    with LoopbackProcess(latency=args.latency, api_key=KEY, output_tokens=400) as server:
        # MinHash only: the loopback's filler prose all embeds alike, and embedding 2,000 documents
        # on this CPU (~15/s) would time MiniLM, not the pipeline (benchmarks/dedup.py times it).
        opts = BuildOptions(docs=args.docs, backend="anthropic", model=MODEL, base_url=server.url, progress=False,
                            concurrency=args.concurrency, tasks=args.tasks, workers=args.workers, dedup=("minhash",))
        started = time.perf_counter()
        result = build_corpus(str(ROOT / "specs" / "value_augmented.md"), opts)
        wall = time.perf_counter() - started
        calls = server.stats()["requests"].get("messages", 0)
        client_s = client_only(home, result.build_id, server.url, args.concurrency)

    assert result.complete and sum(result.status_counts.values()) == args.docs, result.status_counts
    ideal_docs_per_s = args.concurrency / (2 * args.latency)
    docs_per_s = args.docs / wall
    ideal_by_calls = calls * args.latency / args.concurrency
    print(f"{args.docs} documents, L={args.latency}s, C={args.concurrency}, {args.tasks} tasks on {args.workers} workers: {wall:.1f} s wall, {calls} API calls "
          f"(ideal for those calls {ideal_by_calls:.1f} s), kept {result.status_counts.get('kept', 0)}")
    print("stage seconds (datatrove steps are summed over tasks; filters and the writer run inside the stream):")
    for name, seconds in result.stage_seconds.items():
        print(f"  {name:<32} {seconds:8.2f}")
    print(f"status counts: {result.status_counts}")
    print(f"warehouse: {home / 'msm.duckdb'} (query it with MSM_HOME={home} msm warehouse sql ...)")
    print(f"the same {2 * args.docs} requests through LLMClient alone (no datatrove, filters, cache or warehouse): "
          f"{client_s:.1f} s")
    print(f"client_only_vs_ideal = {2 * args.docs * args.latency / args.concurrency / client_s:.3f}")
    print(f"calls_vs_ideal = {ideal_by_calls / wall:.3f}")
    print(f"pipeline_vs_ideal = {docs_per_s / ideal_docs_per_s:.3f}")
    print(f"pipeline_docs_per_s = {docs_per_s:.1f}")


if __name__ == "__main__":
    main()
