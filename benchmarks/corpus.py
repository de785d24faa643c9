"""Corpus build against the ideal: is anything but the model or the embedder the bottleneck?

2,000 documents through the whole default `msm corpus build` (plan, datatrove pipeline with
Generate, Gopher filters, placeholder filter, Judge, parquet writer; MinHash and embedding dedup;
n-gram and embedding decontamination against the eval items and agentic scenarios; the DuckDB
loader), with the shipped defaults, against the simulated frontier model (`msm llm simulate`:
varied documents in each genre's word range, 3% planted near-duplicates) pinned here to answer
every call after L = 0.2 s with no rate limit, and C = 32 calls in flight.

The ideal time is the larger of two floors, each a thing the build cannot do faster:
- the calls: the calls the build made, each L long, C at a time (C / (2L) = 80 documents/s);
- the embedder: MiniLM's own time on exactly the texts the build embedded (its stored vectors),
  measured standalone on this machine after the build.
`pipeline_vs_ideal` = ideal time / wall time (goal >= 0.8).

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


def embedded_texts(db: Path, build_id: str) -> tuple[list[str], list[str]]:
    """The document and eval texts the build embedded: those whose hash has a stored vector."""
    import duckdb

    from corpus.decontam import default_item_dirs, default_scenario_dirs, eval_texts
    from pipelines.dedup import normalised_hash

    con = duckdb.connect(str(db), read_only=True)
    try:
        stored = {h for (h,) in con.execute("SELECT text_hash FROM embeddings").fetchall()}
        docs = dict(con.execute("SELECT text_hash, any_value(text) FROM documents WHERE build_id = ? "
                                "GROUP BY text_hash", [build_id]).fetchall())
    finally:
        con.close()
    doc_texts = [t for h, t in docs.items() if h in stored]
    items = {}
    for t in eval_texts(default_item_dirs(), default_scenario_dirs()):
        h = normalised_hash(t.plain)
        if t.embedded and h in stored and h not in docs:
            items.setdefault(h, t.plain)
    assert len(doc_texts) + len(items) == len(stored), (len(doc_texts), len(items), len(stored))
    return doc_texts, list(items.values())


def embedder_seconds(texts: list[str]) -> float:
    """MiniLM alone on these texts, as the build feeds it (head and tail, batches of 32), warm."""
    from msm.models import load_embedder
    from warehouse.vectors import encode

    embedder = load_embedder()
    embedder.encode(["warm-up"] * 32, batch_size=32)
    started = time.perf_counter()
    encode(embedder, texts)
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

    from msm.llm.simulator import SimulatorProcess
    from pipelines.build import BuildOptions, build_corpus

    # Every call answers after L; no rate limit (the benchmark times msm, not the API's limits).
    # The server runs in its own process, so its work does not share the build's GIL; it still
    # shares this machine's cores, which makes the figure conservative.
    pinned = {"latency": {"first_token_s": args.latency, "output_tokens_per_s": 1e9},
              "rate_limits": {"requests_per_minute": 1e9, "input_tokens_per_minute": 1e12,
                              "output_tokens_per_minute": 1e12}}
    import resource

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    with SimulatorProcess(config_overrides=pinned) as server:
        opts = BuildOptions(docs=args.docs, backend="anthropic", model=MODEL, base_url=server.url, progress=False,
                            concurrency=args.concurrency, tasks=args.tasks, workers=args.workers)
        started = time.perf_counter()
        result = build_corpus(str(ROOT / "specs" / "value_augmented.md"), opts)
        wall = time.perf_counter() - started
        own = resource.getrusage(resource.RUSAGE_SELF)
        build_cpu = own.ru_utime + own.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
        calls = server.stats()["requests"].get("messages", 0)
        server_cpu = server.cpu_seconds()
        client_s = client_only(home, result.build_id, server.url, args.concurrency)

    assert result.complete and sum(result.status_counts.values()) == args.docs, result.status_counts
    doc_texts, item_texts = embedded_texts(home / "msm.duckdb", result.build_id)
    embed_s = embedder_seconds(doc_texts + item_texts)
    calls_s = calls * args.latency / args.concurrency
    ideal_s = max(calls_s, embed_s)
    print(f"{args.docs} documents, L={args.latency}s, C={args.concurrency}, {args.tasks} tasks on {args.workers} "
          f"workers, shipped dedup {'+'.join(opts.dedup)}: {wall:.1f} s wall, {calls} API calls, kept "
          f"{result.status_counts.get('kept', 0)}")
    print(f"floors: the calls {calls_s:.1f} s; MiniLM alone on the {len(doc_texts)} documents and {len(item_texts)} "
          f"eval texts the build embedded {embed_s:.1f} s ({len(doc_texts) / embed_s if embed_s else 0:.1f} docs/s "
          f"counting the eval texts' time)")
    cores = len(os.sched_getaffinity(0))
    cpu_floor = (build_cpu + server_cpu) / cores
    print(f"CPU: the build {build_cpu:.1f} s, the simulated server {server_cpu:.1f} s, on {cores} cores: "
          f"{cpu_floor:.1f} s of wall at the least")
    print("stage seconds (datatrove steps are summed over tasks; filters and the writer run inside the stream):")
    for name, seconds in result.stage_seconds.items():
        print(f"  {name:<32} {seconds:8.2f}")
    print(f"status counts: {result.status_counts}")
    print(f"warehouse: {home / 'msm.duckdb'} (query it with MSM_HOME={home} msm warehouse sql ...)")
    print(f"the same {2 * args.docs} requests through LLMClient alone (no datatrove, filters, cache or warehouse): "
          f"{client_s:.1f} s")
    print(f"client_only_vs_ideal = {2 * args.docs * args.latency / args.concurrency / client_s:.3f}")
    print(f"calls_vs_ideal = {calls_s / wall:.3f}")
    print(f"embedder_vs_wall = {embed_s / wall:.3f}")
    print(f"cpu_floor_vs_wall = {cpu_floor / wall:.3f}")
    ratio = ideal_s / wall
    goal = "" if args.quick else f" (goal >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})"
    print(f"pipeline_vs_ideal = {ratio:.3f}{goal}")
    print(f"pipeline_docs_per_s = {args.docs / wall:.1f}")


if __name__ == "__main__":
    main()
