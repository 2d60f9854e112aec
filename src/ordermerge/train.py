"""The fine-tune stage: full fine-tuning that follows a precomputed data order exactly.

One run = one order array [epochs, N]. AdamW, linear (or constant) schedule with warmup, loss
averaged over response tokens of each optimizer batch, a checkpoint at the end of every epoch in
the configured dtype (atomic safetensors HF directory), and a per-step CSV log that records the
exact sample indices of every step.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import atomic_path
from .base_model import torch_dtype
from .batching import collate, token_losses
from .checkpoint_io import copy_sidecars
from .data import encode_example, read_jsonl
from .orders import batches_of, load_order
from .seeding import derive_seed


def lr_at(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; use linear, cosine or constant")


def zero_task_vector_fraction(model_state: dict[str, torch.Tensor], base_dir: Path) -> float:
    """Fraction of elements whose stored value equals the base's stored value (what resample acts on)."""
    from .checkpoint_io import LazyCheckpoint
    from .merge_math import stored_bits

    base = LazyCheckpoint(base_dir)
    zeros = total = 0
    for name in base.keys():
        if name in model_state:
            b, t = base.get(name), model_state[name]
            if t.dtype == b.dtype:
                zeros += int((stored_bits(t) == stored_bits(b)).sum())
                total += t.numel()
    return zeros / max(1, total)


def save_checkpoint(model, base_dir: Path, out_dir: Path, save_dtype: str, meta: dict) -> None:
    from safetensors.torch import save_file

    dtype = torch_dtype(save_dtype)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    # Tied weights are stored once, as the base stores them.
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    meta = {**meta, "zero_task_vector_fraction": zero_task_vector_fraction(state, base_dir)}
    with atomic_path(out_dir, directory=True) as tmp:
        copy_sidecars(base_dir, tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")


def fine_tune(
    base_dir: str | Path,
    train_path: str | Path,
    order_path: str | Path,
    out_dir: str | Path,
    task_spec: dict,
    train_cfg: dict,
    seed: int,
    run_name: str,
    progress: bool = True,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    order = load_order(order_path)
    records = read_jsonl(train_path)
    if order.shape[1] != len(records):
        raise ValueError(f"{order_path} orders {order.shape[1]} samples but {train_path} has {len(records)}")
    epochs = train_cfg["epochs"]
    if order.shape[0] < epochs:
        raise ValueError(f"{order_path} has {order.shape[0]} epochs, training needs {epochs}")
    torch.manual_seed(derive_seed(seed, "train", run_name))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = [encode_example(tokenizer, r["prompt"], r["response"], task_spec.get("system_prompt"),
                               task_spec["max_length"]) for r in records]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype(train_cfg["compute_dtype"]))
    model.config.use_cache = False
    model.train()
    batch_size, micro = train_cfg["batch_size"], train_cfg.get("micro_batch_size") or train_cfg["batch_size"]
    steps_per_epoch = math.ceil(len(records) / batch_size)
    total_steps = steps_per_epoch * epochs
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
    )
    warmup = train_cfg["warmup_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total_steps, warmup, train_cfg["schedule"])
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    log_rows = []
    step = 0
    bar = tqdm(total=total_steps, desc=f"fine-tune {run_name}", unit="step", disable=not progress)
    for epoch in range(epochs):
        epoch_loss, epoch_tokens, t_epoch = 0.0, 0, time.perf_counter()
        for batch_indices in batches_of(order[epoch], batch_size):
            t0 = time.perf_counter()
            batch_examples = [examples[i] for i in batch_indices]
            n_scored = sum(sum(1 for y in e["labels"][1:] if y >= 0) for e in batch_examples)
            loss_sum = 0.0
            for start in range(0, len(batch_examples), micro):
                mb = collate(batch_examples[start:start + micro], tokenizer.pad_token_id)
                losses, _ = token_losses(model, mb)
                loss = losses.sum() / max(1, n_scored)  # mean over the whole batch's response tokens
                loss.backward()
                loss_sum += float(loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg["max_grad_norm"])
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            n_tokens = sum(len(e["input_ids"]) for e in batch_examples)
            log_rows.append({
                "epoch": epoch + 1, "step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm),
                "tokens": n_tokens, "seconds": round(seconds, 4), "tokens_per_s": round(n_tokens / seconds, 1),
                "sample_indices": " ".join(str(int(i)) for i in batch_indices),
            })
            epoch_loss += loss_sum * n_scored
            epoch_tokens += n_scored
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")
        meta = {"run": run_name, "epoch": epoch + 1, "step": step, "train_loss_epoch": epoch_loss / max(1, epoch_tokens)}
        save_checkpoint(model, base_dir, out_dir / f"epoch{epoch + 1}", train_cfg["save_dtype"], meta)
        print(f"[{run_name}] epoch {epoch + 1}/{epochs}: train loss {meta['train_loss_epoch']:.4f}, "
              f"{time.perf_counter() - t_epoch:.1f}s, step {step}/{total_steps}", flush=True)
    bar.close()
    with atomic_path(out_dir / "steps.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(log_rows[0]))
            writer.writeheader()
            writer.writerows(log_rows)
