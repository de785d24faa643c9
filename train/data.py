"""Training data: corpora packed into fixed-length sequences, chats masked to the assistant's tokens.

Packing concatenates documents (EOS after each) and cuts the stream into `max_len` sequences, so
almost no position is padding. Each sequence carries segment ids: position ids restart at every
document and `collate` builds a block-diagonal causal mask, so no document attends to another,
and the first token of a document is never a target predicted from the one before it.

Chats go through the tokenizer's chat template (ChatML when the tokenizer has none). The loss
mask covers each assistant turn's content and its end-of-turn marker, nothing else.

Reasoning (CoT): with `cot`, an assistant turn's `reasoning` (the field `msm demos export` writes;
`reasoning_content` is read too) is trained in the base model's own thinking format. When the
chat template renders an assistant message's `reasoning_content` (Qwen3's does, as
`<think>\n...\n</think>\n\n` before the content; found by rendering a probe once per template),
the reasoning is passed as `reasoning_content` and the template renders it. Otherwise the default
is a `<think>\n{reasoning}\n</think>\n\n` prefix before the answer, in the content. Either way the
reasoning is inside the assistant span, so it is trained on. Without `cot` no reasoning is
rendered at all (the same records then train plain AFT).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from msm.errors import MsmError

IGNORE = -100
THINK_DEFAULT = "<think>\n{reasoning}\n</think>\n\n"  # the reasoning's format when the template has none
_PROBE = "msm-reasoning-probe-5d1c"
_RENDERS_REASONING: dict[str, bool] = {}  # chat template -> whether it renders `reasoning_content`
DEFAULT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class Source:
    """What a stage trains on, and where it came from (for the run record and the model card)."""

    kind: str  # corpus or demos
    ref: str  # as the config names it
    id: str  # warehouse corpus / demo set id, or the file's sha256
    spec_versions: list
    records: list  # texts (corpus) or {messages} dicts (demos)


# ---- reading ------------------------------------------------------------------------------------

def _read_rows(path: Path) -> list[dict]:
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        import datasets

        return datasets.load_from_disk(str(path)).to_list()
    if path.suffix == ".parquet" or path.is_dir():
        import pyarrow.parquet as pq

        return pq.read_table(str(path)).to_pylist()
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise MsmError(f"{path}:{n} is not valid JSON", "fix the line") from None
    return rows


def _file_id(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            digest.update(f.read_bytes())
    return "file:" + digest.hexdigest()[:16]


def load_corpus(ref: str, db) -> Source:
    """Texts of a warehouse corpus (by name or id) or of an exported file with a `text` column."""
    path = Path(ref)
    if path.exists():
        rows = _read_rows(path)
        if rows and "text" not in rows[0]:
            raise MsmError(f"corpus file {path} has no 'text' column (it has {', '.join(rows[0])})",
                           "export it with `msm corpus export` or add a text column")
        texts = [r["text"] for r in rows if isinstance(r.get("text"), str) and r["text"].strip()]
        source = Source("corpus", ref, _file_id(path), sorted({r.get("spec_version") for r in rows} - {None}), texts)
    else:
        from warehouse.db import connect

        if not Path(db).exists():
            raise MsmError(f"no corpus file or warehouse corpus named '{ref}'", "build one with `msm corpus build`, "
                           "or pass an exported file's path")
        con = connect(db, read_only=True)
        try:
            found = con.execute("SELECT corpus_id FROM corpora WHERE name = ? UNION ALL SELECT id FROM corpus_versions "
                                "WHERE id = ?", [ref, ref]).fetchall()
            if not found:
                raise MsmError(f"no corpus file or warehouse corpus named '{ref}'", "see `msm corpus list`, or pass a path")
            cid = found[0][0]
            rows = con.execute("SELECT d.text, d.spec_version FROM corpus_documents cd JOIN documents d "
                               "ON d.id = cd.document_id WHERE cd.corpus_id = ? ORDER BY sha256(d.id || ?)",
                               [cid, cid]).fetchall()
        finally:
            con.close()
        source = Source("corpus", ref, cid, sorted({v for _, v in rows}), [t for t, _ in rows])
    if not source.records:
        raise MsmError(f"corpus '{ref}' has no documents", "build or export a corpus with kept documents")
    return source


def load_demos(ref: str, db) -> Source:
    """{messages} records of a warehouse demo set (by name) or of a JSONL / HF export."""
    path = Path(ref)
    if path.exists():
        rows = _read_rows(path)
        source = Source("demos", ref, _file_id(path), sorted({r.get("spec_version") for r in rows} - {None}), rows)
    else:
        from warehouse.db import connect
        from warehouse.demos_store import demo_rows, demo_set_id, to_messages

        if not Path(db).exists():
            raise MsmError(f"no demos file or warehouse demo set named '{ref}'", "build one with `msm demos build`, "
                           "or pass an exported file's path")
        con = connect(db, read_only=True)
        try:
            try:
                set_id = demo_set_id(con, ref)
            except MsmError:
                raise MsmError(f"no demos file or warehouse demo set named '{ref}'",
                               "see `msm demos list`, or pass a path") from None
            rows = [to_messages(r) for r in demo_rows(con, set_id)]
        finally:
            con.close()
        source = Source("demos", ref, set_id, sorted({r["spec_version"] for r in rows}), rows)
    bad = next((i for i, r in enumerate(source.records) if not _is_chat(r)), None)
    if bad is not None:
        raise MsmError(f"demos '{ref}': record {bad + 1} is not {{messages: [{{role, content}}, ...]}}",
                       "export demos with `msm demos export`")
    if not source.records:
        raise MsmError(f"demos '{ref}' has no demonstrations", "build a demo set with kept demonstrations")
    return source


def _is_chat(record) -> bool:
    messages = record.get("messages") if isinstance(record, dict) else None
    return bool(messages) and all(isinstance(m, dict) and isinstance(m.get("content"), str) and
                                  m.get("role") in ("system", "user", "assistant") for m in messages)


# ---- documents ------------------------------------------------------------------------------------

@dataclass
class Packed:
    examples: list  # {input_ids, labels, segments}
    real_tokens: int  # positions holding a document token (or its EOS)
    total_positions: int

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.total_positions if self.total_positions else 0.0


TOKENIZE_CHUNK = 2000  # documents tokenized at once: the tokenizer's Python lists stay small


def _token_arrays(texts: list[str], tokenizer):
    """Each text's token ids as an int32 array, tokenized a chunk at a time: 40M tokens held as
    Python ints cost about 1.4 GB, as int32 160 MB."""
    import numpy as np

    out = []
    for at in range(0, len(texts), TOKENIZE_CHUNK):
        ids = tokenizer(texts[at:at + TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"]
        out += [np.asarray(doc, dtype=np.int32) for doc in ids]
    return out


def pack_documents(texts: list[str], tokenizer, max_len: int, packing: bool = True, seed: int = 0) -> Packed:
    """Packed sequences (packing) or one padded sequence per document, truncated to max_len.

    Rows are int32 arrays; packed rows are views into one token stream, so a 40M-token corpus's
    stream, labels and segments take about 0.5 GB (a 40M-token training run peaked at 2.06 GB in
    all, against 7.52 GB when they were Python lists)."""
    import numpy as np

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = np.asarray([tokenizer.eos_token_id], dtype=np.int32)
    docs = _token_arrays([texts[i] for i in order], tokenizer)
    examples = []
    if not packing:
        # One document per row needs no segments: collate gives such rows a 2-D padding mask, which
        # the attention kernels take as is, instead of a block-diagonal 4-D mask.
        for doc in docs:
            row = np.concatenate([doc, eos])[:max_len]
            examples.append({"input_ids": row, "labels": row.copy()})
        real = sum(len(e["input_ids"]) for e in examples)
        return Packed(examples, real, real)  # padding happens per batch; see collate's pad count
    lengths = np.asarray([len(d) + 1 for d in docs], dtype=np.int64)
    stream = np.concatenate([part for doc in docs for part in (doc, eos)]) if docs else np.zeros(0, np.int32)
    del docs
    segments = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    # a document's first token is not predicted from the one before it (another document), except
    # at a row's first position, which no label of the row predicts anyway
    labels = stream.copy()
    labels[starts[starts % max_len != 0]] = IGNORE
    for at in range(0, len(stream), max_len):
        examples.append({"input_ids": stream[at:at + max_len], "labels": labels[at:at + max_len],
                         "segments": segments[at:at + max_len]})
    return Packed(examples, len(stream), len(examples) * max_len)


# ---- chats -------------------------------------------------------------------------------------------

def chat_template(tokenizer) -> str:
    return tokenizer.chat_template or DEFAULT_TEMPLATE


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template(tokenizer), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def renders_reasoning(tokenizer) -> bool:
    """Whether the chat template renders an assistant message's `reasoning_content` (Qwen3's
    convention): a one-turn probe conversation is rendered once per template."""
    template = chat_template(tokenizer)
    if template not in _RENDERS_REASONING:
        probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": _PROBE}]
        try:
            text = _render(tokenizer, probe)
        except Exception:  # a template that cannot render the probe does not handle it either
            text = ""
        _RENDERS_REASONING[template] = _PROBE in text
    return _RENDERS_REASONING[template]


def chat_messages(record: dict, tokenizer, cot: bool) -> list[dict]:
    """The messages the template renders: role and content, and with `cot` each assistant turn's
    reasoning as `reasoning_content` (a template that renders it) or as the default `<think>`
    prefix (THINK_DEFAULT); see the module docstring."""
    native = cot and renders_reasoning(tokenizer)
    out = []
    for m in record["messages"]:
        reasoning = (m.get("reasoning") or m.get("reasoning_content")) if cot and m["role"] == "assistant" else None
        if not reasoning:
            out.append({"role": m["role"], "content": m["content"]})
        elif native:
            out.append({"role": "assistant", "content": m["content"], "reasoning_content": reasoning})
        else:
            out.append({"role": "assistant", "content": THINK_DEFAULT.format(reasoning=reasoning) + m["content"]})
    return out


def render_chat(record: dict, tokenizer, cot: bool = False) -> str:
    """A conversation's training text, as encode_chats renders it."""
    return _render(tokenizer, chat_messages(record, tokenizer, cot))


