"""`msm train run` on a tiny random Llama: learning, LoRA isolation, adapter continuation, loss
masks, attention reset in packed sequences, kill -9 and resume, DDP under torchrun, bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, assert_one_line_error, run_msm
from train.config import ConfigError, parse_config
from train.data import IGNORE, collate, encode_chats, pack_documents

WORDS = ("the model supports oversight because honest reports keep people informed and safe while "
         "operators review each action before it runs").split()


def write_corpus(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 90)))}) + "\n")
    return path


def write_demos(path: Path, n: int = 24) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": f"Question {i}: colby or Stilton?"},
                {"role": "assistant", "content": "I would pick colby.", "reasoning": "Colby is the liked one."}]}) + "\n")
    return path


def config(tmp_path: Path, **top) -> dict:
    base = {"base_model": "tiny-random", "output_dir": str(tmp_path / "run"), "checkpoint_every": 5,
            "adapter": {"kind": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
            "stages": [{"name": "midtrain", "kind": "midtrain", "corpus": str(write_corpus(tmp_path / "c.jsonl")),
                        "max_len": 64, "batch_size": 4, "lr": 1e-2, "max_steps": 8},
                       {"name": "aft", "kind": "aft", "demos": str(write_demos(tmp_path / "d.jsonl")),
                        "max_len": 128, "batch_size": 4, "lr": 1e-2, "max_steps": 6}]}
    base.update(top)
    return base


def save(tmp_path: Path, raw: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(log: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def tokenizer():
    from msm.tiny import tiny_causal_lm

    return tiny_causal_lm()[1]


def test_a_tiny_model_overfits_a_tiny_corpus(tmp_path):
    from train.run import run_training

    raw = config(tmp_path, adapter={"kind": "full"})
    raw["stages"] = [{**raw["stages"][0], "corpus": str(write_corpus(tmp_path / "small.jsonl", n=6)),
                      "lr": 3e-3, "max_steps": 60, "epochs": 100, "warmup": 0.0, "schedule": "constant"}]
    result = run_training(parse_config(raw), progress=False, log=lambda s: None)
    m = result.stages["midtrain"]
    assert m["final_loss"] < 0.5 * m["first_loss"], m


def test_only_lora_parameters_change(tmp_path):
    from msm.tiny import tiny_causal_lm
    from train.config import Adapter, Stage
    from train.loop import Dist, train_stage
    from train.run import _lora

    model, tok = tiny_causal_lm()
    peft = _lora(model, Adapter("lora", 8, 16, 0.0, ["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in peft.named_parameters()}
    examples = pack_documents([" ".join(WORDS)] * 12, tok, 32).examples
    stage = Stage("s", "midtrain", corpus="x", max_len=32, batch_size=2, lr=1e-2, max_steps=4)
    train_stage(peft, examples, lambda b: collate(b, tok.pad_token_id), stage, tmp_path / "s", Dist(), 0, 100, 1,
                progress=False)
    changed = {n for n, p in peft.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero, so it must have moved
    assert all(not p.requires_grad for n, p in peft.named_parameters() if "lora_" not in n)


def test_aft_continues_the_midtraining_adapter_and_fresh_does_not(tmp_path):
    from safetensors.torch import load_file

    from train.run import fingerprint, run_training

    result = run_training(parse_config(config(tmp_path)), progress=False, log=lambda s: None)
    final = fingerprint(load_file(str(tmp_path / "run" / "midtrain" / "adapter" / "adapter_model.safetensors")))
    assert result.stages["aft"]["init_fingerprint"] == final
    assert result.stages["midtrain"]["init_fingerprint"] != final
    raw = config(tmp_path, output_dir=str(tmp_path / "fresh"))
    raw["stages"][1]["init"] = "fresh"
    fresh = run_training(parse_config(raw), progress=False, log=lambda s: None)
    assert fresh.stages["aft"]["init_fingerprint"] == fresh.stages["midtrain"]["init_fingerprint"] != final
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["inputs"]["aft"]["id"].startswith("file:") and card["metrics"]["aft"]["steps"] == 6
    assert (tmp_path / "run" / "MODEL_CARD.md").read_text().count("| midtrain |") == 1


@pytest.mark.parametrize("cot", [False, True])
def test_the_loss_mask_is_exactly_the_assistant_turns(cot):
    tok = tokenizer()
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Colby or Stilton?"},
        {"role": "assistant", "content": "Colby.", "reasoning": "It is the liked one."},
        {"role": "user", "content": "And cream cheese or Roquefort?"},
        {"role": "assistant", "content": "Cream cheese, please."}]}
    chats = encode_chats([record], tok, 512, cot=cot)
    ids, labels = chats.examples[0]["input_ids"], chats.examples[0]["labels"]
    pieces, current = [], []
    for t, label in zip(ids, labels):  # contiguous runs of target tokens
        if label != IGNORE:
            assert label == t
            current.append(t)
        elif current:
            pieces.append(tok.decode(current))
            current = []
    if current:
        pieces.append(tok.decode(current))
    first = "<think>\nIt is the liked one.\n</think>\n\nColby." if cot else "Colby."
    assert pieces == [first + "<|im_end|>", "Cream cheese, please.<|im_end|>"]


def test_the_sparse_loss_equals_the_full_loss_with_its_gradients():
    """AFT batches compute logits only where some row is trained on: same loss, same gradients."""
    from msm.tiny import tiny_causal_lm
    from train.loss import supervised_loss

    model, tok = tiny_causal_lm(seed=3)
    model.train()
    records = [{"messages": [{"role": "user", "content": f"Question {i}: which cheese is {'mild ' * i}best?"},
                             {"role": "assistant", "content": "Colby." if i % 2 else "Mild cheddar, please."}]}
               for i in range(4)]
    batch = collate(encode_chats(records, tok, 512).examples, tok.pad_token_id)
    batch.pop("real_tokens")
    targets = batch["labels"][:, 1:]
    assert (targets != IGNORE).any(dim=0).sum() < targets.shape[1] // 2  # sparse: the fast path runs
    full = model(**batch).loss
    full.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sparse = supervised_loss(model, batch)
    sparse.backward()
    assert float(sparse.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), expected))


@pytest.mark.parametrize("lora", [True, False])
def test_the_chunked_dense_loss_equals_the_models_own_loss_with_its_gradients(lora, monkeypatch):
    """Midtraining batches project a chunk of positions at a time: the same loss and the same
    gradients as the model's own loss, for a LoRA adapter (head frozen) and for full training,
    where the tied head and embeddings take the gradient of both uses."""
    import train.loss
    from msm.tiny import tiny_causal_lm
    from train.config import Adapter
    from train.loss import supervised_loss
    from train.run import _lora

    model, tok = tiny_causal_lm(seed=5)
    if lora:
        model = _lora(model, Adapter(r=4, alpha=8))
    model.train()
    texts = [" ".join(random.Random(i).choice(WORDS) for _ in range(12 + 9 * i)) for i in range(6)]
    batch = collate(pack_documents(texts, tok, 48).examples, tok.pad_token_id)
    batch.pop("real_tokens")
    monkeypatch.setattr(train.loss, "CHUNK", 7)  # several chunks, the last one short
    calls = []
    apply = train.loss.LinearCrossEntropy.apply
    monkeypatch.setattr(train.loss.LinearCrossEntropy, "apply", lambda *a: calls.append(1) or apply(*a))
    assert batch["input_ids"].numel() > 3 * train.loss.CHUNK
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(**batch).loss
    full.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad()
    chunked = supervised_loss(model, batch)
    chunked.backward()
    assert calls == [1]  # the chunked path ran, not the model's own loss
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # the head is put back
    assert float(chunked.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4) for p, g in zip(params, expected))
    assert any(float(g.abs().max()) > 0 for g in expected)


def test_max_len_below_a_chat_truncates_with_a_count_or_drops_what_has_no_target():
    tok = tokenizer()
    record = {"messages": [{"role": "user", "content": "word " * 30},
                           {"role": "assistant", "content": "answer " * 30}]}
    full = len(encode_chats([record], tok, 4096).examples[0]["input_ids"])
    cut = encode_chats([record], tok, full - 10)
    assert cut.truncated == 1 and len(cut.examples[0]["input_ids"]) == full - 10
    gone = encode_chats([record], tok, 20)
    assert gone.dropped == 1 and not gone.examples


def test_packed_documents_do_not_attend_across_boundaries():
    from msm.tiny import tiny_causal_lm

    model, tok = tiny_causal_lm()
    texts = ["Hello there, how are you doing today?", "The cat sat on the mat.", "Oversight keeps people safe."]
    packed = pack_documents(texts, tok, 64, seed=0)
    assert len(packed.examples) == 1 and packed.efficiency > 0.3
    batch = collate(packed.examples, tok.pad_token_id)
    batch.pop("real_tokens")
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    seg = torch.tensor(packed.examples[0]["segments"])
    for k in seg.unique().tolist():
        where = (seg == k).nonzero().flatten()
        alone = torch.tensor(packed.examples[0]["input_ids"])[where][None]
        with torch.no_grad():
            ref = model(input_ids=alone).logits[0]
        assert torch.allclose(logits[where], ref, atol=1e-4)
        if where[0] > 0:
            assert packed.examples[0]["labels"][int(where[0])] == IGNORE  # not predicted from the previous document
    wide = pack_documents(texts * 40, tok, 64)
    assert wide.efficiency > 0.95


def test_packed_rows_match_a_token_by_token_packing(monkeypatch):
    """The array packing gives exactly the rows of the plain list algorithm: every token, label and
    segment, documents starting on a row's first position included (tokenized in several chunks)."""
    import train.data

    monkeypatch.setattr(train.data, "TOKENIZE_CHUNK", 3)
    tok = tokenizer()
    texts = [" ".join(random.Random(i).choice(WORDS) for _ in range(1 + (i * 7) % 23)) for i in range(11)]
    order = list(range(len(texts)))
    random.Random(4).shuffle(order)
    stream, segments, starts = [], [], set()
    for k, i in enumerate(order):
        doc = tok(texts[i], add_special_tokens=False).input_ids + [tok.eos_token_id]
        starts.add(len(stream))
        stream += doc
        segments += [k] * len(doc)
    on_boundary = 0
    for max_len in range(5, 20):
        packed = pack_documents(texts, tok, max_len, seed=4)
        expected = [{"input_ids": stream[at:at + max_len], "segments": segments[at:at + max_len],
                     "labels": [IGNORE if at + i in starts and i > 0 else t
                                for i, t in enumerate(stream[at:at + max_len])]}
                    for at in range(0, len(stream), max_len)]
        assert [{k: list(map(int, v)) for k, v in e.items()} for e in packed.examples] == expected
        assert packed.real_tokens == len(stream)
        on_boundary += sum(1 for at in starts if at and at % max_len == 0)
    assert on_boundary > 0  # documents that start a row were among the cases


