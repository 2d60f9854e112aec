"""Packed (padding-free) batches equal padded ones: token losses, per-sample losses and gradients.

The packed row carries no attention mask; transformers builds a block-diagonal mask from the
restarting position ids. These tests prove it rather than assume it: a packed sample's loss equals
the same sample run alone, for samples of very different lengths.
"""

from __future__ import annotations

import pytest
import torch

from helpers import write_train
from ordermerge.batching import collate, collate_packed, per_sample_sums, token_losses
from ordermerge.data.formatting import IGNORE_INDEX
from ordermerge.data.prepare import read_jsonl
from ordermerge.scoring.losses import load_model, per_sample_losses
from ordermerge.train.loop import backward_batch

TASK = {"max_length": 256}


@pytest.fixture(scope="module")
def model_tok(tiny_base_f32):
    model, tok = load_model(tiny_base_f32, "float32", "cpu")
    return model, tok


def uneven_examples(vocab: int) -> list[dict]:
    """Lengths 3, 61, 7, 40: first label IGNORE, some prompt tokens unscored, the rest scored."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (3, 61, 7, 40):
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 3 + 1) + ids[n // 3 + 1 :]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_collate_packed_layout():
    ex = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    b = collate_packed(ex)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # never a target across the boundary
    assert "attention_mask" not in b


def test_packed_losses_equal_padded_and_alone(model_tok):
    model, tok = model_tok
    ex = uneven_examples(model.config.vocab_size)
    with torch.no_grad():
        lp, sp = token_losses(model, collate(ex, tok.pad_token_id))
        lk, sk = token_losses(model, packed := collate_packed(ex))
        alone = [token_losses(model, collate([e], tok.pad_token_id))[0].sum() for e in ex]
    sums_p, counts_p = per_sample_sums(lp, sp, {})
    sums_k, counts_k = per_sample_sums(lk, sk, packed)
    assert counts_p.tolist() == counts_k.tolist()
    torch.testing.assert_close(sums_k, sums_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums_k, torch.stack(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lk.sum(), lp.sum(), rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_padded(model_tok):
    model, tok = model_tok
    ex = uneven_examples(model.config.vocab_size)
    n_scored = sum(sum(1 for y in e["labels"][1:] if y >= 0) for e in ex)
    grads, losses = [], []
    for packing in (False, True):
        model.zero_grad(set_to_none=True)
        losses.append(
            backward_batch(model, ex, 2, tok.pad_token_id, n_scored, torch.device("cpu"), False, packing=packing)
        )
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_per_sample_losses_packed_equal_padded(model_tok, tmp_path):
    model, tok = model_tok
    records = read_jsonl(write_train(tmp_path / "train.jsonl", 9))
    padded = per_sample_losses(model, tok, records, TASK, 4)
    packed = per_sample_losses(model, tok, records, TASK, 4, packing=True)
    assert [r["sample_id"] for r in packed] == [r["sample_id"] for r in padded]
    assert [r["tokens"] for r in packed] == [r["tokens"] for r in padded]
    for a, b in zip(padded, packed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
