"""A simulated frontier model API, so a paper-scale build can be rehearsed on a CPU with no key.

`Simulator` is the loopback server (msm.llm.testing) made faithful at scale: answers of realistic
length per purpose (msm.llm.simulated_text), max_tokens cuts as the API makes them, usage and
cache tokens from one count, per-model rate limits (429 with retry-after), and the Message
Batches API with its request and size limits, processing time and failed items. Every number is
pinned in simulator.yaml; `time_scale` runs its clock faster (a minute lasts 60 / time_scale s).
The real `anthropic` and `openai` SDKs talk to it over HTTP: `msm llm simulate` serves it.
"""

from __future__ import annotations

import copy
import json
import hashlib
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from msm.llm.simulated_text import Writer
from msm.llm.testing import LoopbackProcess, LoopbackServer, _anthropic_prompt, _Handler, _QuietServer

CONFIG = Path(__file__).with_name("simulator.yaml")
BILLED = ("requests", "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def load_config(overrides: dict | None = None, path: str | Path | None = None) -> dict:
    """simulator.yaml, then a YAML file's keys, then `overrides` (nested dicts merge key by key)."""
    config = yaml.safe_load(CONFIG.read_text())
    try:
        layers = [yaml.safe_load(Path(path).read_text()) if path else None, overrides]
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML ({str(exc).splitlines()[0]})") from None
    for layer in layers:
        if layer is not None and not isinstance(layer, dict):
            raise ValueError("a simulator config must be a mapping of simulator.yaml's keys")
        _merge(config, layer or {})
    return config


def _merge(base: dict, layer: dict, where: str = "") -> None:
    for key, value in layer.items():
        if key not in base:
            raise ValueError(f"unknown simulator setting '{where}{key}'")
        if isinstance(base[key], dict) and isinstance(value, dict) and key != "pass_rates":
            _merge(base[key], value, f"{where}{key}.")
        elif isinstance(base[key], dict) and isinstance(value, dict):
            base[key].update(value)
        else:
            base[key] = value


class RateLimits:
    """Token buckets per model, as the API enforces RPM, ITPM and OTPM: capacity refills continuously,
    a request is admitted when every bucket holds what it needs, otherwise it waits (429)."""

    def __init__(self, config: dict, time_scale: float):
        self.caps = {"requests": config["requests_per_minute"], "input_tokens": config["input_tokens_per_minute"],
                     "output_tokens": config["output_tokens_per_minute"]}
        self.per_s = {k: v / 60 * time_scale for k, v in self.caps.items()}
        self.levels: dict[str, dict[str, float]] = {}
        self.stamps: dict[str, float] = {}
        self.lock = threading.Lock()

    def _refill(self, model: str) -> dict[str, float]:
        now = time.monotonic()
        levels = self.levels.setdefault(model, dict(self.caps))
        elapsed = now - self.stamps.get(model, now)
        self.stamps[model] = now
        for k in levels:
            levels[k] = min(self.caps[k], levels[k] + elapsed * self.per_s[k])
        return levels

    def take(self, model: str, needs: dict[str, int]) -> tuple[float, str | None]:
        """(0, None) when admitted (and charged); else (seconds until it would be, the limit hit)."""
        with self.lock:
            levels = self._refill(model)
            short = {k: (min(n, self.caps[k]) - levels[k]) / self.per_s[k] for k, n in needs.items()
                     if levels[k] < min(n, self.caps[k])}
            if short:
                limit = max(short, key=short.get)
                return short[limit], limit
            for k, n in needs.items():
                levels[k] -= n
            return 0.0, None

    def give_back(self, model: str, kind: str, n: int) -> None:
        with self.lock:
            levels = self._refill(model)
            levels[kind] = min(self.caps[kind], levels[kind] + n)

    def headers(self, model: str) -> dict[str, str]:
        with self.lock:
            levels = self._refill(model)
        names = {"requests": "requests", "input_tokens": "input-tokens", "output_tokens": "output-tokens"}
        out = {}
        for k, name in names.items():
            out[f"anthropic-ratelimit-{name}-limit"] = str(self.caps[k])
            out[f"anthropic-ratelimit-{name}-remaining"] = str(max(0, int(levels[k])))
        return out


class Simulator(LoopbackServer):
    """`with Simulator(time_scale=60) as sim:` then point a client at `sim.url`; `sim.stats_payload()`."""

    def __init__(self, time_scale: float = 1.0, seed: int | None = None, config_overrides: dict | None = None,
                 config_file: str | Path | None = None, host: str = "127.0.0.1", port: int = 0):
        config = load_config(config_overrides, config_file)
        self.config = config
        seed = config["seed"] if seed is None else seed
        super().__init__(seed=seed, min_cache_tokens=config["prompt_cache"]["min_tokens"])
        if time_scale <= 0:
            raise ValueError("time_scale must be above 0")
        self.time_scale = time_scale
        self.host, self.port = host, port
        self.writer = Writer(config, seed)
        self.limits = RateLimits(config["rate_limits"], time_scale)
        per_minute = config["batches"]["endpoint_requests_per_minute"]  # one bucket for every batch endpoint
        self.batch_limits = RateLimits({"requests_per_minute": per_minute, "input_tokens_per_minute": 1,
                                        "output_tokens_per_minute": 1}, time_scale)
        self.billing: dict[tuple[str, str], Counter] = defaultdict(Counter)  # (model, channel) -> totals
        self.purposes: Counter = Counter()
        self.events: Counter = Counter()  # truncated, rate_limited, batch item fates
        self.asked: Counter = Counter()  # prompt digest -> times answered (a repeat is sampled again)
        self.spool = Path(tempfile.mkdtemp(prefix="msm-simulator-"))
        self.local = threading.local()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Simulator":
        handler = type("Handler", (_SimHandler,), {"server_ref": self})
        self.httpd = _QuietServer((self.host, self.port), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.spool, ignore_errors=True)

    @property
    def url(self) -> str:
        assert self.httpd, "server not started"
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.httpd.server_address[1]}"

    def wait(self, seconds: float) -> None:
        """Sleep simulated seconds (seconds / time_scale of real time), cut short when stopping."""
        if seconds > 0:
            self.stopping.wait(seconds / self.time_scale)

    # ---- answers ---------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return self.writer.count(text)

    def cache_usage(self, model: str, prefix: str) -> tuple[int, int]:
        tokens = self.count_tokens(prefix)
        if not prefix or tokens < self.min_cache_tokens:
            return 0, 0
        key = f"{model}\n{hash(prefix)}"
        with self.lock:
            if key in self.prefix_cache:
                return 0, tokens
            self.prefix_cache.add(key)
        return tokens, 0

    def answer(self, prompt: str, max_tokens: int, stop: list[str], forced: str | None = None) -> tuple[str, str, str | None]:
        """(text, stop reason, stop sequence): the purpose's whole answer, cut at max_tokens as the API cuts."""
        if forced == "refusal" or "[refuse]" in prompt:
            return "", "refusal", None
        sample = 0
        if self.config["sampling"]["repeats_vary"]:
            digest = hashlib.sha256(prompt.encode()).hexdigest()
            with self.lock:
                sample = self.asked[digest]
                self.asked[digest] += 1
        purpose, text = self.writer.compose(prompt, sample)
        reason = "end_turn"
        if self.count_tokens(text) > max_tokens:
            text, reason = self.writer.cut(text, max_tokens), "max_tokens"
        matched = next((s for s in stop if s and s in text), None)
        if matched:
            text, reason = text[: text.index(matched)], "stop_sequence"
        with self.lock:
            self.purposes[purpose] += 1
            self.events["truncated"] += reason == "max_tokens"
        self.local.text = text
        return text, reason, matched

    def message(self, body: dict, channel: str, forced: str | None = None) -> tuple[dict, str]:
        """A Messages API answer and its prompt; billed to (model, channel)."""
        prefix, rest, convo = _anthropic_prompt(body)
        write, read = self.cache_usage(body["model"], prefix)
        uncached = self.count_tokens(rest + convo) + (0 if (write or read) else self.count_tokens(prefix))
        text, reason, matched = self.answer(prefix + rest + convo, body["max_tokens"], body.get("stop_sequences") or [], forced)
        usage = {"input_tokens": uncached, "output_tokens": self.count_tokens(text),
                 "cache_creation_input_tokens": write, "cache_read_input_tokens": read}
        self.bill(channel, body["model"], usage, "")
        return {"id": f"msg_{uuid.uuid4().hex[:20]}", "type": "message", "role": "assistant", "model": body["model"],
                "content": [{"type": "text", "text": text}] if text else [], "stop_reason": reason,
                "stop_sequence": matched, "usage": usage}, prefix + rest + convo

    def input_tokens(self, body: dict) -> int:
        """What a request counts toward ITPM before it runs: cache reads excluded for current models."""
        prefix, rest, convo = _anthropic_prompt(body)
        n = self.count_tokens(rest + convo)
        key = f"{body['model']}\n{hash(prefix)}"
        cached = prefix and self.count_tokens(prefix) >= self.min_cache_tokens and key in self.prefix_cache
        return n + (0 if cached and not self.config["rate_limits"]["cache_reads_count"] else self.count_tokens(prefix))

    def bill(self, channel: str, model: str, usage: dict, prompt: str) -> None:
        if "prompt_tokens" in usage:  # an OpenAI-style usage
            usage = {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}
        with self.lock:
            totals = self.billing[(model, channel)]
            totals["requests"] += 1
            for k, v in usage.items():
                totals[k] += v

    def record_answer(self, prompt: str) -> None:
        """Counted, not kept per prompt: at paper scale that table would be hundreds of thousands long."""
        with self.lock:
            self.stats.answered["total"] += 1

    # ---- batches ---------------------------------------------------------------------------
    def submit_batch(self, requests: list[dict]) -> dict:
        """A batch: processed in the background into a JSONL file, ended after its drawn processing time."""
        cfg = self.config["batches"]
        with self.lock:
            minutes = cfg["processing_median_min"] * math.exp(cfg["processing_sigma"] * self.rng.gauss(0, 1))
            fates = [self.rng.random() for _ in requests]
        batch_id = f"msgbatch_{uuid.uuid4().hex[:24]}"
        now = time.time()
        batch = {"id": batch_id, "t0": time.monotonic(), "created": now, "done": threading.Event(),
                 "duration": min(minutes, cfg["expires_after_h"] * 60) * 60 / self.time_scale,
                 "counts": Counter(), "n": len(requests), "path": self.spool / f"{batch_id}.jsonl"}
        with self.lock:
            self.batches[batch_id] = batch
            self.stats.batches_created += 1
        threading.Thread(target=self._process, args=(batch, requests, fates), daemon=True).start()
        return batch

    def _process(self, batch: dict, requests: list[dict], fates: list[float]) -> None:
        cfg = self.config["batches"]
        with open(batch["path"], "w") as out:
            for item, fate in zip(requests, fates):
                if fate < cfg["item_errored_rate"]:
                    result = {"type": "errored", "error": {"type": "error", "error": {"type": "api_error",
                                                                                      "message": "Internal server error"}}}
                elif fate < cfg["item_errored_rate"] + cfg["item_expired_rate"]:
                    result = {"type": "expired"}
                else:
                    message, _ = self.message(item["params"], "batch")
                    result = {"type": "succeeded", "message": message}
                batch["counts"][result["type"]] += 1
                out.write(json.dumps({"custom_id": item["custom_id"], "result": result}) + "\n")
        with self.lock:
            for kind in ("errored", "expired", "succeeded"):
                self.events[f"batch_{kind}"] += batch["counts"][kind]
        batch["done"].set()

    def batch_ended(self, batch: dict) -> bool:
        return batch["done"].is_set() and time.monotonic() - batch["t0"] >= batch["duration"]

    def queue(self) -> tuple[int, float]:
        """(requests in batches still in progress, real seconds until the first of them ends)."""
        with self.lock:
            open_ = [b for b in self.batches.values() if not self.batch_ended(b)]
        now = time.monotonic()
        soonest = min((b["t0"] + b["duration"] - now for b in open_), default=0.0)
        return sum(b["n"] for b in open_), max(soonest, 0.0)

    # ---- stats -----------------------------------------------------------------------------
    def stats_payload(self) -> dict:
        """Counters and billed totals (per model and channel: "messages", "batch", "chat")."""
        with self.lock:
            billing: dict = defaultdict(dict)
            for (model, channel), totals in self.billing.items():
                billing[model][channel] = {k: totals[k] for k in BILLED}
            return {"requests": dict(self.stats.requests), "faults": dict(self.stats.faults),
                    "answered": self.stats.answered["total"], "batches_created": self.stats.batches_created,
                    "billing": dict(billing), "purposes": dict(self.purposes), "events": dict(self.events),
                    "batch_items": sum(b["n"] for b in self.batches.values()), "time_scale": self.time_scale}


