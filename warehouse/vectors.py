"""Document embeddings kept in the warehouse: MiniLM manages ~15 documents/s on this CPU, so a
vector is computed once per text and recipe and read back by every later build or rerun."""

from __future__ import annotations

import numpy as np

RECIPE = "head128+tail128"


def stored_embedder(db, model_name: str | None = None, batch_size: int = 32):
    """`embed(texts, hashes) -> unit vectors`, reading and filling the `embeddings` table."""

    def embed(texts: list[str], hashes: list[str]) -> np.ndarray:
        from msm.models import default_alias, load_embedder, resolve_embedder
        from pipelines.dedup import embedding_text
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
                vectors = embedder.encode(embedding_text([texts[i] for i in missing], embedder.tokenizer),
                                          normalize_embeddings=True, batch_size=batch_size)
                fresh = {hashes[i]: vectors[k].tolist() for k, i in enumerate(missing)}
                insert_rows(con, "INSERT OR IGNORE INTO embeddings",
                            [{"text_hash": h, "model": model, "recipe": RECIPE, "vector": v} for h, v in fresh.items()])
                known.update(fresh)
            return np.asarray([known[h] for h in hashes], dtype=np.float32)
        finally:
            con.close()

    return embed
