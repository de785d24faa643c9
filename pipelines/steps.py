"""datatrove steps for a corpus build: read plan, generate, filter, judge. Writers come from datatrove.

Every document flows through every step and ends with one status: generated documents can
be dropped by a filter or the judge, with a reason, but are never removed from the stream, so
the staged shards hold every plan row exactly once.
"""

from __future__ import annotations

import json
import os
import re

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.pipeline.writers import ParquetWriter

from pipelines.calls import Channel, release, task_calls
from pipelines.quiet import quiet_task_logs
from pipelines.context import BuildContext, load_context

if os.environ.get("MSM_QUIET_DATATROVE"):  # a datatrove worker process of a build
    quiet_task_logs()


def document_row(self, document: Document) -> dict:
    """Writer adapter: a fixed three-column schema, whatever the metadata holds."""
    return {"id": document.id, "text": document.text, "meta": json.dumps(document.metadata, ensure_ascii=False)}


class StagedParquetWriter(ParquetWriter):
    """datatrove's ParquetWriter, writing each shard under `NAME.partial` and renaming it to NAME
    once its footer is written. A process killed mid-task (SIGKILL, a full disk) leaves at most a
    `.partial` file that no reader looks at, never a `.parquet` that cannot be read; the task's
    rows are then missing, so the task runs again. datatrove marks a task complete only after
    this close, and the build checks the shards' rows anyway, whatever the markers say."""

    SUFFIX = ".partial"

    def __init__(self, output_folder, output_filename: str, **kwargs):
        super().__init__(output_folder, output_filename=output_filename + self.SUFFIX, **kwargs)
        self._names: set[str] = set()

    def _write(self, document: dict, file_handler, filename: str):
        self._names.add(filename)
        return super()._write(document, file_handler, filename)

    def close(self):
        super().close()  # writes every footer and closes the files
        for name in sorted(self._names):
            final = name.removesuffix(self.SUFFIX)
            if final != name and self.output_folder.exists(name):
                self.output_folder.mv(name, final)
        self._names.clear()


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
    """Shared by the steps that call a model: the task's shared calls, and per-document accounting."""

    def __init__(self, context_path: str):
        super().__init__()
        self.context_path = context_path

    @staticmethod
    def account(doc: Document, response) -> None:
        doc.metadata["call_keys"].append(response.key)
        doc.metadata["cost_usd"] += response.cost_usd if not response.cached else 0.0
        doc.metadata["cache_hits"] += int(response.cached)

    def stream(self, data: DocumentsPipeline, channel: Channel, wanted, submit, settle) -> DocumentsPipeline:
        """Pull documents from upstream and answer them as calls come back.

        `wanted(doc)` says which documents this step works on (the others pass straight
        through), `submit(doc)` starts the first call, and `settle(tag, response)` handles an
        answer and returns the document when it is finished (or None after starting another call).
        """
        for doc in data:
            if not wanted(doc):
                yield doc
            else:
                with self.track_time():
                    submit(doc)
            for tag, response in channel.ready():
                with self.track_time():
                    done = settle(tag, response)
                if done is not None:
                    yield done
        answers = channel.drain()
        while True:
            with self.track_time():  # waiting for this step's own calls counts as its time
                item = next(answers, None)
                done = settle(*item) if item is not None else None
            if item is None:
                break
            if done is not None:
                yield done


def _pending(meta: dict, response, what: str) -> bool:
    if response.stop_reason == "pending":
        meta["status"], meta["reason"] = "pending", f"budget: {what} not started"
        return True
    return False


class Generate(_LLMStep):
    """Scratchpad then content (API models) or the content alone (small local models).

    A truncated answer is asked for again once with more room, then dropped with a reason; or,
    for small local models that rarely stop on their own, trimmed to its last whole paragraph.
    """

    name = "✍️ generate"
    type = "🤖 - LLM"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        ctx = load_context(self.context_path)
        bar = Progress(ctx, len(range(rank, ctx.n_planned, world_size)), rank, "generate")
        channel = Channel(task_calls(ctx, rank, world_size), bar)

        def submit(doc: Document) -> None:
            channel.submit(ctx.generate_request(doc.metadata["plan"]), (doc, False))

        def settle(tag, response):
            doc, grown = tag
            if (response.ok and response.truncated and not grown and ctx.truncation == "regrow"
                    and ctx.regrow > 1):
                self.account(doc, response)
                bar.add(1)
                channel.submit(ctx.generate_request(doc.metadata["plan"], grow=True), (doc, True))
                return None
            self.account(doc, response)
            self.finish(ctx, doc, response)
            self.stat_update(doc.metadata["status"])
            return doc

        try:
            yield from self.stream(data, channel, lambda d: d.metadata["status"] == "planned", submit, settle)
        finally:
            bar.close()

    @staticmethod
    def finish(ctx: BuildContext, doc: Document, response) -> None:
        from corpus.prompting import extract_document, trim_to_boundary

        meta = doc.metadata
        if _pending(meta, response, "generation"):
            return
        if not response.ok:
            meta["status"], meta["reason"] = "error", f"generate: {response.error}"
        elif response.refused:
            meta["status"], meta["reason"] = "dropped", "refusal: the model declined"
        elif response.truncated and ctx.truncation == "trim":
            if ctx.scratchpad and "<document>" not in response.text:
                meta["status"], meta["reason"] = "dropped", "truncated: cut off before <document>"
                return
            body = response.text.split("<document>", 1)[-1].split("</document>", 1)[0]
            content = trim_to_boundary(body)
            if content is None:
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


