"""LLM layer benchmarks: API throughput against the ideal, faults, cached reruns, prompt caching,
and local batching on the real SmolLM2.

Run: .venv/bin/python benchmarks/backends.py [--skip-local] [--quick]

The fault figure runs the shipped client (AnthropicBackend and RetryPolicy defaults: 120 s idle
timeout, 10 s connect, 6 attempts, backoff 0.5 s doubling to a 30 s cap) against a loopback whose
fault schedule is fixed here (FAULT_MIX per 100 requests), with every duration, the server's and
the client's, divided by one time scale; the ratio of two runs at the same scale is the unscaled one.
The figures come last, one a line, as `name = value`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sys
import tempfile
import time
from collections import Counter
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


def api_benchmarks(quick: bool, late_rejects: bool = False) -> dict[str, float]:
    figures: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="msm-bench-"))
    n = 64 if quick else N
    reqs = requests(n)

    # The server runs in its own process: the client under test does not share a GIL with it.
    with LoopbackProcess(latency=L, api_key=KEY, output_tokens=200) as server:
        client = client_for(server, CallCache(work / "clean"))
        results, clean_s = timed(client, reqs)
        assert all(r.ok for r in results)
        ideal = -(-n // C) * L
        print(f"clean: {n} requests, C={C}, L={L}s: {clean_s:.2f} s (ideal {ideal:.2f} s)")
        figures["api_throughput_vs_ideal"] = ideal / clean_s

        rerun = client_for(server, CallCache(work / "clean"))
        before = server.stats()["requests"]["messages"]
        _, rerun_s = timed(rerun, reqs)
        figures["cached_rerun_calls"] = server.stats()["requests"]["messages"] - before
        figures["cached_rerun_s"] = rerun_s
        print(f"cached rerun: {rerun.stats.cache_hits} hits, {rerun_s:.3f} s")

    figures.update(fault_benchmark(work, quick, late_rejects))

    spec = Path(__file__).resolve().parent.parent / "specs" / "value_augmented.md"
    prefix = spec.read_text(encoding="utf-8") if spec.is_file() else ""
    while len(prefix) < 8_000 * 4:  # at least 2k tokens; the real spec is larger
        prefix += "\nThe assistant explains the values behind its rules."
    with LoopbackProcess(latency=0.05, api_key=KEY, output_tokens=200) as server:
        client = client_for(server, None)
        docs = [Request.user(f"Write a {genre} for {audience}, idea {i}.", system_prefix=prefix, max_tokens=512,
                             purpose="generate")
                for i, (genre, audience) in enumerate((g, a) for g in ("memo", "blog post", "case study", "FAQ")
                                                      for a in range(10 if quick else 50))]
        results, _ = timed(client, docs)
        read = sum(r.usage.cache_read_tokens for r in results)
        billed = read + sum(r.usage.cache_write_tokens + r.usage.input_tokens for r in results)
        print(f"prompt caching: {len(docs)} docs, prefix ~{len(prefix) // 4} tokens, "
              f"cost ${sum(r.cost_usd for r in results):.4f}")
        figures["cache_read_share"] = read / billed
    return figures


# ---- faults under the shipped defaults, every duration divided by one time scale ----------------
FAULT_N, FAULT_C, FAULT_LATENCY = 400, 32, 40.0  # requests, calls in flight, seconds an answer takes
RETRY_AFTER, STALL_AFTER = 10.0, 1.0  # a 429's retry-after; a stalled stream sends for this long first
# Per 100 requests the server receives (retries included): 15 x 429, 3 x 5xx/529, 1 malformed body,
# 1 stream that stalls after its first second; the other 80 are answered.
FAULT_MIX = {"429": 15, "500": 1, "529": 2, "malformed": 1, "stall": 1}
# A rate limit (429) and an overloaded API (529) answer at once, before any generation, as the real
# API's front end does; a 500, a malformed body and a stall come after the answer's latency.
REJECT_FIRST = ("429", "529")


def fault_schedule(seed: int = 7) -> tuple[str | None, ...]:
    """One fixed, shuffled cycle of 100 slots with exactly FAULT_MIX's counts."""
    slots: list[str | None] = [kind for kind, count in FAULT_MIX.items() for _ in range(count)]
    slots += [None] * (100 - len(slots))
    random.Random(seed).shuffle(slots)
    return tuple(slots)


def shipped_client(server, cache, concurrency: int, scale: float) -> LLMClient:
    """The shipped backend and retry policy (defaults untouched), their durations divided by `scale`."""
    backend = AnthropicBackend(api_key=KEY, base_url=server.url, time_scale=scale)
    return LLMClient(backend, model=MODEL, cache=cache, concurrency=concurrency, retry=RetryPolicy(time_scale=scale))


def expected_answers(reqs: list[Request]) -> tuple[list[str], list[str]]:
    """(prompt hash, answer text) the loopback gives each request: its answers are a pure function of
    the prompt, so what the client got can be checked against what the server sent."""
    from msm.llm.testing import LoopbackServer, _anthropic_prompt

    params = AnthropicBackend(api_key=KEY).params
    oracle = LoopbackServer(output_tokens=200)
    hashes, texts = [], []
    for r in reqs:
        prompt = "".join(_anthropic_prompt(params(r, MODEL)))
        hashes.append(hashlib.sha256(prompt.encode()).hexdigest())
        texts.append(oracle.answer(prompt, r.max_tokens, [])[0])
    return hashes, texts