class _Paced:
    """A write-through file that waits `gap` simulated seconds before each write: a streamed answer
    arrives at the model's output speed instead of all at once."""

    def __init__(self, raw, sim: Simulator, gap: float):
        self.raw, self.sim, self.gap = raw, sim, gap

    def write(self, data: bytes) -> int:
        self.sim.wait(self.gap)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


class _SimHandler(_Handler):
    server_ref: Simulator

    def _limited(self, model: str, input_tokens: int, max_tokens: int, openai: bool) -> bool:
        """Charge the rate limits; True (answered 429) when a bucket is short."""
        srv = self.server_ref
        wait, limit = srv.limits.take(model, {"requests": 1, "input_tokens": input_tokens, "output_tokens": max_tokens})
        if not limit:
            return False
        with srv.lock:
            srv.events["rate_limited"] += 1
            srv.events[f"rate_limited_{limit}"] += 1
        headers = {"retry-after": f"{max(wait, 0.001):.3f}", **srv.limits.headers(model)}
        self._error(429, "rate_limit_error", f"This request would exceed the rate limit for your organization of "
                    f"{srv.limits.caps[limit]:,} {limit.replace('_', ' ')} per minute", headers, openai)
        return True

    def _messages(self, body: dict) -> None:
        srv = self.server_ref
        model, max_tokens = body.get("model"), body.get("max_tokens")
        if model and isinstance(max_tokens, int) and max_tokens >= 1:
            if self._limited(model, srv.input_tokens(body), max_tokens, openai=False):
                srv.stats.requests["messages"] += 1
                return
        self.streaming = bool(body.get("stream"))
        super()._messages(body)

    def _message_payload(self, body: dict, forced: str | None = None) -> tuple[dict, str]:
        srv = self.server_ref
        message, prompt = srv.message(body, "messages", forced)
        out = message["usage"]["output_tokens"]
        srv.limits.give_back(body["model"], "output_tokens", body["max_tokens"] - out)  # OTPM: estimate corrected
        latency = srv.config["latency"]
        srv.wait(latency["first_token_s"] + (0 if getattr(self, "streaming", False) else out / latency["output_tokens_per_s"]))
        self.writing_s = out / latency["output_tokens_per_s"]
        return message, prompt

    def _stream_message(self, message: dict, *args, **kwargs):
        text = message["content"][0]["text"] if message["content"] else ""
        return self._paced(super()._stream_message, math.ceil(len(text) / 64) + 6, message, *args, **kwargs)

    def _paced(self, send, writes: int, *args, **kwargs):
        raw = self.wfile
        self.wfile = _Paced(raw, self.server_ref, getattr(self, "writing_s", 0.0) / max(1, writes))
        try:
            return send(*args, **kwargs)
        finally:
            self.wfile = raw

    def _chat(self, body: dict) -> None:
        srv = self.server_ref
        model = body.get("model")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in body.get("messages", []))
        if model and max_tokens >= 1 and self._limited(model, srv.count_tokens(prompt), max_tokens, openai=True):
            srv.stats.requests["chat"] += 1
            return
        srv.local.text = None
        self.writing_s = 0.0
        srv.wait(srv.config["latency"]["first_token_s"])
        super()._chat(body) if not body.get("stream") else self._paced_chat(body, srv)
        if srv.local.text is not None and model:
            out = srv.count_tokens(srv.local.text)
            srv.limits.give_back(model, "output_tokens", max_tokens - out)
            srv.bill("chat", model, {"input_tokens": srv.count_tokens(prompt), "output_tokens": out}, prompt)

    def _paced_chat(self, body: dict, srv: Simulator) -> None:
        """A streamed chat answer at the model's output speed: the answer is composed first (cached per
        thread) to know its length, then written word by word with the gaps that length implies."""
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in body.get("messages", []))
        text = srv.writer.compose(prompt)[1]
        out = min(max_tokens, srv.count_tokens(text))
        self.writing_s = out / srv.config["latency"]["output_tokens_per_s"]
        self._paced(super()._chat, len(text.split()) + 4, body)

    def _batch_endpoint_limited(self) -> bool:
        """Charge the batch endpoints' shared requests-per-minute bucket; True (answered 429) when empty."""
        srv = self.server_ref
        wait, limit = srv.batch_limits.take("batches", {"requests": 1})
        if not limit:
            return False
        with srv.lock:
            srv.events["rate_limited_batch_endpoints"] += 1
        self._error(429, "rate_limit_error", f"This request would exceed the rate limit for your organization of "
                    f"{srv.batch_limits.caps['requests']:,} Message Batches API requests per minute",
                    {"retry-after": f"{max(wait, 0.001):.3f}"}, False)
        return True

    def _find_batch(self, batch_id: str, route: str) -> dict | None:
        if self._batch_endpoint_limited():
            self.server_ref.stats.requests[route] += 1
            return None
        return super()._find_batch(batch_id, route)

    def _batch_create(self, body: dict) -> None:
        srv = self.server_ref
        cfg = srv.config["batches"]
        srv.stats.requests["batch_create"] += 1
        if not self._authorized(openai=False) or self._batch_endpoint_limited():
            return
        size = int(self.headers.get("Content-Length") or 0)
        if size > cfg["max_bytes"]:
            self._error(cfg["too_large_status"], cfg["too_large_type"],
                        f"Request exceeds the maximum allowed number of bytes ({cfg['max_bytes']:,}) for a message batch")
            return
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests or len(requests) > cfg["max_requests"]:
            self._error(cfg["too_many_status"], cfg["too_many_type"],
                        f"requests: a message batch holds 1 to {cfg['max_requests']:,} requests, "
                        f"got {len(requests) if isinstance(requests, list) else 0:,}")
            return
        queued, soonest = srv.queue()
        if queued + len(requests) > cfg["queue_max_requests"]:
            with srv.lock:
                srv.events["rate_limited_batch_queue"] += 1
            wait = max(soonest, 0.001)
            self._error(429, "rate_limit_error", f"This batch's {len(requests):,} requests would take the batch "
                        f"requests waiting or in progress ({queued:,}) past your organization's limit of "
                        f"{cfg['queue_max_requests']:,}", {"retry-after": f"{wait:.3f}"}, False)
            return
        self._send(200, self._batch_view(srv.submit_batch(requests)))

    def _batch_view(self, batch: dict) -> dict:
        srv = self.server_ref
        ended = srv.batch_ended(batch)
        counts = batch["counts"]
        stamp = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
        return {"id": batch["id"], "type": "message_batch", "processing_status": "ended" if ended else "in_progress",
                "request_counts": {"processing": 0 if ended else batch["n"],
                                   "succeeded": counts["succeeded"] if ended else 0,
                                   "errored": counts["errored"] if ended else 0, "canceled": 0,
                                   "expired": counts["expired"] if ended else 0},
                "created_at": stamp(batch["created"]),
                "expires_at": stamp(batch["created"] + srv.config["batches"]["expires_after_h"] * 3600),
                "ended_at": stamp(time.time()) if ended else None, "archived_at": None, "cancel_initiated_at": None,
                "results_url": f"{srv.url}/v1/messages/batches/{batch['id']}/results" if ended else None}

    def _batch_results(self, batch_id: str) -> None:
        if (batch := self._find_batch(batch_id, "batch_results")) is None:
            return
        if not self.server_ref.batch_ended(batch):
            self._error(400, "invalid_request_error", f"batch {batch_id} is still in progress; its results are not ready")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/binary")
        self.send_header("Content-Length", str(os.path.getsize(batch["path"])))
        self.end_headers()
        with open(batch["path"], "rb") as f:
            shutil.copyfileobj(f, self.wfile, 1 << 20)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.split("?")[0] == "/_stats":
            self._send(200, self.server_ref.stats_payload())
        else:
            super().do_GET()


class SimulatorProcess(LoopbackProcess):
    """The simulator in a process of its own, so its GIL never slows the build it serves.

    `with SimulatorProcess(time_scale=600, config_overrides={...}) as sim:` gives `sim.url` and
    `sim.stats()` (the /_stats payload: billed tokens per model and channel, purposes, events).
    """

    def __init__(self, **simulator_kwargs):
        super().__init__(**copy.deepcopy(simulator_kwargs))


def _serve(kwargs: dict, ready) -> None:
    """A SimulatorProcess child: serve until terminated."""
    try:
        sim = Simulator(**kwargs).start()
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
        ready.put(exc)
        return
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sim.stopping.set())  # terminate(): stop cleanly, spool removed
    ready.put(sim.url)
    parent = os.getppid()
    try:  # a parent killed outright (SIGKILL, or SIGTERM before its exit handlers) leaves no one to stop it
        while not sim.stopping.wait(1.0):
            if os.getppid() != parent:
                break
    finally:
        sim.stop()


SimulatorProcess.serve = staticmethod(_serve)  # LoopbackProcess starts the child with it
