"""Per-sample losses: batched, length-sorted and padded must equal a plain batch-1 reference."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from helpers import TASK_SPEC, write_train
from ordermerge.data.formatting import encode_example
from ordermerge.data.prepare import read_jsonl
from ordermerge.scoring.losses import load_model, per_sample_losses, sample_losses_stage


@pytest.fixture(scope="module")
def tiny(tiny_base_f32, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {"base": tiny_base_f32, "train": write_train(d / "train.jsonl", 11)}


def reference_losses(model, tokenizer, records: list[dict]) -> list[float]:
    """One sample at a time, full logits from the model's own forward: no padding, no shortcuts."""
    out = []
    with torch.no_grad():
        for r in records:
            e = encode_example(tokenizer, r["prompt"], r["response"], None, TASK_SPEC["max_length"])
            logits = model(torch.tensor([e["input_ids"]])).logits[0, :-1].float()
            targets = torch.tensor(e["labels"][1:])
            out.append(float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)))
    return out


@pytest.mark.parametrize("batch_size", [1, 4, 11])
def test_batched_losses_equal_batch_one_reference(tiny, batch_size):
    model, tokenizer = load_model(tiny["base"])
    records = read_jsonl(tiny["train"])
    lengths = [len(encode_example(tokenizer, r["prompt"], r["response"], None, 96)["input_ids"]) for r in records]
    assert len(set(lengths)) > 3 and lengths != sorted(lengths)  # sorting and padding really happen
    rows = per_sample_losses(model, tokenizer, records, TASK_SPEC, batch_size)
    assert [r["sample_id"] for r in rows] == [r["sample_id"] for r in records]
    assert [r["row"] for r in rows] == list(range(len(records)))
    ref = reference_losses(model, tokenizer, records)
    assert [r["loss"] for r in rows] == pytest.approx(ref, abs=1e-5)
    assert len({round(r["loss"], 6) for r in rows}) == len(rows)  # distinct: a mix-up would show


def test_sample_losses_stage_writes_every_split(tiny, tmp_path):
    out = tmp_path / "losses.csv"
    df = sample_losses_stage(tiny["base"], {"train": str(tiny["train"])}, TASK_SPEC, 3, out)
    assert out.exists() and len(pd.read_csv(out)) == len(df) == 11
    assert set(df["split"]) == {"train"} and (df["tokens"] > 0).all()
