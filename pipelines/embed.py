"""The embedding step: MiniLM vectors of judged documents, computed while the model still writes.

Embedding dedup and decontamination need one vector per judged document. Computed after the
pipeline, MiniLM (~15-30 documents/s on 2 cores) runs alone while nothing else does; computed
here, in a thread of its own (torch releases the GIL), it overlaps the calls, the filters and
the judge. Each vector travels in the document's staged row (`meta["embedding"]`: base64 of
float32) and the build stores it in the warehouse before dedup, so the later stages read it
back and embed nothing twice. Texts whose vectors the warehouse already held when the build
started (`BuildContext.known_vectors`, one hash a line) are passed over.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from pipelines.context import load_context

BATCH = 32  # documents a MiniLM call; the post-pipeline embedder uses the same


def read_known(path: str | None) -> set[str]:
    if not path:
        return set()
    try:
        with open(path, encoding="utf-8") as fh:
            return {line.strip() for line in fh if line.strip()}
    except FileNotFoundError:
        return set()


class Embed(PipelineStep):
    """Vectors for the judged documents, one batch at a time on a worker thread; documents pass
    downstream as their batch finishes (order is not kept: the writer does not need it)."""

    name = "🧭 embed"
    type = "🔢 - EMBED"

    def __init__(self, context_path: str):
        super().__init__()
        self.context_path = context_path

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        ctx = load_context(self.context_path)
        if not ctx.embed:
            yield from data
            return
        from msm.models import default_alias, load_embedder
        from pipelines.dedup import normalised_hash
        from warehouse.vectors import RECIPE, encode, pack

        known = read_known(ctx.known_vectors)
        embedder, model = load_embedder(), default_alias("embedder")

        def vectors_of(docs: list[Document]):
            return encode(embedder, [d.text for d in docs], BATCH)

        def finish(future: Future, docs: list[Document]):
            with self.track_time():
                vectors = future.result()
            for doc, vector in zip(docs, vectors):
                doc.metadata["embedding"] = {"model": model, "recipe": RECIPE, "vector": pack(vector)}
                self.stat_update("embedded")
                yield doc

        pending: deque[tuple[Future, list[Document]]] = deque()
        batch: list[Document] = []
        with ThreadPoolExecutor(1, thread_name_prefix="msm-embed") as pool:
            for doc in data:
                if doc.metadata.get("status") != "judged" or normalised_hash(doc.text) in known:
                    yield doc
                else:
                    batch.append(doc)
                    if len(batch) == BATCH:
                        pending.append((pool.submit(vectors_of, batch), batch))
                        batch = []
                while pending and pending[0][0].done():
                    yield from finish(*pending.popleft())
            if batch:
                pending.append((pool.submit(vectors_of, batch), batch))
            while pending:
                yield from finish(*pending.popleft())