@dataclass
class ChatSet:
    examples: list  # {input_ids, labels}
    truncated: int  # examples cut to max_len that kept some assistant tokens
    dropped: int  # examples whose assistant tokens were all beyond max_len


def with_system(records: list[dict], system_prompt: str | None) -> list[dict]:
    """Each conversation opened by `system_prompt`, unless it has a system turn of its own."""
    if not system_prompt:
        return records
    return [r if r["messages"][0]["role"] == "system" else
            {**r, "messages": [{"role": "system", "content": system_prompt}, *r["messages"]]} for r in records]


def encode_chats(records: list[dict], tokenizer, max_len: int, cot: bool = False) -> ChatSet:
    """Token ids and labels: only the assistant turns' content (and end-of-turn) are targets.

    The assistant spans are found by rendering the conversation up to each turn, so they hold
    for any template that renders a prefix of a conversation as a prefix of its text (checked).
    An example longer than max_len is truncated at the end and counted; one with no assistant
    token left is dropped and counted.
    """
    examples, truncated, dropped = [], 0, 0
    for record in records:
        messages = chat_messages(record, tokenizer, cot)
        full = _render(tokenizer, messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _render(tokenizer, messages[:i], add_generation_prompt=True)
            after = _render(tokenizer, messages[:i + 1])
            if not full.startswith(after) or not after.startswith(before):
                raise MsmError("the tokenizer's chat template does not render a conversation's prefix as a prefix",
                               "give the tokenizer a ChatML-like template, or train this model with a default one")
            spans.append((len(before), len(after.rstrip("\n"))))
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [t if any(a <= s and e <= b and e > s for a, b in spans) else IGNORE
                  for t, (s, e) in zip(ids, enc["offset_mapping"])]
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            if all(label == IGNORE for label in labels):
                dropped += 1
                continue
            truncated += 1
        examples.append({"input_ids": ids, "labels": labels})
    return ChatSet(examples, truncated, dropped)


# ---- batches -----------------------------------------------------------------------------------------

def collate(examples: list[dict], pad_id: int):
    """Right-padded tensors. With segments (documents), a block-diagonal causal mask and position
    ids that restart per document; without, a plain padding mask."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        labels[i, :len(e["labels"])] = torch.tensor(e["labels"])
    if "segments" not in examples[0]:
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, e in enumerate(examples):
            mask[i, :len(e["input_ids"])] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "real_tokens": int(mask.sum())}
    segments = torch.full((n, width), -1, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        seg = torch.tensor(e["segments"])
        segments[i, :len(seg)] = seg
        starts = torch.ones(len(seg), dtype=torch.bool)
        starts[1:] = seg[1:] != seg[:-1]
        index = torch.arange(len(seg))
        first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=0).values
        positions[i, :len(seg)] = index - first
    causal = torch.tril(torch.ones((width, width), dtype=torch.bool))
    same = segments[:, :, None] == segments[:, None, :]
    allowed = same & causal & (segments[:, :, None] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # a pad position attends to itself: no empty rows
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": allowed[:, None],
            "real_tokens": int((segments >= 0).sum())}