def fault_benchmark(work: Path, quick: bool, late_rejects: bool = False) -> dict[str, float]:
    scale = 40.0 if quick else 10.0
    n = 64 if quick else FAULT_N
    reqs = requests(n, temperature=0.5)  # other keys than the throughput run's
    latency = FAULT_LATENCY / scale
    faults = Faults(schedule=fault_schedule(), retry_after=RETRY_AFTER / scale, stall_after=STALL_AFTER / scale,
                    stall_s=10 * 120.0 / scale, reject_first=() if late_rejects else REJECT_FIRST)
    runs = {}
    for name, fault_cfg in (("clean", None), ("faults", faults)):
        with LoopbackProcess(latency=latency, api_key=KEY, output_tokens=200, faults=fault_cfg) as server:
            client = shipped_client(server, CallCache(work / f"shipped-{name}"), FAULT_C, scale)
            results, seconds = timed(client, reqs)
            runs[name] = (results, seconds, server.stats(), client.stats)
    clean_s, fault_s = runs["clean"][1], runs["faults"][1]
    results, _, stats, client_stats = runs["faults"]

    # Reconcile what the client got against what the server answered.
    hashes, texts = expected_answers(reqs)
    answered = Counter(stats["answered"])
    delivered = sum(1 for r, h, t in zip(results, hashes, texts) if r.ok and r.text == t and answered[h] >= 1)
    failed = sum(1 for r in results if not r.ok)
    wrong = sum(1 for r, t in zip(results, texts) if r.ok and r.text != t)
    unanswered = sum(1 for r, h in zip(results, hashes) if r.ok and answered[h] == 0)
    duplicates = sum(c - 1 for c in answered.values() if c > 1)  # one prompt answered in full twice: paid twice
    strays = sum(c for h, c in answered.items() if h not in set(hashes))
    arrivals = stats["requests"].get("messages", 0)
    injected = sum(stats["faults"].values())
    unexplained = arrivals - (sum(answered.values()) + injected)  # every request the server got: answered or faulted
    print(f"faults ({'429/529 after the latency' if late_rejects else '429/529 at once'}; scale 1/{scale:g}: L {latency:g} s, retry-after {RETRY_AFTER / scale:g} s, idle timeout "
          f"{120 / scale:g} s, backoff base {0.5 / scale:g} s cap {30 / scale:g} s): N={n}, C={FAULT_C}")
    print(f"  clean {clean_s:.2f} s; with faults {fault_s:.2f} s (= {clean_s * scale:.0f} s and "
          f"{fault_s * scale:.0f} s unscaled)")
    print(f"  server: {arrivals} requests, injected {dict(sorted(stats['faults'].items()))}, "
          f"{sum(answered.values())} answered in full; client: {client_stats.calls} calls, "
          f"{client_stats.retries} retries, {client_stats.errors} gave up")
    print(f"  reconciled: {delivered} of {n} delivered with the server's text; {failed} failed, {wrong} with "
          f"other text, {unanswered} the server never answered, {duplicates} paid twice, {strays} stray answers, "
          f"{unexplained} server requests neither answered nor faulted, client calls - server requests = "
          f"{client_stats.calls - arrivals}")
    return {"fault_time_vs_clean": fault_s / clean_s, "fault_lost": n - delivered, "fault_duplicates": duplicates,
            "fault_unreconciled": abs(unexplained) + abs(client_stats.calls - arrivals) + strays}


def stall_benchmark(quick: bool) -> float:
    """One streamed answer that stops sending mid-answer, at real (unscaled) durations with the shipped
    idle timeout and retry policy: seconds from the request to the answer delivered by the retry."""
    scale = 40.0 if quick else 1.0
    faults = Faults(schedule=("stall", None), stall_after=STALL_AFTER / scale, stall_s=600.0 / scale)
    with LoopbackProcess(latency=0.0, api_key=KEY, output_tokens=200, faults=faults) as server:
        client = shipped_client(server, None, 1, scale)
        cut: list[float] = []
        client.on_retry = lambda request, why: cut.append(time.perf_counter())
        started = time.perf_counter()
        results, seconds = timed(client, requests(1))
        stats = server.stats()
    assert results[0].ok and stats["faults"] == {"stall": 1}, (results[0].error, stats)
    print(f"stall{' (scaled 1/40)' if quick else ''}: the stream went silent {STALL_AFTER / scale:g} s in, was cut "
          f"{cut[0] - started:.1f} s after the request (idle timeout {120 / scale:g} s) and answered by the retry "
          f"{seconds:.1f} s after it")
    return seconds


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
    parser.add_argument("--quick", action="store_true", help="small counts, scaled stall, no goals (smoke)")
    parser.add_argument("--late-rejects", action="store_true",
                        help="429 and 529 after the answer's latency too (the pessimistic loopback)")
    args = parser.parse_args()
    figures = api_benchmarks(args.quick, args.late_rejects)
    figures["stall_detect_s"] = stall_benchmark(args.quick)
    if not args.skip_local and not args.quick:
        figures["local_batch_speedup"] = local_benchmark()
    for name in ("api_throughput_vs_ideal", "fault_time_vs_clean", "fault_lost", "fault_duplicates",
                 "fault_unreconciled", "stall_detect_s", "cached_rerun_calls", "cache_read_share",
                 "local_batch_speedup"):
        if name in figures:
            value = figures[name]
            print(f"{name} = {value:.3f}" if isinstance(value, float) and not value.is_integer() else f"{name} = {int(value)}")


if __name__ == "__main__":
    main()
