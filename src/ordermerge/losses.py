"""The sample-losses stage: the mean response-token loss of every sample under one checkpoint.

Batched and length-sorted (little padding); padding never changes a sample's loss because the
attention mask hides it and padded positions are unscored.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from .base_model import torch_dtype
from .batching import collate, token_losses
from .data import encode_example, read_jsonl


@torch.no_grad()
def per_sample_losses(model, tokenizer, records: list[dict], task_spec: dict, batch_size: int,
                      progress: bool = False, desc: str = "losses") -> list[dict]:
    examples = [encode_example(tokenizer, r["prompt"], r["response"], task_spec.get("system_prompt"),
                               task_spec["max_length"]) for r in records]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    rows: list[dict | None] = [None] * len(examples)
    device = next(model.parameters()).device
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        idx = order[start:start + batch_size]
        batch = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        losses, scored = token_losses(model, {k: v.to(device) for k, v in batch.items()})
        losses, scored = losses.cpu(), scored.cpu()
        sums, counts = losses.sum(1), scored.sum(1)
        for j, i in enumerate(idx):
            rows[i] = {"sample_id": records[i]["sample_id"], "row": i, "loss": float(sums[j] / counts[j]),
                       "tokens": int(counts[j])}
    return rows  # type: ignore[return-value]


def load_model(model_dir: str | Path, compute_dtype: str = "float32", device: str | torch.device = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(compute_dtype)).to(device)
    return model, tokenizer


def sample_losses_stage(model_dir: str | Path, split_paths: dict[str, str], task_spec: dict, batch_size: int,
                        out_csv: str | Path, compute_dtype: str = "float32") -> pd.DataFrame:
    from .atomic import atomic_path

    model, tokenizer = load_model(model_dir, compute_dtype, "cuda" if torch.cuda.is_available() else "cpu")
    frames = []
    for split, path in split_paths.items():
        rows = per_sample_losses(model, tokenizer, read_jsonl(path), task_spec, batch_size, progress=True,
                                 desc=f"losses {split}")
        frames.append(pd.DataFrame(rows).assign(split=split))
    df = pd.concat(frames, ignore_index=True)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df