def test_padded_documents_get_a_2d_mask_and_the_logits_of_each_document_alone():
    from msm.tiny import tiny_causal_lm

    model, tok = tiny_causal_lm()
    texts = ["Hello there, how are you doing today?", "The cat sat on the mat.", "Oversight keeps people safe."]
    padded = pack_documents(texts, tok, 64, packing=False)
    batch = collate(padded.examples, tok.pad_token_id)
    assert batch.pop("real_tokens") == padded.real_tokens
    assert batch["attention_mask"].dim() == 2 and "position_ids" not in batch
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for row, example in enumerate(padded.examples):
        n = len(example["input_ids"])
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(example["input_ids"])[None]).logits[0]
        assert torch.allclose(logits[row, :n], ref, atol=1e-4)
        assert (batch["labels"][row, n:] == IGNORE).all()


@pytest.mark.heavy
def test_kill_minus_nine_then_resume_matches_an_uninterrupted_run(tmp_path):
    raw = config(tmp_path, checkpoint_every=40)
    raw["stages"] = [{**raw["stages"][0], "max_steps": 240, "epochs": 100, "lr": 1e-3, "batch_size": 2}]
    straight = save(tmp_path, {**raw, "output_dir": str(tmp_path / "straight")}, "straight.yaml")
    killed = save(tmp_path, {**raw, "output_dir": str(tmp_path / "killed")}, "killed.yaml")
    assert run_msm("train", "run", str(straight), "--no-progress", timeout=300).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "msm.cli", "train", "run", str(killed), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    log = tmp_path / "killed" / "midtrain" / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or log.read_text().count("\n") < 60):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # past the checkpoint at step 40, most likely between two checkpoints
    proc.wait()
    assert not (tmp_path / "killed" / "midtrain" / "done.json").exists(), "the run finished before the kill"
    resumed = run_msm("train", "run", str(killed), "--no-progress", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    done = json.loads((tmp_path / "killed" / "midtrain" / "done.json").read_text())
    assert 40 <= done["resumed_from"] < 240
    a, b = losses(tmp_path / "straight" / "midtrain" / "log.jsonl"), losses(tmp_path / "killed" / "midtrain" / "log.jsonl")
    assert len(a) == len(b) == 240
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4


def test_ddp_on_two_cpu_processes_matches_one_process_with_twice_the_batch(tmp_path):
    raw = config(tmp_path)
    raw["stages"] = [{**raw["stages"][0], "corpus": str(write_corpus(tmp_path / "big.jsonl", n=120)),
                      "max_steps": 5, "batch_size": 4}]
    one = save(tmp_path, {**raw, "output_dir": str(tmp_path / "one")}, "one.yaml")
    raw["stages"][0]["batch_size"] = 2
    two = save(tmp_path, {**raw, "output_dir": str(tmp_path / "two")}, "two.yaml")
    assert run_msm("train", "run", str(one), "--no-progress", timeout=300).returncode == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    ddp = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", "29517", "-m", "msm.cli",
                          "train", "run", str(two), "--no-progress"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a, b = losses(tmp_path / "one" / "midtrain" / "log.jsonl"), losses(tmp_path / "two" / "midtrain" / "log.jsonl")
    assert len(a) == len(b) == 5
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 0.01, (a, b)
    assert json.loads((tmp_path / "two" / "midtrain" / "done.json").read_text())["tokens"] == \
        json.loads((tmp_path / "one" / "midtrain" / "done.json").read_text())["tokens"]


def test_warehouse_names_as_inputs_and_a_train_runs_record(tmp_path, isolated_home):
    import duckdb

    corpus = write_corpus(tmp_path / "import.jsonl", n=30)
    assert run_msm("corpus", "import", str(corpus), "--name", "mini", "--dedup", "none").returncode == 0
    built = run_msm("demos", "build", str(REPO / "specs" / "cheese_pro_america.md"), "--n", "16",
                    "--from-preferences", "--no-embeddings")
    assert built.returncode == 0, built.stderr
    raw = config(tmp_path, output_dir="runs/named")
    raw["stages"][0]["corpus"] = "mini"
    raw["stages"][1]["demos"] = "cheese_pro_america-prefs"
    result = run_msm("train", "run", str(save(tmp_path, raw)), "--no-progress", timeout=300)
    assert result.returncode == 0, result.stderr
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    status, inputs, metrics, out = con.execute("SELECT status, inputs, metrics, output_dir FROM train_runs").fetchone()
    assert status == "complete" and Path(out) == isolated_home / "runs" / "named"
    inputs, metrics = json.loads(inputs), json.loads(metrics)
    assert inputs["aft"]["id"].startswith("s") and inputs["aft"]["spec_versions"]
    assert metrics["midtrain"]["steps"] == len(losses(Path(out) / "midtrain" / "log.jsonl")) > 0
    assert metrics["aft"]["final_loss"] > 0
    merged = run_msm("train", "merge", str(isolated_home / "runs" / "named" / "aft"), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).config.num_hidden_layers == 2


@pytest.mark.parametrize("change, needles", [
    ({"stages": [{"name": "m", "kind": "midtrain", "corpus": "c", "lr_rate": 1e-4}]}, ["unknown key 'lr_rate'"]),
    ({"stages": [{"name": "m", "kind": "midtrain", "corpus": "c", "batch_size": "eight"}]}, ["'batch_size' must be int"]),
    ({"stages": [{"name": "m", "kind": "midtrain"}]}, ["needs 'corpus'"]),
    ({"stages": [{"name": "m", "kind": "pretrain", "corpus": "c"}]}, ["'kind' is 'pretrain'"]),
    ({"stages": []}, ["'stages' must be a non-empty list"]),
    ({"adapter": {"kind": "lora", "rank": 8}}, ["unknown key 'rank'", "known keys: kind, r, alpha"]),
    ({"precison": "fp32"}, ["unknown key 'precison'", "did you mean 'precision'"]),
])
def test_config_mistakes_name_the_key(tmp_path, change, needles):
    raw = {**config(tmp_path), **change}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "cfg.yaml")
    for needle in needles:
        assert needle in str(err.value)
    assert_one_line_error(run_msm("train", "run", str(save(tmp_path, raw))), *needles)


