"""What `msm experiment run --plan` projects for each step: tokens, USD and device hours.

Money comes from the backends' price table (msm/llm/prices.yaml) through the corpus stage's own
estimate; compute comes from the throughput model in msm/throughput.yaml (FLOPs per token over a
sustained device rate). A step already done reports what it measured instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from msm.errors import MsmError


@dataclass
class Estimate:
    tokens: int = 0  # corpus: kept tokens; train: tokens trained on; eval: tokens read and written
    cost_usd: float = 0.0  # an upper bound (a corpus: every call at its max_tokens, capped by max_cost)
    hours: float = 0.0  # on the experiment's device
    note: str = ""
    expected_usd: float | None = None  # a corpus: from corpus/cost_model.yaml's assumptions


@lru_cache(maxsize=1)
def throughput() -> dict:
    with open(Path(__file__).with_name("throughput.yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def device(name: str) -> dict:
    devices = throughput()["devices"]
    if name not in devices:
        raise MsmError(f"unknown device '{name}' in the experiment", f"use one of {sorted(devices)} "
                       "(msm/throughput.yaml)")
    return devices[name]


def parameters(model: str) -> float:
    """A model's parameter count: msm/throughput.yaml, msm/models.yaml, else the size in its name."""
    table = throughput()["parameters"]
    if model in table:
        return float(table[model])
    from msm.models import registry

    entry = registry().get("models", {}).get(model, {})
    text = str(entry.get("parameters") or Path(model).name)
    m = re.search(r"(\d+(?:\.\d+)?)\s*([BM])\b", text, re.I)
    if not m:
        raise MsmError(f"no parameter count for '{model}'", "add it under parameters: in msm/throughput.yaml")
    return float(m.group(1)) * (1e9 if m.group(2).upper() == "B" else 1e6)


def _hours(flops: float, rate_tflops: float) -> float:
    return flops / (rate_tflops * 1e12) / 3600


def corpus(step, exp) -> Estimate:
    """Planned and expected documents, kept tokens (and the counter that will count them), and USD
    expected and as an upper bound; a max_cost below the expected cost is flagged (the step refuses it)."""
    from corpus.api import estimate

    opts = dict(step.inputs["options"])
    conditions = tuple(step.inputs.get("conditions", ()))
    est = estimate(str(step.work["spec"]), docs=opts.get("docs") if opts.get("tokens") is None else None,
                   tokens=opts.get("tokens"), backend=opts.get("backend"), model=opts.get("model"),
                   base_url=opts.get("base_url"), batch=bool(opts.get("batch")), genres=opts.get("genres"),
                   audiences=opts.get("audiences"), variables=opts.get("variables"), conditions=conditions,
                   judge=opts.get("judge"), revise=bool(opts.get("revise")), doc_words=opts.get("doc_words"),
                   plan_mode=opts.get("plan_mode") or "cells", max_tokens=opts.get("max_tokens"),
                   prompt_style=opts.get("prompt_style"), tokenizer=opts.get("tokenizer"))
    hours = 0.0
    if est["backend"] == "local":  # the local model writes on the experiment's device
        n = parameters(est["model"])
        hours = _hours(2 * n * est["output_tokens"], device(exp.device)["decode_tflops"])
    note = (f"{est['docs']:,} documents planned, ~{est['kept_docs']:,} kept, by {est['backend']}:{est['model']}; "
            f"tokens counted by {est['counter']}; "
            f"${est['expected_usd']:,.0f} expected, ${est['cost_usd']:,.0f} upper bound")
    max_cost = opts.get("max_cost")
    if max_cost is not None:
        note += f"; max_cost ${max_cost:,.0f}" + (" BELOW THE EXPECTED COST: the step will refuse it"
                                                 if max_cost < est["expected_usd"] else "")
    upper = est["cost_usd"] if max_cost is None else min(est["cost_usd"], float(max_cost))
    return Estimate(est["tokens"], upper, hours, note, expected_usd=est["expected_usd"])


def demos(step, exp) -> Estimate:
    from msm.llm.pricing import load_prices
    from msm.llm.select import choose, make_backend
    from msm.llm.types import Usage

    opts = step.inputs["options"]
    sizes = throughput()["sizes"]
    n = int(opts["n"])
    if opts.get("from_preferences"):
        return Estimate(n * sizes["tokens_per_demo"]["preferences"], 0.0, 0.0, f"{n:,} from the spec's preferences")
    backend, model, base_url = choose(opts.get("backend"), opts.get("model"), opts.get("base_url"))
    if model is None:
        model = make_backend(backend, None, base_url)[0].default_model
    calls = n * sizes["demo_calls_per_kept"]
    reasoning = 2 if opts.get("cot") else 1  # written with reasoning: about twice the answer (an upper bound)
    usage = Usage(input_tokens=int(calls * sizes["demo_call_tokens"]["input"]),
                  output_tokens=int(calls * sizes["demo_call_tokens"]["output"] * reasoning))
    cost = load_prices().cost(backend, model, usage, batch=bool(opts.get("batch")))
    hours = 0.0
    if backend == "local":
        hours = _hours(2 * parameters(model) * usage.output_tokens, device(exp.device)["decode_tflops"])
    expected = _expected_demos(step, opts, backend, model, n)
    return Estimate(n * sizes["tokens_per_demo"]["written"] * reasoning, cost, hours,
                    f"{n:,} written by {backend}:{model}" + (" with reasoning" if reasoning > 1 else "")
                    + (f"; expected ${expected:,.2f}" if expected is not None else ""), expected_usd=expected)