class Revise(_LLMStep):
    """Optional: an editor's critique, then a rewrite that fixes it. A rewrite that fails keeps
    the draft, and the document says so (`revision` in its metadata); nothing is dropped here."""

    name = "✏️ revise"
    type = "🤖 - LLM"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        ctx = load_context(self.context_path)
        if not ctx.revise:
            yield from data
            return
        bar = Progress(ctx, 0, rank, "revise")
        channel = Channel(task_calls(ctx, rank, world_size), bar)

        def submit(doc: Document) -> None:
            bar.add(1)
            channel.submit(ctx.critique_request(doc.metadata["plan"], doc.text), ("critique", doc))

        def settle(tag, response):
            stage, doc = tag
            meta = doc.metadata
            self.account(doc, response)
            if _pending(meta, response, stage):
                pass
            elif stage == "critique" and not response.ok:
                meta["revision"] = f"kept draft: critique failed ({response.error})"
            elif stage == "critique" and response.text.strip().upper().rstrip(".") == "NONE":
                meta["revision"] = "kept draft: the editor found no problems"
            elif stage == "critique":
                bar.add(1)
                channel.submit(ctx.rewrite_request(meta["plan"], doc.text, response.text), ("rewrite", doc))
                return None
            else:
                self.take_rewrite(ctx, doc, response)
            self.stat_update(meta.get("revision", meta["status"]).split(":")[0])
            return doc

        try:
            yield from self.stream(data, channel, lambda d: d.metadata["status"] == "generated", submit, settle)
        finally:
            bar.close()

    @staticmethod
    def take_rewrite(ctx: BuildContext, doc: Document, response) -> None:
        from corpus.prompting import extract_document

        content, problem = (None, None)
        if response.ok and not response.truncated:
            content, problem = extract_document(response.text, ctx.scratchpad)
        if content is None:
            why = problem or ("truncated" if response.truncated else response.error)
            doc.metadata["revision"] = f"kept draft: rewrite failed ({why})"
        else:
            doc.metadata["draft"], doc.text, doc.metadata["revision"] = doc.text, content, "revised"


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
    """An LLM judge with per-criterion verdicts, or the offline judge when no capable model is set.

    The last step that calls a model, so it ends the task's calls.
    """

    name = "⚖️ judge"
    type = "🤖 - LLM"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        ctx = load_context(self.context_path)
        try:
            if ctx.judge == "offline":
                yield from self.offline_stream(ctx, data)
            else:
                yield from self.llm(ctx, data, rank, world_size)
        finally:
            release(ctx, rank)

    def llm(self, ctx: BuildContext, data: DocumentsPipeline, rank: int, world_size: int) -> DocumentsPipeline:
        calls = task_calls(ctx, rank, world_size)
        bar = Progress(ctx, 0, rank, "judge")
        channel = Channel(calls, bar)

        def submit(doc: Document) -> None:
            bar.add(1)
            channel.submit(ctx.judge_request(doc.metadata["plan"], doc.text), (doc, False))

        def settle(tag, response):
            from corpus.prompting import parse_verdicts

            doc, retried = tag
            meta = doc.metadata
            self.account(doc, response)
            verdicts = parse_verdicts(response.text, ctx.judge_criteria(meta["plan"])) if response.ok else None
            if response.ok and verdicts is None and not retried:
                # An answer that is not the JSON asked for is a cached answer, so asking the same
                # request again would return it again: ask once more under another seed.
                bar.add(1)
                channel.submit(ctx.judge_request(meta["plan"], doc.text, retry=True), (doc, True))
                return None
            if _pending(meta, response, "judge"):
                pass
            elif not response.ok:
                meta["status"], meta["reason"] = "error", f"judge: {response.error}"
            elif verdicts is None:
                meta["status"], meta["reason"] = "dropped", "judge: the verdict was not the JSON asked for, twice"
            else:
                self.apply(doc, verdicts, f"llm:{calls.model}", response.key, ctx.extra_criteria(meta["plan"]))
            self.stat_update(meta["status"])
            return doc

        try:
            yield from self.stream(data, channel, lambda d: d.metadata["status"] == "generated", submit, settle)
        finally:
            bar.close()

    @staticmethod
    def apply(doc: Document, verdicts: dict, judge: str, call_key: str, guarded: list[dict]) -> None:
        """A failed guarded criterion (the style's, then the condition's) names what it guards
        against (invented_rationale, attribution_leak, missing_attribution...): the reports count
        those; other failures are listed."""
        meta = doc.metadata
        for criterion, (verdict, reason) in verdicts.items():
            meta["judgments"].append({"judge": judge, "criterion": criterion, "verdict": verdict, "score": None,
                                      "rationale": reason, "call_key": call_key})
        failed = [c for c, (v, _) in verdicts.items() if not v]
        guards = {c["name"]: c["fails_as"] for c in guarded}
        if any(c in guards for c in failed):
            meta["status"], meta["reason"] = "dropped", next(guards[c] for c in failed if c in guards)
        elif failed:
            meta["status"], meta["reason"] = "dropped", f"judge: failed {', '.join(failed)}"
        else:
            meta["status"] = "judged"

    def offline_stream(self, ctx: BuildContext, data: DocumentsPipeline) -> DocumentsPipeline:
        """The embedder works best on a whole list, and offline builds are small: judge them together."""
        docs = list(data)
        todo = [d for d in docs if d.metadata["status"] == "generated"]
        with self.track_time():
            self.offline(ctx, todo)
        for doc in todo:
            self.stat_update(doc.metadata["status"])
        yield from docs

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
            condition = ctx.condition(meta["plan"])
            guard = self.offline_condition(doc, condition)
            if not on_topic:
                meta["status"], meta["reason"] = "dropped", "judge: off topic"
            elif not names_ok:
                meta["status"], meta["reason"] = "dropped", "judge: names another assistant"
            elif guard is not None:
                meta["status"], meta["reason"] = "dropped", guard
            else:
                meta["status"] = "judged"

    @staticmethod
    def offline_condition(doc: Document, condition: dict) -> str | None:
        """The offline check of a condition: a causal link marker must (or must not) appear.
        Crude next to an LLM judge, and recorded as such; returns the drop reason, or None."""
        if not condition["criteria"]:
            return None
        from corpus.conditions import has_link

        linked = has_link(doc.text)
        verdict = linked if condition["offline"] == "require" else not linked
        criterion = condition["criteria"][0]
        doc.metadata["judgments"].append(
            {"judge": "offline:link-markers", "criterion": criterion["name"], "verdict": verdict, "score": None,
             "rationale": f"causal link marker {'found' if linked else 'absent'}", "call_key": None})
        return None if verdict else criterion["fails_as"]


