"""Saving a fine-tune epoch: the HF checkpoint in ``save_dtype``, the resume state, the published
epoch output, and a full disk turned into an error that says how the rerun resumes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ordermerge.storage.atomic import DiskFullError, atomic_path
from ordermerge.storage.checkpoint import copy_sidecars
from ordermerge.storage.dtypes import torch_dtype
from ordermerge.train import fsdp, resume


def zero_task_vector_fraction(model_state: dict[str, torch.Tensor], base_dir: Path) -> float:
    """Fraction of float elements whose stored value equals the base's (what resample acts on): stored bits
    equal in the base's dtype; a checkpoint in a wider dtype (fp32 of a bf16 base) against the base's values
    widened exactly (storage/widening.py)."""
    from ordermerge.storage.checkpoint import LazyCheckpoint
    from ordermerge.storage.dtypes import stored_bits

    base = LazyCheckpoint(base_dir)
    zeros = total = 0
    for name in base.keys():
        if name in model_state:
            b, t = base.get(name), model_state[name]
            if not t.is_floating_point():
                continue
            if t.dtype == b.dtype:
                zeros += int((stored_bits(t) == stored_bits(b)).sum())
            elif t.element_size() > b.element_size():
                zeros += int((t == b.to(t.dtype)).sum())
            else:
                continue
            total += t.numel()
    base.close()
    return zeros / max(1, total)


def save_checkpoint(
    model,
    base_dir: Path,
    out_dir: Path,
    save_dtype: str,
    meta: dict,
    lora: bool = False,
    full: dict[str, torch.Tensor] | None = None,
) -> None:
    """The epoch's full HF directory in ``save_dtype``; a LoRA model is merged, its adapter kept in ``adapter/``.

    ``full``: the model's state already gathered from sharded ranks (fsdp.full_model_state).
    """
    from safetensors.torch import save_file

    from ordermerge.train import lora as lora_mod

    hf_model = model.get_base_model() if lora else model
    if full is None:
        full = lora_mod.merged_state_dict(model) if lora else model.state_dict()
    dtype = torch_dtype(save_dtype)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in full.items()}
    # Tied weights are stored once, as the base stores them.
    if getattr(hf_model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    meta = {**meta, "zero_task_vector_fraction": zero_task_vector_fraction(state, base_dir)}
    with atomic_path(out_dir, directory=True) as tmp:
        copy_sidecars(base_dir, tmp)
        config = json.loads((tmp / "config.json").read_text())
        if config.get("dtype", save_dtype) != save_dtype:  # from_pretrained must not cast the weights back
            (tmp / "config.json").write_text(json.dumps({**config, "dtype": save_dtype}, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if lora:
            lora_mod.save_adapter(model, tmp / "adapter")
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")


def save_epoch(job, trainable, epoch: int, step: int, log_rows: list[dict], train_loss: float, t_epoch: float) -> None:
    """End of epoch ``epoch`` (0-based): checkpoint and resume state under ``.resume/``, then the
    published ``epoch{e}`` output. Sharded, every rank takes part in gathering the full tensors
    (up to 16 bytes per parameter on rank 0's host, freed on return); rank 0 alone writes."""
    model, optimizer, last = trainable.model, trainable.optimizer, epoch + 1 == job.epochs
    full = fsdp.full_model_state(model) if trainable.sharded else None
    gathered = fsdp.full_training_tensors(model, optimizer, full) if trainable.sharded and not last else None
    if not job.ranks.main:
        return
    e, cfg = epoch + 1, job.train_cfg
    meta = {
        "run": job.run_name,
        "epoch": e,
        "step": step,
        "method": cfg.get("method", "full"),
        "train_loss_epoch": train_loss,
    }
    info = {"fingerprint": job.fingerprint, "epoch": e, "step": step, "world": job.ranks.world, "log": log_rows}
    try:
        save_checkpoint(
            model, job.base_dir, job.resume_dir / f"epoch{e}", cfg["save_dtype"], meta, trainable.lora, full
        )
        resume.save_state(
            job.resume_dir / "state", model, optimizer, trainable.scheduler, info, tensors=not last, gathered=gathered
        )
        resume.publish(job.resume_dir / f"epoch{e}", job.out_dir / f"epoch{e}")
    except DiskFullError as exc:
        raise DiskFullError(
            exc.errno,
            f"{exc.strerror}. fine-tune {job.run_name} stopped in epoch {e}; "
            "a rerun resumes after the last epoch whose training state was saved",
        ) from exc
    print(
        f"[{job.run_name}] epoch {e}/{job.epochs}: train loss {train_loss:.4f}, "
        f"{time.perf_counter() - t_epoch:.1f}s, step {step}/{job.total_steps}",
        flush=True,
    )