def _expected_demos(step, opts: dict, backend: str, model: str, n: int) -> float | None:
    """The expected USD of a written demo set (corpus/cost_model.yaml `demos:`), or None for a local model."""
    if backend == "local":
        return None
    from corpus.api import expected_demos_cost

    return expected_demos_cost(str(step.work["spec"]), n, backend, model, cot=bool(opts.get("cot")),
                               domains=int(opts.get("domains") or 8), behaviors_only=bool(opts.get("behaviors_only")),
                               style=opts.get("style"), batch=bool(opts.get("batch")),
                               variables=opts.get("variables"))


def train(step, exp, upstream: dict) -> Estimate:
    """Tokens per stage: its data (the corpus's tokens, demos x tokens per demo) times epochs,
    cut by max_steps x batch x grad_accum x max_len when that is smaller."""
    config = step.inputs["config"]
    n = parameters(config["base_model"])
    per_token = 6 if config["adapter"]["kind"] == "full" else 4
    sizes = throughput()["sizes"]
    total = 0
    parts = []
    for stage in config["stages"]:
        if stage["kind"] == "midtrain":
            data = upstream.get("corpus", 0)
        else:
            demo_opts = upstream.get("demo_options", {})
            kind = "preferences" if demo_opts.get("from_preferences") else "written"
            data = int(demo_opts.get("n", 0)) * sizes["tokens_per_demo"][kind] * (2 if stage.get("cot") else 1)
        tokens = data * stage["epochs"]
        if stage.get("max_steps"):
            tokens = min(tokens, stage["max_steps"] * stage["batch_size"] * stage["grad_accum"] * stage["max_len"])
        total += tokens
        parts.append(f"{stage['name']} {tokens:,}")
    hours = _hours(per_token * n * total, device(exp.device)["train_tflops"])
    return Estimate(total, 0.0, hours, ", ".join(parts) + f" tokens on {config['base_model']}")


def evaluation(step, exp, model_name: str) -> Estimate:
    from eval.api import count_items, suite_options

    spec = exp.evals[step.eval]
    options = suite_options(spec.suite, spec.options)
    sizes = throughput()["sizes"]
    rate = device(exp.device)
    n = parameters(model_name)
    items = count_items(spec.suite, spec.items, spec.target, spec.limit, spec.options)
    prompt = sizes["prompt_tokens"].get(spec.suite, 200)
    if spec.suite == "preferences" and (spec.mode or "logprob") == "logprob":
        read, written = items * 2 * prompt, 0  # both orders, one pass each
    else:
        written = items * int(options.get("max_tokens") or sizes["answer_tokens"].get(spec.suite, 512))
        read = items * prompt
    hours = _hours(2 * n * read, rate["prefill_tflops"]) + _hours(2 * n * written, rate["decode_tflops"])
    cost = 0.0
    graded = spec.judge and spec.suite in ("agentic", "spec_qa")
    if graded:
        from msm.llm.pricing import load_prices
        from msm.llm.types import Usage

        usage = Usage(input_tokens=items * sizes["grader_tokens"]["input"],
                      output_tokens=items * sizes["grader_tokens"]["output"])
        cost = load_prices().cost(spec.judge.get("backend", "anthropic"), spec.judge.get("model", ""), usage)
    sampling = (f" at temperature {options['temperature']:g}, <= {options['max_tokens']:,} tokens"
                if "temperature" in options and "max_tokens" in options else "")
    return Estimate(read + written, cost, hours,
                    f"{items:,} samples{sampling}" + (" + grader calls" if graded else ""))


def _with_tokens(step, tokens: int):
    import dataclasses

    options = {**step.inputs["options"], "tokens": tokens, "docs": None}
    return dataclasses.replace(step, inputs={**step.inputs, "options": options})


def estimate_steps(exp, steps: list) -> dict:
    """key -> Estimate for every step, upstream figures flowing into the steps that use them."""
    out: dict = {}
    corpus_tokens: dict = {}
    for step in steps:
        if step.kind in ("corpus", "ablation"):
            if step.work.get("match"):  # as many tokens as the reference corpus
                step = _with_tokens(step, corpus_tokens[(step.work["match"], None)])
            e = corpus(step, exp)
            if step.kind == "ablation":
                each = e.tokens // max(1, len(step.inputs["conditions"]))
                corpus_tokens.update({(step.key, c): each for c in step.inputs["conditions"]})
            corpus_tokens[(step.key, None)] = e.tokens if step.kind == "corpus" else 0
        elif step.kind == "demos":
            e = demos(step, exp)
        elif step.kind == "train":
            demo_step = next((s for s in steps if s.key == step.work["demos"]), None)
            upstream = {"corpus": corpus_tokens.get((step.work["corpus"], step.work["condition"]), 0),
                        "demo_options": demo_step.inputs["options"] if demo_step else {}}
            e = train(step, exp, upstream)
        else:
            model = exp.base_model
            if step.needs:
                model = next(s for s in steps if s.key == step.needs[0]).inputs["config"]["base_model"]
            e = evaluation(step, exp, model)
        out[step.key] = e
    return out