class Progress:
    """One bar per task and stage: documents done, tokens and cost so far; tqdm adds rate and ETA."""

    POSITIONS = {"generate": 0, "revise": 1, "judge": 2}

    def __init__(self, ctx: BuildContext, total: int, rank: int, stage: str):
        self.stage = stage
        self.tokens, self.cost, self.retries, self.failed, self.last = 0, 0.0, 0, 0, ""
        self.bar = None
        if ctx.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{stage} (task {rank})", unit="call", dynamic_ncols=True, leave=True,
                            position=self.POSITIONS.get(stage, 0))

    def __call__(self, response) -> None:
        if self.bar is None:
            return
        self.tokens += response.usage.input_tokens + response.usage.output_tokens
        self.cost += 0.0 if response.cached else response.cost_usd
        self.failed += not response.ok
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self.bar.update(1)

    def retry(self, reason: str) -> None:
        """A call is tried again (a 429, a 5xx, a timeout): shown at once, with the latest reason, so
        a build that keeps retrying is seen to, before anything finishes."""
        if self.bar is None:
            return
        self.retries += 1
        self.last = reason.split(":")[0][:40]
        self.bar.set_postfix_str(self._postfix(), refresh=True)

    def _postfix(self) -> str:
        text = f"{self.tokens:,} tokens, ${self.cost:.2f}"
        if self.retries:
            text += f", {self.retries} retried (last: {self.last})"
        if self.failed:
            text += f", {self.failed} failed"
        return text

    def add(self, calls: int) -> None:
        """Calls the step learns about as it goes (each document the filters let through, a regrow,
        a second judge question); the bar shows them at its next update."""
        if self.bar is not None:
            self.bar.total += calls

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
