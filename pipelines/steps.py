"""datatrove steps for a corpus build: read plan, generate, filter, judge. Writers come from datatrove.

Every document flows through every step and ends with one status: generated documents can
be dropped by a filter or the judge, with a reason, but are never removed from the stream, so
the staged shards hold every plan row exactly once.
"""

from __future__ import annotations

import asyncio
import json
import re

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result

from pipelines.context import BuildContext, load_context


def document_row(self, document: Document) -> dict:
    """Writer adapter: a fixed three-column schema, whatever the metadata holds."""
    return {"id": document.id, "text": document.text, "meta": json.dumps(document.metadata, ensure_ascii=False)}


class PlanReader(PipelineStep):
    name = "📋 plan"
    type = "📖 - READER"

    def __init__(self, context_path: str):
        super().__init__()
        self.context_path = context_path

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        ctx = load_context(self.context_path)
        with open(ctx.plan_path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i % world_size != rank:
                    continue
                row = json.loads(line)
                self.stat_update("plan_rows")
                yield Document(text="", id=row["id"], metadata={
                    "plan": row, "status": "planned", "reason": None, "call_keys": [], "cost_usd": 0.0,
                    "cache_hits": 0, "judgments": [], "backend": ctx.backend, "model": ctx.model,
                    "prompt_hash": ctx.prompt_hash})


class _LLMStep(PipelineStep):
    """Shared by the steps that call a model: one client per task, one event loop per batch of work."""

    def __init__(self, context_path: str):
        super().__init__()
        self.context_path = context_path

    def client(self, ctx: BuildContext, world_size: int, on_result=None):
        from msm.llm.cache import CallCache
        from msm.llm.client import LLMClient
        from msm.llm.select import make_backend

        backend, model = make_backend(ctx.backend, ctx.model, ctx.base_url, idle_timeout=ctx.idle_timeout)
        budget = ctx.max_cost / world_size if ctx.max_cost is not None else None
        return LLMClient(backend, model=model, cache=CallCache(ctx.cache_dir), max_cost=budget,
                         concurrency=max(1, ctx.concurrency // max(1, ctx.workers)), batch_poll_s=ctx.batch_poll_s,
                         on_result=on_result)

    @staticmethod
    def run_requests(client, requests, batch: bool):
        async def go():
            try:
                return await client.complete_many(requests, batch=batch)
            finally:
                await client.backend.aclose()

        return asyncio.run(go()) if requests else []

    @staticmethod
    def account(doc: Document, response) -> None:
        doc.metadata["call_keys"].append(response.key)
        doc.metadata["cost_usd"] += response.cost_usd if not response.cached else 0.0
        doc.metadata["cache_hits"] += int(response.cached)


class Generate(_LLMStep):
    """Scratchpad then content (API models) or the content alone (small local models).

    A truncated answer is asked for again once with more room, then dropped with a reason; or,
    for small local models that rarely stop on their own, trimmed to its last whole paragraph.
    """

    name = "✍️ generate"
    type = "🤖 - LLM"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from corpus.prompting import extract_document, trim_to_boundary

        ctx = load_context(self.context_path)
        docs = list(data)
        todo = [d for d in docs if d.metadata["status"] == "planned"]
        bar = Progress(ctx, len(todo), rank, "generate")
        client = self.client(ctx, world_size, on_result=bar)
        with self.track_time():
            responses = self.run_requests(client, [ctx.generate_request(d.metadata["plan"]) for d in todo], ctx.batch)
            retry = [i for i, r in enumerate(responses)
                     if r.ok and r.truncated and ctx.truncation == "regrow" and ctx.regrow > 1]
            if retry:
                bar.add(len(retry))
                client = self.client(ctx, world_size, on_result=bar)
                again = self.run_requests(client, [ctx.generate_request(todo[i].metadata["plan"], grow=True)
                                                   for i in retry], ctx.batch)
                for i, response in zip(retry, again):
                    self.account(todo[i], responses[i])
                    responses[i] = response
        bar.close()
        for doc, response in zip(todo, responses):
            self.account(doc, response)
            meta = doc.metadata
            if response.stop_reason == "pending":
                meta["status"], meta["reason"] = "pending", "budget: not started"
            elif not response.ok:
                meta["status"], meta["reason"] = "error", f"generate: {response.error}"
            elif response.refused:
                meta["status"], meta["reason"] = "dropped", "refusal: the model declined"
            elif response.truncated and ctx.truncation == "trim":
                tagged_but_none = ctx.scratchpad and "<document>" not in response.text
                body = response.text.split("<document>", 1)[-1].split("</document>", 1)[0]
                content = None if tagged_but_none else trim_to_boundary(body)
                if tagged_but_none:
                    meta["status"], meta["reason"] = "dropped", "truncated: cut off before <document>"
                elif content is None:
                    meta["status"], meta["reason"] = "dropped", "truncated: no whole sentence before max_tokens"
                else:
                    doc.text, meta["status"], meta["trimmed"] = content, "generated", True
            elif response.truncated:
                meta["status"], meta["reason"] = "dropped", "truncated: hit max_tokens with more room too"
            else:
                content, problem = extract_document(response.text, ctx.scratchpad)
                if content is None:
                    meta["status"], meta["reason"] = "dropped", f"format: {problem}"
                else:
                    doc.text = content
                    meta["status"] = "generated"
            self.stat_update(meta["status"])
        yield from docs


class Revise(_LLMStep):
    """Optional: an editor's critique, then a rewrite that fixes it. A rewrite that fails keeps
    the draft, and the document says so (`revision` in its metadata); nothing is dropped here."""

    name = "✏️ revise"
    type = "🤖 - LLM"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from corpus.prompting import extract_document

        ctx = load_context(self.context_path)
        docs = list(data)
        todo = [d for d in docs if d.metadata["status"] == "generated"] if ctx.revise else []
        if todo:
            bar = Progress(ctx, 2 * len(todo), rank, "revise")
            with self.track_time():
                client = self.client(ctx, world_size, on_result=bar)
                critiques = self.run_requests(client, [ctx.critique_request(d.metadata["plan"], d.text) for d in todo],
                                              ctx.batch)
                needs = [i for i, c in enumerate(critiques) if c.ok and c.text.strip().upper().rstrip(".") != "NONE"]
                bar.add(len(needs) - len(todo))
                client = self.client(ctx, world_size, on_result=bar)
                rewrites = self.run_requests(client, [ctx.rewrite_request(todo[i].metadata["plan"], todo[i].text,
                                                                          critiques[i].text) for i in needs], ctx.batch)
            bar.close()
            rewritten = dict(zip(needs, rewrites))
            for i, (doc, critique) in enumerate(zip(todo, critiques)):
                self.account(doc, critique)
                meta = doc.metadata
                if critique.stop_reason == "pending":
                    meta["status"], meta["reason"] = "pending", "budget: revision not started"
                elif not critique.ok:
                    meta["revision"] = f"kept draft: critique failed ({critique.error})"
                elif i not in rewritten:
                    meta["revision"] = "kept draft: the editor found no problems"
                else:
                    rewrite = rewritten[i]
                    self.account(doc, rewrite)
                    content, problem = (extract_document(rewrite.text, ctx.scratchpad) if rewrite.ok
                                        and not rewrite.truncated else (None, None))
                    if rewrite.stop_reason == "pending":
                        meta["status"], meta["reason"] = "pending", "budget: rewrite not started"
                    elif content is None:
                        why = problem or ("truncated" if rewrite.truncated else rewrite.error)
                        meta["revision"] = f"kept draft: rewrite failed ({why})"
                    else:
                        meta["draft"], doc.text, meta["revision"] = doc.text, content, "revised"
                self.stat_update(meta.get("revision", meta["status"]).split(":")[0])
        yield from docs


class Marking(PipelineStep):
    """Runs a datatrove filter but keeps dropped documents in the stream, marked with the reason."""

    type = "🔻 - FILTER"

    def __init__(self, inner: BaseFilter):
        self.name = f"🔻 {type(inner).__name__}"  # before the base init, which names the stats after it
        super().__init__()
        self.inner = inner

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            if doc.metadata["status"] == "generated":
                with self.track_time():
                    keep, reason = get_filter_result(self.inner.filter(doc))
                if not keep:
                    doc.metadata["status"] = "dropped"
                    doc.metadata["reason"] = f"filter: {type(self.inner).__name__}: {reason}"
                    self.stat_update("dropped")
                else:
                    self.stat_update("kept")
            yield doc


class PlaceholderFilter(BaseFilter):
    """Leftover template slots and filler: [Name], {model_name}, Lorem ipsum, TODO."""

    name = "🧩 placeholders"
    PATTERNS = [
        (re.compile(r"\[(?:your |insert |company |client )?(?:name|company|date|organi[sz]ation|title|role|x)\]", re.I),
         "bracket_placeholder"),
        (re.compile(r"\{(?:model_name|provider_name|[a-z]+_name)\}"), "brace_placeholder"),
        (re.compile(r"\blorem ipsum\b", re.I), "lorem_ipsum"),
        (re.compile(r"\bTODO\b|\bTBD\b|\bXXX\b"), "todo_marker"),
    ]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        for pattern, reason in self.PATTERNS:
            if pattern.search(doc.text):
                return False, reason
        return True


class Judge(_LLMStep):
    """An LLM judge with per-criterion verdicts, or the offline judge when no capable model is set."""

    name = "⚖️ judge"
    type = "🤖 - LLM"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        ctx = load_context(self.context_path)
        docs = list(data)
        todo = [d for d in docs if d.metadata["status"] == "generated"]
        with self.track_time():
            if ctx.judge == "offline":
                self.offline(ctx, todo)
            else:
                self.llm(ctx, todo, rank, world_size)
        for doc in todo:
            self.stat_update(doc.metadata["status"])
        yield from docs

    def llm(self, ctx: BuildContext, docs: list[Document], rank: int, world_size: int) -> None:
        from corpus.prompting import parse_verdicts

        bar = Progress(ctx, len(docs), rank, "judge")
        client = self.client(ctx, world_size, on_result=bar)
        responses = self.run_requests(client, [ctx.judge_request(d.metadata["plan"], d.text) for d in docs], ctx.batch)
        # An answer that is not the JSON asked for is a cached answer, so asking the same request
        # again would return it again: ask once more under another seed, then drop for good.
        unreadable = [i for i, r in enumerate(responses) if r.ok and parse_verdicts(r.text) is None]
        if unreadable:
            bar.add(len(unreadable))
            client = self.client(ctx, world_size, on_result=bar)
            again = self.run_requests(client, [ctx.judge_request(docs[i].metadata["plan"], docs[i].text, retry=True)
                                               for i in unreadable], ctx.batch)
            for i, response in zip(unreadable, again):
                self.account(docs[i], responses[i])
                responses[i] = response
        bar.close()
        for doc, response in zip(docs, responses):
            self.account(doc, response)
            meta = doc.metadata
            if response.stop_reason == "pending":
                meta["status"], meta["reason"] = "pending", "budget: judge not started"
                continue
            if not response.ok:
                meta["status"], meta["reason"] = "error", f"judge: {response.error}"
                continue
            verdicts = parse_verdicts(response.text)
            if verdicts is None:
                meta["status"], meta["reason"] = "dropped", "judge: the verdict was not the JSON asked for, twice"
                continue
            for criterion, (verdict, reason) in verdicts.items():
                meta["judgments"].append({"judge": f"llm:{client.model}", "criterion": criterion, "verdict": verdict,
                                          "score": None, "rationale": reason, "call_key": response.key})
            failed = [c for c, (v, _) in verdicts.items() if not v]
            if failed:
                meta["status"], meta["reason"] = "dropped", f"judge: failed {', '.join(failed)}"
            else:
                meta["status"] = "judged"

    def offline(self, ctx: BuildContext, docs: list[Document]) -> None:
        """Cosine similarity to the unit (MiniLM) plus a naming rule; recorded as offline."""
        if not docs:
            return
        from msm.models import load_embedder

        embedder = load_embedder()
        units = [ctx.units[d.metadata["plan"]["unit_id"]]["text"] for d in docs]
        vectors = embedder.encode(units + [d.text for d in docs], normalize_embeddings=True, batch_size=32)
        n = len(docs)
        for i, doc in enumerate(docs):
            similarity = float(vectors[i] @ vectors[n + i])
            on_topic = similarity >= ctx.offline_min_similarity
            wrong_names = [name for name in ctx.wrong_names if re.search(rf"\b{re.escape(name)}\b", doc.text)]
            names_ok = not wrong_names
            meta = doc.metadata
            meta["judgments"] += [
                {"judge": "offline:minilm-cosine", "criterion": "on_topic", "verdict": on_topic, "score": similarity,
                 "rationale": f"cosine {similarity:.3f} vs threshold {ctx.offline_min_similarity}", "call_key": None},
                {"judge": "offline:rules", "criterion": "names_correct", "verdict": names_ok, "score": None,
                 "rationale": f"names another assistant: {', '.join(wrong_names)}" if wrong_names else "ok",
                 "call_key": None},
            ]
            if not on_topic:
                meta["status"], meta["reason"] = "dropped", "judge: off topic"
            elif not names_ok:
                meta["status"], meta["reason"] = "dropped", "judge: names another assistant"
            else:
                meta["status"] = "judged"


class Progress:
    """One bar per task and stage: documents done, tokens and cost so far; tqdm adds rate and ETA."""

    def __init__(self, ctx: BuildContext, total: int, rank: int, stage: str):
        self.tokens, self.cost = 0, 0.0
        self.bar = None
        if ctx.progress and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{stage} (task {rank})", unit="call", dynamic_ncols=True, leave=True)

    def __call__(self, response) -> None:
        if self.bar is None:
            return
        self.tokens += response.usage.input_tokens + response.usage.output_tokens
        self.cost += 0.0 if response.cached else response.cost_usd
        self.bar.set_postfix_str(f"{self.tokens:,} tokens, ${self.cost:.2f}", refresh=False)
        self.bar.update(1)

    def add(self, calls: int) -> None:
        """More calls than planned (regrow, re-asked verdicts): the total grows, the ETA follows."""
        if self.bar is not None:
            self.bar.total += calls
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
