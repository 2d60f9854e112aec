"""The fine-tune stage: full or LoRA fine-tuning that follows a precomputed data order exactly.

One run = one order array [epochs, N], cut into consecutive optimizer batches of ``batch_size``
(micro-batches of ``micro_batch_size`` accumulate; ranks under torchrun split each batch, see
distributed.py). AdamW on fp32 master weights, an optional bf16 autocast for the compute, a
linear/cosine/constant schedule with warmup, loss averaged over the response tokens of each
optimizer batch. Each epoch ends in a checkpoint in ``save_dtype`` (atomic safetensors HF dir,
``checkpoint.json`` with the zero-task-vector fraction; LoRA adds ``adapter/``), and ``steps.csv``
records the exact sample indices of every step. ``train.parallel: fsdp`` shards the model over the
ranks instead of copying it (fsdp.py); everything else is the same.

Resume. Everything lives in ``<out_dir>/.resume/``, a directory the workflow does not declare as
an output (Snakemake deletes a failed job's declared outputs, so epoch dirs may vanish between
tries; this one survives):
- ``epoch{e}/``: each completed epoch's checkpoint, written here first; ``<out_dir>/epoch{e}``
  holds hard links to the same files (no extra disk; a copy where links are refused), so a
  deleted epoch output is restored without recomputing it.
- ``state/``: replaced atomically after each epoch: ``state.json`` (epoch, step, the log rows so
  far, optimizer hyper-parameters, scheduler state, a fingerprint of the inputs and config) and,
  unless training is finished, ``training.safetensors`` (fp32 trainable weights and AdamW moments;
  never pickle). The RNG (LoRA dropout) is reseeded at every epoch start from (seed, run, epoch,
  rank), so restoring the position restores the random stream too.
A rerun restores the epoch outputs up to the last complete epoch, loads the state and continues;
on the CPU the result is bit-identical to a run never interrupted. A fingerprint mismatch (other
data, order, base or config) discards the state and starts over. Success removes ``.resume``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ordermerge.train import distributed
from ordermerge.train import fsdp
from ordermerge.storage.atomic import DiskFullError, atomic_path
from ordermerge.storage.dtypes import torch_dtype
from ordermerge.batching import collate, token_losses
from ordermerge.storage.checkpoint import copy_sidecars
from ordermerge.data.records import encode_example, read_jsonl, refuse_over_long
from ordermerge.data.orders import batches_of, load_order
from ordermerge.seeding import derive_seed

TIMING_COLUMNS = ("seconds", "tokens_per_s")


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
    from ordermerge.storage.checkpoint import LazyCheckpoint
    from ordermerge.storage.dtypes import stored_bits

    base = LazyCheckpoint(base_dir)
    zeros = total = 0
    for name in base.keys():
        if name in model_state:
            b, t = base.get(name), model_state[name]
            if t.dtype == b.dtype:
                zeros += int((stored_bits(t) == stored_bits(b)).sum())
                total += t.numel()
    return zeros / max(1, total)


def save_checkpoint(model, base_dir: Path, out_dir: Path, save_dtype: str, meta: dict, lora: bool = False,
                    full: dict[str, torch.Tensor] | None = None) -> None:
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


def backward_batch(model, examples: list[dict], micro: int, pad_id: int, n_scored: int, device: torch.device,
                   bf16: bool, n_micro: int = 0, filler: dict | None = None) -> float:
    """Forward/backward of one (share of an) optimizer batch in micro-batches; returns its loss share.

    Each micro-batch's summed token loss is divided by the whole batch's scored-token count, so
    accumulated gradients equal those of the batch in one piece. Under FSDP every rank must run
    ``n_micro`` forward/backward passes (they are collectives): missing ones run ``filler`` with
    weight 0, which adds exact zeros to the gradients.
    """
    chunks = [(examples[s:s + micro], 1.0) for s in range(0, len(examples), micro)]
    chunks += [([filler], 0.0)] * (n_micro - len(chunks))
    loss_sum = 0.0
    for chunk, weight in chunks:
        mb = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses, _ = fsdp.score(model, token_losses, mb)
        loss = losses.sum() * weight / max(1, n_scored)
        loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum


def _fingerprint(*, base_dir: Path, train_path: Path, order, task_spec: dict, train_cfg: dict, seed: int,
                 run_name: str) -> str:
    h = hashlib.sha256()
    # How the work is split over processes changes no result beyond rounding, nor the state's format.
    train_cfg = {k: v for k, v in train_cfg.items() if k != "parallel"}
    h.update(json.dumps([task_spec, train_cfg, seed, run_name], sort_keys=True).encode())
    h.update(order.tobytes())
    h.update(train_path.read_bytes())
    h.update((base_dir / "config.json").read_bytes())
    for p in sorted(base_dir.glob("*.safetensors")):  # a rebuilt base changes size or mtime
        h.update(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    return h.hexdigest()


def _save_state(state_dir: Path, model, optimizer, scheduler, info: dict, tensors: bool,
                gathered: dict | None = None) -> None:
    """``gathered``: the tensors already collected from sharded ranks (fsdp.full_training_tensors)."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()  # param_groups only, when gathered: its state is sharded
    with atomic_path(state_dir, directory=True) as tmp:
        if tensors and gathered is not None:
            save_file(gathered, str(tmp / "training.safetensors"))
        elif tensors:
            flat = {f"param.{n}": p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
            for i, s in opt["state"].items():
                flat.update({f"optim.{i}.{k}": v.detach().to("cpu").contiguous() for k, v in s.items()})
            save_file(flat, str(tmp / "training.safetensors"))
        info = {**info, "optimizer_groups": opt["param_groups"], "scheduler": scheduler.state_dict()}
        (tmp / "state.json").write_text(json.dumps(info, indent=1) + "\n")


def _load_state(state_dir: Path, model, optimizer, scheduler, main: bool = True) -> None:
    from safetensors.torch import load_file

    info = json.loads((state_dir / "state.json").read_text())
    if fsdp.is_sharded(model):  # rank 0 reads the full tensors and scatters them (bounded host memory)
        flat = load_file(str(state_dir / "training.safetensors")) if main else {}
        fsdp.load_training_tensors(model, optimizer, flat, info["optimizer_groups"])
        scheduler.load_state_dict(info["scheduler"])
        return
    flat = load_file(str(state_dir / "training.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(flat[f"param.{n}"])
    opt_state: dict[int, dict] = {}
    for key, t in flat.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = t
    groups = [{**g, "betas": tuple(g["betas"])} for g in info["optimizer_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(info["scheduler"])


def _publish(source: Path, target: Path) -> None:
    """Make ``target`` a complete copy of the epoch dir ``source``: hard links, a copy where refused."""
    with atomic_path(target, directory=True) as tmp:
        for src in source.rglob("*"):
            dst = tmp / src.relative_to(source)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def _write_steps(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _restore(resume_dir: Path, out_dir: Path, fingerprint: str) -> None:
    """Restore the epoch outputs of saved state that belongs to this run; discard state that does not."""
    for stale in [*out_dir.glob(".tmp-*"), *resume_dir.glob(".tmp-*")]:  # half-written by a killed try
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    info_path = resume_dir / "state" / "state.json"
    if not info_path.exists():
        return
    info = json.loads(info_path.read_text())
    if info.get("fingerprint") != fingerprint:
        print(f"[resume] {resume_dir}: saved state belongs to other inputs or config; starting over", flush=True)
        shutil.rmtree(resume_dir)
        return
    for e in range(1, info["epoch"] + 1):  # always: an epoch dir present may predate this state
        _publish(resume_dir / f"epoch{e}", out_dir / f"epoch{e}")


def _build(base_dir: Path, train_cfg: dict, device: torch.device, total_steps: int, world: int = 1):
    """Model (LoRA-wrapped or FSDP-sharded if configured), its trainable parameters, AdamW and the lr schedule."""
    from transformers import AutoModelForCausalLM

    lora = train_cfg.get("method", "full") == "lora"
    # Trained weights are fp32 masters; a frozen LoRA base may stay in its stored dtype under bf16 compute.
    dtype = "auto" if lora and train_cfg["compute_dtype"] == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model.config.use_cache = False
    if lora:
        from ordermerge.train.lora import wrap

        model = wrap(model, train_cfg)
    if train_cfg.get("parallel", "ddp") == "fsdp":
        if lora:
            raise ValueError("train.parallel fsdp needs train.method full (LoRA fits one GPU: use parallel ddp)")
        fsdp.shard(model, device, world)  # moves the shards to the device; AdamW then sees the shards
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": train_cfg["weight_decay"]},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=train_cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
    )
    warmup, schedule = train_cfg["warmup_steps"], train_cfg["schedule"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, warmup, schedule))
    return model, lora, params, optimizer, scheduler


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
    from transformers import AutoTokenizer

    base_dir, out_dir, train_path = Path(base_dir), Path(out_dir), Path(train_path)
    ranks = distributed.setup()
    order = load_order(order_path)
    records = read_jsonl(train_path)
    if order.shape[1] != len(records):
        raise ValueError(f"{order_path} orders {order.shape[1]} samples but {train_path} has {len(records)}")
    epochs = train_cfg["epochs"]
    if order.shape[0] < epochs:
        raise ValueError(f"{order_path} has {order.shape[0]} epochs, training needs {epochs}")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = [encode_example(tokenizer, r["prompt"], r["response"], task_spec.get("system_prompt"),
                               task_spec["max_length"]) for r in records]
    refuse_over_long(examples, records, task_spec["max_length"])  # before anything is written
    resume_dir = out_dir / ".resume"
    fingerprint = _fingerprint(base_dir=base_dir, train_path=train_path, order=order, task_spec=task_spec,
                               train_cfg=train_cfg, seed=seed, run_name=run_name)
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _restore(resume_dir, out_dir, fingerprint)
    distributed.barrier(ranks)
    info = json.loads((resume_dir / "state" / "state.json").read_text()) if (resume_dir / "state").exists() else None
    start_epoch, step = (info["epoch"], info["step"]) if info else (0, 0)
    log_rows: list[dict] = info["log"] if info else []

    batch_size, micro = train_cfg["batch_size"], train_cfg.get("micro_batch_size") or train_cfg["batch_size"]
    total_steps = math.ceil(len(records) / batch_size) * epochs
    bf16 = train_cfg["compute_dtype"] == "bfloat16"
    if bf16 and ranks.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("[fine-tune] this GPU has no bf16; computing in float32", flush=True)
        bf16 = False
    if start_epoch < epochs:
        torch.manual_seed(derive_seed(seed, "train", run_name))  # LoRA's initial A (overwritten on resume)
        model, lora, params, optimizer, scheduler = _build(base_dir, train_cfg, ranks.device, total_steps, ranks.world)
        hf_model = model.get_base_model() if lora else model  # the body/head split token_losses needs
        sharded = fsdp.is_sharded(model)
        if info:
            _load_state(resume_dir / "state", model, optimizer, scheduler, ranks.main)
    if info and ranks.main:
        print(f"[{run_name}] resuming after epoch {start_epoch} (step {step}/{total_steps})", flush=True)

    bar = tqdm(total=total_steps, initial=step, desc=f"fine-tune {run_name}", unit="step",
               disable=not (progress and ranks.main))
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(derive_seed(seed, "train", run_name, epoch, ranks.rank))
        epoch_loss, epoch_tokens, t_epoch = 0.0, 0, time.perf_counter()
        for batch_indices in batches_of(order[epoch], batch_size):
            t0 = time.perf_counter()
            batch_examples = [examples[i] for i in batch_indices]
            n_scored = sum(sum(1 for y in e["labels"][1:] if y >= 0) for e in batch_examples)
            mine = distributed.my_slice(batch_examples, ranks)
            n_micro = fsdp.micro_batch_count(len(batch_examples), ranks.world, micro) if sharded else 0
            loss_sum = backward_batch(hf_model, mine, micro, tokenizer.pad_token_id, n_scored, ranks.device, bf16,
                                      n_micro, batch_examples[0])
            if not sharded:  # FSDP has reduce-scattered (summed) them during backward
                distributed.sum_gradients(params, ranks)
            loss_sum = distributed.sum_scalar(loss_sum, ranks)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, train_cfg["max_grad_norm"])
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            n_tokens = sum(len(e["input_ids"]) for e in batch_examples)
            log_rows.append({
                "epoch": epoch + 1, "step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": fsdp.as_float(grad_norm),
                "tokens": n_tokens, "seconds": round(seconds, 4), "tokens_per_s": round(n_tokens / seconds, 1),
                "sample_indices": " ".join(str(int(i)) for i in batch_indices),
            })
            epoch_loss += loss_sum * n_scored
            epoch_tokens += n_scored
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")
        # Sharded: every rank takes part in gathering the full tensors; rank 0 alone receives them.
        full = fsdp.full_model_state(model) if sharded else None
        gathered = fsdp.full_training_tensors(model, optimizer, full) if sharded and epoch + 1 < epochs else None
        if ranks.main:
            meta = {"run": run_name, "epoch": epoch + 1, "step": step, "method": train_cfg.get("method", "full"),
                    "train_loss_epoch": epoch_loss / max(1, epoch_tokens)}
            info = {"fingerprint": fingerprint, "epoch": epoch + 1, "step": step, "world": ranks.world, "log": log_rows}
            try:
                save_checkpoint(model, base_dir, resume_dir / f"epoch{epoch + 1}", train_cfg["save_dtype"], meta, lora,
                                full)
                _save_state(resume_dir / "state", model, optimizer, scheduler, info, tensors=epoch + 1 < epochs,
                            gathered=gathered)
                _publish(resume_dir / f"epoch{epoch + 1}", out_dir / f"epoch{epoch + 1}")
            except DiskFullError as exc:
                raise DiskFullError(exc.errno, f"{exc.strerror}. fine-tune {run_name} stopped in epoch {epoch + 1}; "
                                    "a rerun resumes after the last epoch whose training state was saved") from exc
            print(f"[{run_name}] epoch {epoch + 1}/{epochs}: train loss {meta['train_loss_epoch']:.4f}, "
                  f"{time.perf_counter() - t_epoch:.1f}s, step {step}/{total_steps}", flush=True)
        del full, gathered  # up to 16 bytes per parameter on rank 0's host
        distributed.barrier(ranks)
    bar.close()
    if ranks.main:
        _write_steps(out_dir / "steps.csv", log_rows)
        shutil.rmtree(resume_dir)
    distributed.teardown(ranks)