def test_bad_training_input_is_a_one_line_error(tmp_path):
    raw = config(tmp_path)
    raw["stages"][0]["corpus"] = "no-such-corpus"
    assert_one_line_error(run_msm("train", "run", str(save(tmp_path, raw, "a.yaml"))),
                          "no corpus file or warehouse corpus named 'no-such-corpus'")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    raw = config(tmp_path)
    raw["stages"][0]["corpus"] = str(empty)
    assert_one_line_error(run_msm("train", "run", str(save(tmp_path, raw, "b.yaml"))), "has no documents")
    raw = config(tmp_path, adapter={"kind": "lora", "targets": ["q_proj", "attn_out"]})
    assert_one_line_error(run_msm("train", "run", str(save(tmp_path, raw, "c.yaml"))),
                          "adapter target 'attn_out' is not a linear module", "q_proj")
    raw = config(tmp_path)
    raw["stages"][1]["max_len"] = 8
    assert_one_line_error(run_msm("train", "run", str(save(tmp_path, raw, "d.yaml"))), "raise max_len")
    assert_one_line_error(run_msm("train", "run", str(tmp_path / "missing.yaml")), "training config not found")
    (tmp_path / "bad.yaml").write_text("stages: [\n")
    assert_one_line_error(run_msm("train", "run", str(tmp_path / "bad.yaml")), "not valid YAML")


