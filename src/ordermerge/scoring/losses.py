"""The sample-losses stage: the mean response-token loss of every sample under one checkpoint.

Batched and length-sorted (little padding); padding never changes a sample's loss because the
attention mask hides it and padded positions are unscored. A model directory is checked against its
config before loading (``check_weights``): from_pretrained would otherwise fill a missing tensor
with random values and only warn.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from ordermerge.batching import collate_for, per_sample_sums, token_losses
from ordermerge.data.formatting import encode_example
from ordermerge.data.prepare import read_jsonl, refuse_over_long
from ordermerge.storage.checkpoint import DTYPES, CheckpointError, LazyCheckpoint
from ordermerge.storage.dtypes import torch_dtype


@torch.no_grad()
def per_sample_losses(
    model,
    tokenizer,
    records: list[dict],
    task_spec: dict,
    batch_size: int,
    progress: bool = False,
    desc: str = "losses",
    packing: bool = False,
) -> list[dict]:
    examples = [
        encode_example(tokenizer, r["prompt"], r["response"], task_spec.get("system_prompt"), task_spec["max_length"])
        for r in records
    ]
    refuse_over_long(examples, records, task_spec["max_length"])
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    rows: list[dict | None] = [None] * len(examples)
    device = next(model.parameters()).device
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        idx = order[start : start + batch_size]
        batch = collate_for(packing)([examples[i] for i in idx], tokenizer.pad_token_id)
        losses, scored = token_losses(model, {k: v.to(device) for k, v in batch.items()})
        sums, counts = per_sample_sums(losses.cpu(), scored.cpu(), batch)
        for j, i in enumerate(idx):
            rows[i] = {
                "sample_id": records[i]["sample_id"],
                "row": i,
                "loss": float(sums[j] / counts[j]),
                "tokens": int(counts[j]),
            }
    return rows  # type: ignore[return-value]


def check_weights(model_dir: str | Path) -> None:
    """Refuse weights that are truncated, corrupt, missing, mis-shaped or of another dtype (naming file and fix).

    The headers are checked against the tensors the directory's config.json builds (on the meta
    device: no memory, no data read); tied weights stored once are fine.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    weights = LazyCheckpoint(model_dir)  # truncated / corrupt / missing shard / pickle-only: CheckpointError
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(config)
    want = {**dict(expected.named_parameters()), **dict(expected.named_buffers())}  # tied weights listed once
    want = {k: v for k, v in want.items() if k in expected.state_dict()}  # persistent ones only
    stored = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "").replace("torch.", "")
    fix = "re-create it (rerun the stage that wrote it) or re-copy it"
    missing = sorted(set(want) - set(weights.keys()))
    if missing:
        raise CheckpointError(
            f"{model_dir}: {len(missing)} tensors the config needs are missing (e.g. {missing[0]}); {fix}"
        )
    for name, t in want.items():
        shape, dtype = weights.meta(name)
        if tuple(shape) != tuple(t.shape):
            raise CheckpointError(
                f"{model_dir}: {name} has shape {list(shape)}, the config needs {list(t.shape)}; {fix}"
            )
        torch_dt = DTYPES[dtype]
        other = bool(stored) and torch_dt != getattr(torch, stored, torch_dt)
        if t.is_floating_point() and (not torch_dt.is_floating_point or other):
            raise CheckpointError(
                f"{model_dir}: {name} is stored as {dtype}, config.json says {stored or 'float'}; {fix}"
            )
    weights.close()


def default_device() -> str:
    """The first GPU when torch sees one (a job's GPU, per CUDA_VISIBLE_DEVICES), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_dir: str | Path, compute_dtype: str = "float32", device: str | torch.device | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_weights(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(compute_dtype))
    model = model.to(device or default_device())
    return model, tokenizer


def sample_losses_stage(
    model_dir: str | Path,
    split_paths: dict[str, str],
    task_spec: dict,
    batch_size: int,
    out_csv: str | Path,
    compute_dtype: str = "float32",
) -> pd.DataFrame:
    from ordermerge.storage.atomic import atomic_path

    model, tokenizer = load_model(model_dir, compute_dtype)
    frames = []
    for split, path in split_paths.items():
        rows = per_sample_losses(
            model, tokenizer, read_jsonl(path), task_spec, batch_size, progress=True, desc=f"losses {split}"
        )
        frames.append(pd.DataFrame(rows).assign(split=split))
    df = pd.concat(frames, ignore_index=True)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df
