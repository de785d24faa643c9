"""Document embeddings kept in the warehouse: MiniLM manages ~15 documents/s on this CPU, so a
vector is computed once per text and recipe and read back by every later build or rerun."""

from __future__ import annotations

import base64
import os

import numpy as np

RECIPE = "head128+tail128"


def encode(embedder, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """RECIPE's unit vectors: MiniLM on each text's head and tail. Every vector the warehouse keeps
    is made here, so vectors computed in the pipeline, on a thread or after it are the same."""
    from pipelines.dedup import embedding_text

    return embedder.encode(embedding_text(texts, embedder.tokenizer), normalize_embeddings=True, batch_size=batch_size)


def pack(vector) -> str:
    """A vector as text for a staged row's JSON metadata: base64 of its float32 bytes."""
    return base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode("ascii")


def unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float32)


def stored_embedder(db, model_name: str | None = None, batch_size: int = 32):
    """`embed(texts, hashes) -> unit vectors`, reading and filling the `embeddings` table."""

    def embed(texts: list[str], hashes: list[str]) -> np.ndarray:
        from msm.models import default_alias, load_embedder, resolve_embedder
        from warehouse.db import connect, insert_rows

        model = model_name or default_alias("embedder")
        con = connect(db)
        try:
            resolve_embedder(model_name)  # a missing model fails before any work
            known = {h: v for h, v in con.execute(
                "SELECT text_hash, vector FROM embeddings WHERE model = ? AND recipe = ? AND text_hash IN "
                "(SELECT unnest(?::VARCHAR[]))", [model, RECIPE, list(set(hashes))]).fetchall()}
            missing = [i for i, h in enumerate(hashes) if h not in known]
            missing = list({hashes[i]: i for i in missing}.values())  # one text per hash
            if missing:
                embedder = load_embedder(model_name)
                vectors = encode(embedder, [texts[i] for i in missing], batch_size)
                fresh = {hashes[i]: vectors[k].tolist() for k, i in enumerate(missing)}
                insert_rows(con, "INSERT OR IGNORE INTO embeddings",
                            [{"text_hash": h, "model": model, "recipe": RECIPE, "vector": v} for h, v in fresh.items()])
                known.update(fresh)
            return np.asarray([known[h] for h in hashes], dtype=np.float32)
        finally:
            con.close()

    return embed


def write_known_hashes(db, path: str) -> None:
    """The text hashes the warehouse holds vectors for (default embedder and recipe), one a line,
    so a build's Embed step passes over texts already embedded by an earlier build."""
    from msm.errors import MsmError
    from msm.models import default_alias
    from warehouse.db import connect

    try:
        con = connect(db, read_only=True)
    except MsmError:  # held by another writer: embed everything rather than wait
        hashes = []
    else:
        try:
            hashes = [h for (h,) in con.execute("SELECT text_hash FROM embeddings WHERE model = ? AND recipe = ?",
                                                [default_alias("embedder"), RECIPE]).fetchall()]
        finally:
            con.close()
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("".join(h + "\n" for h in hashes))
    os.replace(tmp, path)


def store_staged_vectors(db, rows: list[dict]) -> int:
    """Move the vectors the Embed step put in staged rows (`meta["embedding"]`) into the
    `embeddings` table; returns how many texts carried one."""
    from warehouse.corpus_load import text_hash

    fresh = {}
    for r in rows:
        packed = r["meta"].pop("embedding", None)
        if packed and packed.get("recipe") == RECIPE:
            fresh[text_hash(r["text"])] = (packed["model"], unpack(packed["vector"]))
    return store_vectors(db, fresh)


def store_vectors(db, vectors: dict[str, tuple[str, np.ndarray]]) -> int:
    """Insert {text hash: (model, vector)} computed elsewhere (recipe RECIPE); returns how many."""
    from warehouse.db import connect, insert_rows

    if not vectors:
        return 0
    con = connect(db)
    try:
        insert_rows(con, "INSERT OR IGNORE INTO embeddings",
                    [{"text_hash": h, "model": model, "recipe": RECIPE, "vector": np.asarray(v).tolist()}
                     for h, (model, v) in vectors.items()])
        return len(vectors)
    finally:
        con.close()


def embed_in_background(texts: list[str], hashes: list[str], known: set[str]):
    """Start embedding the texts whose hash is not in `known` on a thread (torch releases the GIL,
    so it overlaps whatever the caller does next); `.result()` gives {hash: (model, vector)}
    for `store_vectors`."""
    from concurrent.futures import ThreadPoolExecutor

    todo = {h: t for t, h in zip(texts, hashes) if h not in known}

    def run() -> dict:
        if not todo:
            return {}
        from msm.models import default_alias, load_embedder

        vectors = encode(load_embedder(), list(todo.values()))
        model = default_alias("embedder")
        return {h: (model, vectors[k]) for k, h in enumerate(todo)}

    pool = ThreadPoolExecutor(1, thread_name_prefix="msm-embed-eval")
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future