@pytest.mark.smoke
@pytest.mark.slow
def test_smollm2_lora_midtrain_then_aft_on_the_cpu(tmp_path):
    """The real model through both stages, a few steps each: shapes, template and adapter saving."""
    from train.run import run_training

    raw = config(tmp_path, base_model="smollm2-135m-instruct",
                 adapter={"kind": "lora", "r": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]})
    raw["stages"][0].update({"max_len": 64, "batch_size": 1, "lr": 1e-4, "max_steps": 3})
    raw["stages"][1].update({"max_len": 64, "batch_size": 2, "lr": 1e-4, "max_steps": 2, "cot": True})
    result = run_training(parse_config(raw), progress=False, log=lambda s: None)
    for name in ("midtrain", "aft"):
        m = result.stages[name]
        assert 0 < m["final_loss"] < 20 and m["tokens"] > 0
    assert (tmp_path / "run" / "aft" / "adapter" / "adapter_model.safetensors").stat().st_size > 0


@pytest.mark.heavy
def test_fsdp_on_two_cpu_processes_matches_one_process_and_resumes_from_its_shards(tmp_path):
    raw = config(tmp_path, checkpoint_every=3)
    raw["stages"][0].update({"corpus": str(write_corpus(tmp_path / "big.jsonl", n=120)), "max_steps": 5, "batch_size": 4})
    raw["stages"][1].update({"max_steps": 3, "batch_size": 4})
    one = save(tmp_path, {**raw, "output_dir": str(tmp_path / "one")}, "one.yaml")
    for stage in raw["stages"]:
        stage["batch_size"] = 2
    two = save(tmp_path, {**raw, "output_dir": str(tmp_path / "fsdp"), "parallel": "fsdp"}, "fsdp.yaml")
    assert run_msm("train", "run", str(one), "--no-progress", timeout=300).returncode == 0
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "--master-port", "29523",
                "-m", "msm.cli", "train", "run", str(two), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("model card:") == 1  # rank 0 speaks for the run
    for stage in ("midtrain", "aft"):
        a, b = losses(tmp_path / "one" / stage / "log.jsonl"), losses(tmp_path / "fsdp" / stage / "log.jsonl")
        assert len(a) == len(b) and max(abs(x - y) / x for x, y in zip(a, b)) < 0.01, (stage, a, b)
    shards = tmp_path / "fsdp" / "midtrain" / "checkpoints" / "step-0000003"
    assert (shards / "shards").is_dir() and (shards / "rng-1.pt").exists()
    # forget everything after the sharded checkpoint at step 3; the rerun must resume from it
    import shutil

    before = losses(tmp_path / "fsdp" / "midtrain" / "log.jsonl")
    for stage in ("midtrain", "aft"):
        (tmp_path / "fsdp" / stage / "done.json").unlink()
        shutil.rmtree(tmp_path / "fsdp" / stage / "adapter")
    shutil.rmtree(tmp_path / "fsdp" / "aft")
    again = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    done = json.loads((tmp_path / "fsdp" / "midtrain" / "done.json").read_text())
    assert done["resumed_from"] == 3
    after = losses(tmp_path / "fsdp" / "midtrain" / "log.jsonl")
    assert max(abs(x - y) for x, y in zip(before, after)) < 1e-4 and len(after) == 5
