"""transformers on CPU or GPU: batched, left-padded, length-sorted generation, and prefix-shared scoring."""

from __future__ import annotations

import asyncio
import threading
import time

from msm.llm.base import Backend, Score, ScoreItem
from msm.llm.types import Request, Response, Usage


_LOADED: dict[tuple[str, str], tuple] = {}  # (model, device) -> (model, tokenizer), one load per process


class LocalBackend(Backend):
    name = "local"
    batched = True  # the client hands it whole lists, not one request at a time

    def __init__(self, model: str | None = None, batch_size: int = 16, device: str | None = None,
                 loaded=None):
        from msm.models import default_alias

        self.default_model = model or default_alias("causal-lm")
        self.batch_size = batch_size
        self.device = device
        self._loaded = loaded  # (model, tokenizer) for tests that bring their own
        self._lock = threading.Lock()

    # ---- model -------------------------------------------------------------------------
    def load(self, model_name: str):
        with self._lock:
            if self._loaded is None:
                import torch

                from msm.models import load_causal_lm

                device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
                if (model_name, device) not in _LOADED:
                    _LOADED[(model_name, device)] = load_causal_lm(model_name, device=device)
                self._loaded = _LOADED[(model_name, device)]
            model, tokenizer = self._loaded
            tokenizer.padding_side = "left"
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            return model, tokenizer

    def prompt_text(self, tokenizer, request: Request) -> str:
        messages = []
        system = "".join(part for part in (request.system_prefix, request.system) if part)
        if system:
            messages.append({"role": "system", "content": system})
        messages += [{"role": m.role, "content": m.content} for m in request.messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # ---- generation --------------------------------------------------------------------
    async def call(self, request: Request, model: str) -> Response:
        return (await self.call_many([request], model))[0]

    async def call_many(self, requests: list[Request], model: str) -> list[Response]:
        return await asyncio.to_thread(self._generate_all, requests, model)

    def _generate_all(self, requests: list[Request], model_name: str) -> list[Response]:
        model, tokenizer = self.load(model_name)
        prompts = [self.prompt_text(tokenizer, r) for r in requests]
        lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        # Sort by prompt length so each batch pads little; group by generation settings.
        order = sorted(range(len(requests)), key=lambda i: (self._settings(requests[i]), lengths[i]))
        results: list[Response | None] = [None] * len(requests)
        i = 0
        while i < len(order):
            batch = [order[i]]
            while (len(batch) < self.batch_size and i + len(batch) < len(order)
                   and self._settings(requests[order[i + len(batch)]]) == self._settings(requests[order[i]])):
                batch.append(order[i + len(batch)])
            for idx, response in zip(batch, self._generate_batch([requests[j] for j in batch],
                                                                 [prompts[j] for j in batch], model, tokenizer, model_name)):
                results[idx] = response
            i += len(batch)
        return results  # type: ignore[return-value]

    @staticmethod
    def _settings(request: Request) -> tuple:
        """What must match within one generate() call. Seeds need not: a batch samples with one
        generator seeded from its requests' seeds (so per-request seeds never split a batch)."""
        return (request.max_tokens, request.temperature, request.top_p, request.stop)

    def _generate_batch(self, requests, prompts, model, tokenizer, model_name) -> list[Response]:
        import torch

        started = time.monotonic()
        req = requests[0]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        kwargs = {"max_new_tokens": req.max_tokens, "pad_token_id": tokenizer.pad_token_id}
        if req.temperature > 0:
            kwargs.update(do_sample=True, temperature=req.temperature)
            if req.top_p is not None:
                kwargs["top_p"] = req.top_p
        else:
            kwargs["do_sample"] = False
        if req.stop:
            kwargs.update(stop_strings=list(req.stop), tokenizer=tokenizer)
        seeds = [r.seed for r in requests if r.seed is not None]
        if seeds:
            torch.manual_seed(hash(tuple(seeds)) & 0x7FFFFFFF)
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        elapsed = time.monotonic() - started
        eos = set(tokenizer.all_special_ids) & {tokenizer.eos_token_id, tokenizer.pad_token_id}
        responses = []
        for row, attn in zip(new.tolist(), enc["attention_mask"].tolist()):
            generated = []
            ended = False
            for tok in row:
                if tok in eos:
                    ended = True
                    break
                generated.append(tok)
            text = tokenizer.decode(generated, skip_special_tokens=True)
            # Short of max_tokens with no end token means a stop string fired (possibly one that
            # straddles the prompt's end, which transformers also matches).
            reason = "end_turn" if ended else ("max_tokens" if len(generated) >= req.max_tokens else "stop_sequence")
            for s in req.stop:
                if s and s in text:
                    text, reason = text[: text.index(s)], "stop_sequence"
            if reason == "end_turn" and not text.strip():
                reason = "empty"
            usage = Usage(input_tokens=sum(attn), output_tokens=len(generated))
            responses.append(Response(text=text, stop_reason=reason, usage=usage, latency_s=elapsed,
                                      backend=self.name, model=model_name))
        return responses

    # ---- scoring -----------------------------------------------------------------------
    async def score(self, items: list[ScoreItem], model: str) -> list[list[Score]]:
        return await asyncio.to_thread(self._score_all, items, model)

    # A forward pass has a fixed cost of about 55 ms on a 2-core CPU with SmolLM2 (the weights are
    # read once per pass), worth about 40 tokens of compute: a shared prefix shorter than this
    # costs more as an extra pass than it saves (benchmarks/RESULTS.md, eval.py).
    MIN_SHARED_PREFIX = 64

    def _score_all(self, items: list[ScoreItem], model_name: str) -> list[list[Score]]:
        """Consecutive items whose contexts start with the same tokens (one question asked in two
        orders, one prompt with several endings) run that common prefix once."""
        import copy

        import torch

        model, tokenizer = self.load(model_name)
        prepared = [self._prepare(item, tokenizer) for item in items]
        out: list[list[Score]] = []
        i = 0
        while i < len(prepared):
            common, j = prepared[i][0], i + 1
            if j < len(prepared) and _common_prefix(common, prepared[j][0]) >= self.MIN_SHARED_PREFIX:
                common, j = common[:_common_prefix(common, prepared[j][0])], j + 1
                # later items join only if they share all of it: a chain must not shrink to what every
                # prompt shares (the chat template's system prompt)
                while j < len(prepared) and _common_prefix(common, prepared[j][0]) == len(common):
                    j += 1
            if j - i > 1:
                prefix = common[: min(len(common), min(len(p[0]) for p in prepared[i:j]) - 1)]
                with torch.no_grad():
                    cache = model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True,
                                  logits_to_keep=1).past_key_values
                for ctx_ids, cont_ids in prepared[i:j]:
                    out.append(self._score_ids(ctx_ids, cont_ids, model, tokenizer, copy.deepcopy(cache), len(prefix)))
            else:
                out.append(self._score_ids(*prepared[i], model, tokenizer))
            i = j
        return out

    @staticmethod
    def _prepare(item: ScoreItem, tokenizer) -> tuple[list[int], list[list[int]]]:
        context, conts = item.context, list(item.continuations)
        # A trailing space belongs to the continuation, as the tokenizer would merge it there.
        moved = len(context) - len(context.rstrip(" "))
        if moved:
            context, conts = context[: len(context) - moved], [" " * moved + c for c in conts]
        ctx_ids = tokenizer(context, add_special_tokens=False).input_ids
        cont_ids = [tokenizer(c, add_special_tokens=False).input_ids for c in conts]
        if not ctx_ids:
            ctx_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        return ctx_ids, cont_ids

    def _score_one(self, item: ScoreItem, model, tokenizer) -> list[Score]:
        return self._score_ids(*self._prepare(item, tokenizer), model, tokenizer)

    def _score_ids(self, ctx_ids: list[int], cont_ids: list[list[int]], model, tokenizer, cache=None,
                   cached: int = 0) -> list[Score]:
        """One pass over the context (after its first `cached` tokens, whose keys and values `cache`
        holds), then all continuations at once on its KV cache. Only the context's last logit is
        kept (it predicts each continuation's first token)."""
        import torch

        device = model.device
        with torch.no_grad():
            rest_ids = torch.tensor([ctx_ids[cached:]], device=device)
            positions = torch.arange(cached, len(ctx_ids), device=device)[None]
            first = model(input_ids=rest_ids, position_ids=positions, past_key_values=cache, use_cache=True,
                          logits_to_keep=1)
            first_logprobs = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
            width = max((len(c) for c in cont_ids), default=0)
            scores: list[Score] = []
            if width > 1:
                n = len(cont_ids)
                cache = first.past_key_values
                cache.batch_repeat_interleave(n)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
                ids = torch.tensor([c + [pad] * (width - len(c)) for c in cont_ids], device=device)
                mask = torch.tensor([[1] * len(ctx_ids) + [1] * len(c) + [0] * (width - len(c)) for c in cont_ids],
                                    device=device)
                positions = torch.arange(len(ctx_ids), len(ctx_ids) + width, device=device).expand(n, -1)
                rest = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             logits_to_keep=width)
                rest_logprobs = torch.log_softmax(rest.logits.float(), dim=-1)
            for b, cont in enumerate(cont_ids):
                per_token = []
                for j, tok in enumerate(cont):
                    lp = first_logprobs[tok] if j == 0 else rest_logprobs[b, j - 1, tok]
                    per_token.append(float(lp))
                scores.append(Score(sum(per_token), per_token, [tokenizer.decode([t]) for t in cont]))
        return scores


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
