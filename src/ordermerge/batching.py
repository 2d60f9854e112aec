"""Padding-aware collation of tokenised examples into tensors."""

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


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [B, T-1] (0 where unscored) and the scored-token mask.

    The vocabulary projection runs only at scored positions: with a 49k vocabulary and the loss
    on responses only, that skips a large share of the forward and backward work on prompts.
    """
    body = getattr(model, model.base_model_prefix)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][scored]).float()
    per_token = torch.nn.functional.cross_entropy(logits, targets[scored], reduction="none")
    loss = torch.zeros(targets.shape, dtype=per_token.dtype, device=per_token.device)
    loss[scored] = per_token
    return loss, scored
