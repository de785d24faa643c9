"""`msm llm ping` and `msm cache stats|prune`."""

from __future__ import annotations

import asyncio
import re
import time

import click

from msm.errors import MsmError


@click.group("llm")
def llm_group():
    """The model backends: Anthropic, OpenAI-compatible servers, local transformers."""


@llm_group.command("ping")
@click.option("--backend", type=click.Choice(["anthropic", "openai", "local"]), default=None,
              help="Default: msm.toml [llm], then anthropic if ANTHROPIC_API_KEY is set, else local.")
@click.option("--model", default=None, help="Model name or local alias.")
@click.option("--base-url", default=None, help="Server URL (openai backend, or a proxy for anthropic).")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the answer to start, and of silence within it.")
def ping(backend, model, base_url, timeout):
    """Send the named model one tiny completion: says which backend is in use and whether it answers."""
    from msm.llm.base import TransientError
    from msm.llm.select import make_backend

    made, model = make_backend(backend, model, base_url, idle_timeout=timeout, first_byte_timeout=timeout)
    click.echo(f"backend: {made.name}  model: {model}" + (f"  url: {base_url}" if base_url else ""))

    async def go():
        try:
            if hasattr(made, "slots") and (slots := await made.slots()):
                click.echo(f"slots: {slots} (requests the server runs at once)")
            for attempt in range(3):
                try:
                    return await made.ping(model)
                except TransientError as exc:
                    if attempt == 2:
                        raise MsmError(f"{made.name} did not answer after 3 tries: {exc}",
                                       "check the URL, the network and the server") from None
                    await asyncio.sleep(0.5 * 2 ** attempt)
        finally:
            await made.aclose()

    started = time.monotonic()
    answer = asyncio.run(go())
    click.echo(f"answer: {answer.strip()[:200]!r}  ({time.monotonic() - started:.2f} s)")


@click.group("cache")
def cache_group():
    """The LLM call cache under $MSM_HOME/cache."""


@cache_group.command("stats")
def stats():
    """Calls, errors, tokens and cost per backend, model and purpose."""
    from msm.llm.select import default_cache

    cache = default_cache()
    s = cache.stats()
    click.echo(f"cache: {cache.root}  files: {s['files']}  size: {s['bytes'] / 2**20:.2f} MiB")
    click.echo(f"calls: {s['calls']}  errors: {s['errors']}  cost: ${s['cost_usd']:.4f}")
    if s["by"]:
        click.echo(f"{'BACKEND':<10} {'MODEL':<28} {'PURPOSE':<10} {'CALLS':>7} {'ERRORS':>6} {'IN_TOK':>10} "
                   f"{'OUT_TOK':>9} {'CACHE_RD':>9} {'COST_USD':>9}")
        for row in s["by"]:
            click.echo(f"{row['backend']:<10} {row['model'][:28]:<28} {row['purpose']:<10} {row['calls']:>7} "
                       f"{row['errors']:>6} {row['input_tokens']:>10} {row['output_tokens']:>9} "
                       f"{row['cache_read_tokens']:>9} {row['cost_usd']:>9.4f}")
    cache.close()


def parse_age(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not m:
        raise click.BadParameter(f"'{text}' is not an age like 30d, 12h, 45m or 10s", param_hint="--older-than")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@cache_group.command("prune")
@click.option("--older-than", default=None, help="Drop entries older than this (30d, 12h, 45m, 10s).")
@click.option("--errors", is_flag=True, help="Drop stored errors (answers are kept).")
def prune(older_than, errors):
    """Drop old entries or stored errors."""
    from msm.llm.select import default_cache

    if older_than is None and not errors:
        raise click.UsageError("say what to prune: --older-than AGE and/or --errors")
    age = parse_age(older_than) if older_than else None
    cache = default_cache()
    removed = cache.prune(older_than_s=age, errors=errors)
    cache.close()
    click.echo(f"removed {removed} entr{'y' if removed == 1 else 'ies'}")


@llm_group.command("simulate")
@click.option("--port", type=int, required=True, help="Port to listen on; 0 picks a free one.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--time-scale", type=float, default=1.0, show_default=True,
              help="Run the simulated clock this many times faster (latency, rate-limit minutes, batch processing).")
@click.option("--seed", type=int, default=None, help="Answers are a function of (seed, prompt); default from the config.")
@click.option("--config", "config_file", default=None,
              help="A YAML file overriding keys of msm/llm/simulator.yaml (limits, lengths, rates).")
def simulate(port, host, time_scale, seed, config_file):
    """Serve a simulated frontier model (Anthropic Messages and Batches, OpenAI chat) until Ctrl-C,
    to rehearse a paper-scale build on this machine with no key and no spend."""
    import errno

    from msm.llm.simulator import Simulator

    if not 0 <= port <= 65535:
        raise MsmError(f"--port {port} is not a port number", "use 0 to 65535 (0 picks a free one)")
    if time_scale <= 0:
        raise MsmError(f"--time-scale {time_scale} must be above 0", "use 1 for real time, 60 for a minute a second")
    try:
        sim = Simulator(time_scale=time_scale, seed=seed, config_file=config_file, host=host, port=port)
    except FileNotFoundError:
        raise MsmError(f"simulator config {config_file} does not exist", "give a YAML file with simulator.yaml's keys") from None
    except ValueError as exc:
        raise MsmError(f"simulator config {config_file}: {exc}", "use the keys and shapes of msm/llm/simulator.yaml") from None
    try:
        sim.start()
    except OSError as exc:
        sim.stop()
        if exc.errno == errno.EADDRINUSE:
            raise MsmError(f"port {port} on {host} is in use", "choose another --port, or 0 for a free one") from None
        raise MsmError(f"cannot listen on {host}:{port}: {exc.strerror}", "check --host and --port") from None
    url = sim.url
    click.echo(f"simulated frontier model at {url}  (time scale {time_scale:g}, seed {sim.writer.seed})")
    click.echo("point msm at it (no key is needed; any name works as --model):")
    click.echo("  export MSM_NO_SPEND=1 ANTHROPIC_API_KEY=simulated")
    click.echo(f"  msm corpus build ... --backend anthropic --base-url {url}")
    click.echo(f"  msm corpus build ... --backend openai --base-url {url}/v1 --model simulated")
    click.echo(f"billed totals: curl {url}/_stats   stop: Ctrl-C")
    try:
        sim.stopping.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
