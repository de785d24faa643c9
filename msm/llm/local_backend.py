"""transformers on CPU or GPU: batched, left-padded, length-sorted generation (one prefill for the
samples of one prompt), and prefix-shared, batched scoring."""

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
        """Samples of one prompt (same text, same settings) run as batches of their own on one
        prefill of the prompt; the other requests run length-sorted, so each batch pads little."""
        model, tokenizer = self.load(model_name)
        prompts = [self.prompt_text(tokenizer, r) for r in requests]
        lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        order = sorted(range(len(requests)), key=lambda i: (self._settings(requests[i]), lengths[i], prompts[i]))
        runs: list[list[int]] = []
        for i in order:
            if runs and prompts[runs[-1][0]] == prompts[i] and self._settings(requests[runs[-1][0]]) == \
                    self._settings(requests[i]):
                runs[-1].append(i)
            else:
                runs.append([i])
        batches = [run[k:k + self.batch_size] for run in runs if len(run) > 1
                   for k in range(0, len(run), self.batch_size)]
        singles = [run[0] for run in runs if len(run) == 1]
        i = 0
        while i < len(singles):
            batch = [singles[i]]
            while (len(batch) < self.batch_size and i + len(batch) < len(singles)
                   and self._settings(requests[singles[i + len(batch)]]) == self._settings(requests[singles[i]])):
                batch.append(singles[i + len(batch)])
            batches.append(batch)
            i += len(batch)
        results: list[Response | None] = [None] * len(requests)
        for batch in batches:
            for idx, response in zip(batch, self._generate_batch([requests[j] for j in batch],
                                                                 [prompts[j] for j in batch], model, tokenizer, model_name)):
                results[idx] = response
        return results  # type: ignore[return-value]

    @staticmethod
    def _settings(request: Request) -> tuple:
        """What must match within one generate() call. Seeds need not: a batch samples with one
        generator seeded from its requests' seeds (so per-request seeds never split a batch)."""
        return (request.max_tokens, request.temperature, request.top_p, request.stop)

    def _generate_batch(self, requests, prompts, model, tokenizer, model_name) -> list[Response]:
        import contextlib

        import torch

        from msm.llm.shared_prefix import shareable, shared_prefix_cache, sharing

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
        attention = contextlib.nullcontext()
        if len(prompts) > 1 and len(set(prompts)) == 1 and enc["input_ids"].shape[1] > 1:
            # one prompt, many samples: its KV cache is computed once; every row attends to that one
            # copy (msm.llm.shared_prefix), or to its own copy where the model's layers are not plain
            with torch.no_grad():
                cache = model(input_ids=enc["input_ids"][:1, :-1], use_cache=True, logits_to_keep=1).cache
            if shareable(cache):
                cache = shared_prefix_cache(cache)
                attention = sharing(model, cache)
            else:
                cache.batch_repeat_interleave(len(prompts))
            kwargs["cache"] = cache
        with torch.no_grad(), attention:
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
    # read once per pass), worth about 40 tokens of compute: a prefix that only a few neighbouring
    # items share is worth its own pass from this length on (benchmarks/RESULTS.md, eval.py).
    MIN_SHARED_PREFIX = 64
    # The prefix every item of a call shares (chat template, system prompt) runs once per call, so
    # even a short one pays.
    MIN_CALL_PREFIX = 8
    # Rows of one scoring pass, in padded tokens: on that CPU four 133-token rows in one pass cost
    # about 20% less per row than one at a time; at sixteen rows the gain is gone.
    SCORE_BATCH_TOKENS = 640
    SCORE_BATCH_ROWS = 8

    def _score_all(self, items: list[ScoreItem], model_name: str) -> list[list[Score]]:
        """Each group of items runs the prefix its contexts share once, then the rest of every
        context in length-sorted, right-padded batches on a copy of that prefix's KV cache, with
        logits kept only at the positions read. Right padding needs no attention mask: a real
        token attends only to earlier positions, all of them real."""
        model, tokenizer = self.load(model_name)
        prepared = [self._prepare(item, tokenizer) for item in items]
        out: list = [None] * len(items)
        for prefix, members in self._prefix_groups([ctx for ctx, _ in prepared]):
            self._score_group(prefix, [(i, *prepared[i]) for i in members], model, tokenizer, out)
        return out

    def _prefix_groups(self, contexts: list[list[int]]) -> list[tuple[list[int], list[int]]]:
        """(prefix, item indices): runs of neighbours sharing a long prefix (one question in two
        orders, one document with several endings), then all the others with what they share."""
        groups, rest, i = [], [], 0
        while i < len(contexts):
            j, common = i + 1, contexts[i]
            if j < len(contexts) and _common_prefix(common, contexts[j]) >= self.MIN_SHARED_PREFIX:
                common, j = common[:_common_prefix(common, contexts[j])], j + 1
                # later items join only if they share all of it: a chain must not shrink to what every
                # prompt shares (the chat template's system prompt)
                while j < len(contexts) and _common_prefix(common, contexts[j]) == len(common):
                    j += 1
                groups.append((common, list(range(i, j))))
            else:
                rest.append(i)
            i = j
        if rest:
            common = contexts[rest[0]]
            for k in rest[1:]:
                common = common[:_common_prefix(common, contexts[k])]
            groups.append((common if len(rest) > 1 and len(common) >= self.MIN_CALL_PREFIX else [], rest))
        # every context keeps at least its last token out of the prefix: that position's logits are read
        return [(prefix[: min(len(prefix), min(len(contexts[k]) for k in members) - 1)], members)
                for prefix, members in groups]

    def _score_group(self, prefix: list[int], members, model, tokenizer, out: list) -> None:
        import copy

        import torch

        device, cached = model.device, len(prefix)
        cache = None
        if cached:
            with torch.no_grad():
                cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True,
                              logits_to_keep=1).cache
        # A row is a context's tail when every continuation is one token (one row reads them all),
        # else the tail plus one continuation but its last token, read at each continuation position.
        rows = []  # (tokens after the prefix, item index, [(continuation index, [(position, token)])])
        for index, ctx_ids, cont_ids in members:
            tail, last = ctx_ids[cached:], len(ctx_ids) - 1 - cached
            if all(len(c) == 1 for c in cont_ids):
                rows.append((tail, index, [(k, [(last, c[0])]) for k, c in enumerate(cont_ids)]))
            else:
                rows += [(tail + c[:-1], index, [(k, [(last + j, t) for j, t in enumerate(c)])])
                         for k, c in enumerate(cont_ids)]
            out[index] = [None] * len(cont_ids)
        rows.sort(key=lambda row: len(row[0]))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        start = 0
        while start < len(rows):
            end = start + 1
            while (end < len(rows) and end - start < self.SCORE_BATCH_ROWS
                   and (end - start + 1) * len(rows[end][0]) <= self.SCORE_BATCH_TOKENS):
                end += 1
            batch, width = rows[start:end], len(rows[end - 1][0])
            ids = torch.tensor([row[0] + [pad] * (width - len(row[0])) for row in batch], device=device)
            read = sorted({p for row in batch for _, reads in row[2] for p, _ in reads})
            column = {p: n for n, p in enumerate(read)}
            kv = None
            if cache is not None:
                kv = copy.deepcopy(cache)
                kv.batch_repeat_interleave(len(batch))
            with torch.no_grad():
                logits = model(input_ids=ids, cache=kv, use_cache=kv is not None,
                               logits_to_keep=torch.tensor(read, device=device)).logits
                logprobs = torch.log_softmax(logits.float(), dim=-1)
            for b, (_, index, conts) in enumerate(batch):
                for k, reads in conts:
                    per_token = [float(logprobs[b, column[p], t]) for p, t in reads]
                    out[index][k] = Score(sum(per_token), per_token, [tokenizer.decode([t]) for _, t in reads])
            start = end

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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
