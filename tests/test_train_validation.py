"""Training settings are typed and range-checked before anything is written; duplicate YAML keys are
refused; a non-finite loss stops the run with one line and marks it failed (issue 20, case 5)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from tests.conftest import assert_one_line_error, run_msm
from tests.test_train import config, save


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its sha256: equal snapshots mean nothing was written."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def stage(i: int, **change):
    return lambda raw: raw["stages"][i].update(change)


@pytest.mark.parametrize("change, needles", [
    (stage(0, lr=float("nan")), ["stages[0]: 'lr' is nan", "finite learning rate"]),
    (stage(0, lr=float("inf")), ["'lr' is inf", "finite learning rate"]),
    (stage(1, lr=-1e-4), ["stages[1]: 'lr' is -0.0001", "above 0"]),
    (stage(0, lr=0), ["'lr' is 0.0"]),
    (stage(0, lr=10**400), ["'lr' is 1000", "too large"]),
    (stage(0, max_len=10**20), ["'max_len' is 100000000000000000000", "at most 1,048,576"]),
    (stage(0, max_len=2.5), ["'max_len' must be int, got 2.5"]),
    (stage(0, batch_size=True), ["'batch_size' must be int, got True"]),
    (stage(0, epochs=0), ["'epochs' is 0", "use 1 or more"]),
    (stage(0, warmup=float("nan")), ["'warmup' is nan", "[0, 1)"]),
    (stage(0, weight_decay=float("-inf")), ["'weight_decay' is -inf"]),
    (stage(0, max_grad_norm=-1.0), ["'max_grad_norm' is -1.0"]),
    (lambda raw: raw["adapter"].update(dropout=1.5), ["adapter: 'dropout' is 1.5", "[0, 1)"]),
    (lambda raw: raw.update(seed=2**40), ["'seed' is 1099511627776", "at most 4,294,967,295"]),
    (lambda raw: raw.update(seed=-1), ["'seed' is -1", "use 0 or more"]),
])
def test_bad_numbers_are_one_line_and_write_nothing(tmp_path, isolated_home, change, needles):
    raw = config(tmp_path)
    change(raw)
    path = save(tmp_path, raw)
    before = snapshot(tmp_path)
    assert_one_line_error(run_msm("train", "run", str(path)), *needles)
    assert snapshot(tmp_path) == before  # no warehouse, no run folder, nothing else
    assert not isolated_home.exists()


def test_duplicate_yaml_keys_are_refused(tmp_path, isolated_home):
    raw = config(tmp_path)
    text = yaml.safe_dump(raw, sort_keys=False)
    text = text.replace("  lr: 0.01\n", "  lr: 0.01\n  lr: 1.0e-05\n", 1)  # the first stage's lr, twice
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    before = snapshot(tmp_path)
    line = assert_one_line_error(run_msm("train", "run", str(path)), "key 'lr' is given twice", "keep one")
    assert "(lines " in line
    assert snapshot(tmp_path) == before and not isolated_home.exists()
    top = tmp_path / "dup_top.yaml"
    top.write_text(yaml.safe_dump(raw, sort_keys=False) + "seed: 1\nseed: 2\n")
    assert_one_line_error(run_msm("train", "run", str(top)), "key 'seed' is given twice")


def test_max_len_beyond_the_models_context_window(tmp_path, isolated_home):
    raw = config(tmp_path)
    raw["stages"][1]["max_len"] = 4096  # tiny-random reads 512 positions
    path = save(tmp_path, raw)
    before = snapshot(tmp_path)
    assert_one_line_error(run_msm("train", "run", str(path)), "stages[1]: 'max_len' is 4096",
                          "tiny-random's context window (512 tokens)", "use at most 512")
    assert snapshot(tmp_path) == before and not isolated_home.exists()  # no train_runs row, no run folder


def test_a_non_finite_loss_stops_the_run_and_marks_it_failed(tmp_path, isolated_home):
    import duckdb
    import torch

    from msm.tiny import tiny_causal_lm

    model, tokenizer = tiny_causal_lm()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every forward pass now gives a NaN loss
    base = tmp_path / "nan-model"
    model.save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    raw = config(tmp_path, base_model=str(base))
    out = run_msm("train", "run", str(save(tmp_path, raw)), "--no-progress", timeout=300)
    line = assert_one_line_error(out, "midtrain: the loss is nan at step 1", "marked failed", "lower lr")
    assert "Traceback" not in out.stdout
    con = duckdb.connect(str(isolated_home / "msm.duckdb"), read_only=True)
    assert con.execute("SELECT status, count(*) FROM train_runs GROUP BY 1").fetchall() == [("failed", 1)]
    con.close()
    run = Path(raw["output_dir"])
    # nothing half-written: no finished stage, no weights, no card; the log has no step
    assert not (run / "midtrain" / "done.json").exists() and not (run / "midtrain" / "adapter").exists()
    assert not (run / "card.json").exists() and not (run / "midtrain" / "checkpoints").exists()
    assert not (run / "midtrain" / "log.jsonl").exists() or (run / "midtrain" / "log.jsonl").read_text() == ""
    assert line
