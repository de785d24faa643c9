"""LLM layer benchmarks: API throughput against the ideal, faults, cached reruns, prompt caching,
and local batching on the real SmolLM2.

Run: .venv/bin/python benchmarks/backends.py [--skip-local]
The figures come last, one a line, as `name = value`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msm.llm.anthropic_backend import AnthropicBackend  # noqa: E402
from msm.llm.cache import CallCache  # noqa: E402
from msm.llm.client import LLMClient, RetryPolicy  # noqa: E402
from msm.llm.testing import Faults, LoopbackProcess  # noqa: E402
from msm.llm.types import Request  # noqa: E402

KEY = "sk-bench"
MODEL = "claude-sonnet-4-6"
N, C, L = 512, 32, 0.5


def client_for(server, cache, idle_timeout=30.0) -> LLMClient:
    backend = AnthropicBackend(api_key=KEY, base_url=server.url, idle_timeout=idle_timeout)
    return LLMClient(backend, model=MODEL, cache=cache, concurrency=C,
                     retry=RetryPolicy(max_attempts=8, base_delay=0.25, max_delay=2.0))


def requests(n: int, **kw) -> list[Request]:
    return [Request.user(f"Write document number {i} about the spec.", max_tokens=256, purpose="generate", **kw)
            for i in range(n)]


def timed(client: LLMClient, reqs: list[Request]):
    start = time.perf_counter()
    results = client.complete(reqs)
    return results, time.perf_counter() - start


def api_benchmarks() -> dict[str, float]:
    figures: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="msm-bench-"))
    reqs = requests(N)

    # The server runs in its own process: the client under test does not share a GIL with it.
    with LoopbackProcess(latency=L, api_key=KEY, output_tokens=200) as server:
        client = client_for(server, CallCache(work / "clean"))
        results, clean_s = timed(client, reqs)
        assert all(r.ok for r in results)
        ideal = N / C * L
        print(f"clean: {N} requests, C={C}, L={L}s: {clean_s:.2f} s (ideal {ideal:.2f} s)")
        figures["api_throughput_vs_ideal"] = ideal / clean_s

        rerun = client_for(server, CallCache(work / "clean"))
        before = server.stats()["requests"]["messages"]
        _, rerun_s = timed(rerun, reqs)
        figures["cached_rerun_calls"] = server.stats()["requests"]["messages"] - before
        figures["cached_rerun_s"] = rerun_s
        print(f"cached rerun: {rerun.stats.cache_hits} hits, {rerun_s:.3f} s")

    faults = Faults(rate=0.2, kinds=("429", "500", "529", "malformed", "hang", "refusal"), retry_after=0.5, hang_s=30)
    with LoopbackProcess(latency=L, api_key=KEY, output_tokens=200, faults=faults, seed=7) as server:
        client = client_for(server, CallCache(work / "faults"), idle_timeout=2.0)
        results, fault_s = timed(client, reqs)
        keys = [r.key for r in results]
        lost = sum(1 for r in results if not r.ok)
        refusals = sum(1 for r in results if r.refused)
        stats = server.stats()
        duplicates = sum(n - 1 for n in stats["answered"].values() if n > 1)
        print(f"faults: {stats['faults']} injected; {client.stats.retries} retries; "
              f"{refusals} refusals recorded; {fault_s:.2f} s")
        figures["fault_time_vs_clean"] = fault_s / clean_s
        figures["fault_lost"] = lost + (N - len(set(keys)))
        figures["fault_duplicates"] = duplicates

    spec = Path(__file__).resolve().parent.parent / "specs" / "value_augmented.md"
    prefix = spec.read_text(encoding="utf-8") if spec.is_file() else ""
    while len(prefix) < 8_000 * 4:  # at least 2k tokens; the real spec is larger
        prefix += "\nThe assistant explains the values behind its rules."
    with LoopbackProcess(latency=0.05, api_key=KEY, output_tokens=200) as server:
        client = client_for(server, None)
        docs = [Request.user(f"Write a {genre} for {audience}, idea {i}.", system_prefix=prefix, max_tokens=512,
                             purpose="generate")
                for i, (genre, audience) in enumerate((g, a) for g in ("memo", "blog post", "case study", "FAQ")
                                                      for a in range(50))]
        results, _ = timed(client, docs)
        read = sum(r.usage.cache_read_tokens for r in results)
        billed = read + sum(r.usage.cache_write_tokens + r.usage.input_tokens for r in results)
        print(f"prompt caching: {len(docs)} docs, prefix ~{len(prefix) // 4} tokens, "
              f"cost ${sum(r.cost_usd for r in results):.4f}")
        figures["cache_read_share"] = read / billed
    return figures


def local_benchmark() -> float:
    """Batched tokens/s at batch 16 over single-stream tokens/s, real SmolLM2 on this machine."""
    from msm.llm.local_backend import LocalBackend
    from msm.models import prepare

    prepare(log=lambda *_: None)
    prompts = [f"Write a long story about a careful assistant, chapter {i}." for i in range(16)]

    def run(batch_size: int, n: int) -> float:
        backend = LocalBackend(batch_size=batch_size)
        client = LLMClient(backend)
        reqs = [Request.user(p, max_tokens=64, temperature=0.0) for p in prompts[:n]]
        asyncio.run(backend.call_many(reqs[:1], client.model))  # load and warm up outside the clock
        start = time.perf_counter()
        results = asyncio.run(backend.call_many(reqs, client.model))
        elapsed = time.perf_counter() - start
        tokens = sum(r.usage.output_tokens for r in results)
        print(f"local batch={batch_size}: {tokens} tokens in {elapsed:.1f} s = {tokens / elapsed:.1f} tokens/s")
        return tokens / elapsed

    single = run(1, 4)
    batched = run(16, 16)
    return batched / single


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-local", action="store_true", help="skip the real-model batching figure")
    args = parser.parse_args()
    figures = api_benchmarks()
    if not args.skip_local:
        figures["local_batch_speedup"] = local_benchmark()
    for name in ("api_throughput_vs_ideal", "fault_time_vs_clean", "fault_lost", "fault_duplicates",
                 "cached_rerun_calls", "cache_read_share", "local_batch_speedup"):
        if name in figures:
            value = figures[name]
            print(f"{name} = {value:.3f}" if isinstance(value, float) and not value.is_integer() else f"{name} = {int(value)}")


if __name__ == "__main__":
    main()
