"""Collation of tokenised examples into tensors: padded rows, or one packed row without padding."""

from __future__ import annotations

import torch

from ordermerge.data.formatting import IGNORE_INDEX


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions are masked and never scored."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Concatenate the examples, in order, into ONE row with position ids restarting at 0 per example.

    With no attention mask, transformers (masking_utils.find_packed_sequence_indices) reads the
    restarts as sample boundaries and confines attention to each sample (sdpa/eager; only without a
    KV cache, hence use_cache=False in token_losses, tested in test_packing.py), so no token is
    padding. The first label of every sample is set to IGNORE_INDEX so a target is never predicted
    across a boundary (prompt tokens are unscored anyway). ``lengths`` lets callers split per sample.
    """
    ids, pos, labels = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        ids += e["input_ids"]
        pos += range(n)
        labels += [IGNORE_INDEX] + list(e["labels"][1:n])
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "lengths": torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.long),
    }


def collate_for(packing: bool):
    """The collate function of a ``train.packing`` setting."""
    return collate_packed if packing else collate


def per_sample_sums(losses: torch.Tensor, scored: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token loss and scored-token count of every sample, for padded or packed batches."""
    if "lengths" not in batch:
        return losses.sum(1), scored.sum(1)
    sample = torch.repeat_interleave(torch.arange(len(batch["lengths"])), batch["lengths"].cpu())[1:]
    sums = torch.zeros(len(batch["lengths"]), dtype=losses.dtype).index_add_(0, sample, losses[0].cpu())
    counts = torch.zeros(len(batch["lengths"]), dtype=torch.long).index_add_(0, sample, scored[0].long().cpu())
    return sums, counts


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [B, T-1] (0 where unscored) and the scored-token mask; packed: B = 1.

    The vocabulary projection runs only at scored positions: with a 49k vocabulary and the loss
    on responses only, that skips a large share of the forward and backward work on prompts.
    """
    body = getattr(model, model.base_model_prefix)
    if "position_ids" in batch:  # packed: no mask and no cache, so transformers confines attention to each sample
        hidden = body(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).last_hidden_state
    else:
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][scored]).float()
    per_token = torch.nn.functional.cross_entropy(logits, targets[scored], reduction="none")
    loss = torch.zeros(targets.shape, dtype=per_token.dtype, device=per_token.device)
    loss[scored] = per_token
    return loss, scored
