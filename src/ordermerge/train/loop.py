"""The fine-tune stage: full or LoRA fine-tuning that follows a precomputed data order exactly.

One run = one order array [epochs, N], cut into consecutive optimizer batches of ``batch_size``
(micro-batches of ``micro_batch_size`` accumulate; ranks under torchrun split each batch, see
distributed.py). AdamW on fp32 master weights, an optional bf16 autocast for the compute, a
linear/cosine/constant schedule with warmup, loss averaged over the response tokens of each
optimizer batch. Each epoch ends in a checkpoint in ``save_dtype`` (atomic safetensors HF dir,
``checkpoint.json`` with the zero-task-vector fraction; LoRA adds ``adapter/``), and ``steps.csv``
records the exact sample indices of every step (``train.report_to`` trackers get the same rows live,
tracking.py). ``train.parallel: fsdp`` shards the model over the ranks instead of copying it
(fsdp.py); everything else is the same.

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

The pieces: setup.py (input checks, the run's constants, model/optimizer and FSDP/DDP set-up),
resume.py (the state above), checkpointing.py (saving an epoch, disk-full handling); this module
holds the run itself and its epoch loop.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ordermerge.batching import collate_for, token_losses
from ordermerge.data.orders import batches_of
from ordermerge.seeding import derive_seed
from ordermerge.train import checkpointing, distributed, fsdp, resume, tracking
from ordermerge.train.setup import Job, Trainable, build, checked_inputs, total_steps, use_bf16

TIMING_COLUMNS = ("seconds", "tokens_per_s")


def backward_batch(
    model,
    examples: list[dict],
    micro: int,
    pad_id: int,
    n_scored: int,
    device: torch.device,
    bf16: bool,
    n_micro: int = 0,
    filler: dict | None = None,
    packing: bool = False,
) -> float:
    """Forward/backward of one (share of an) optimizer batch in micro-batches; returns its loss share.

    Each micro-batch's summed token loss is divided by the whole batch's scored-token count, so
    accumulated gradients equal those of the batch in one piece. Under FSDP every rank must run
    ``n_micro`` forward/backward passes (they are collectives): missing ones run ``filler`` with
    weight 0, which adds exact zeros to the gradients. ``packing``: each micro-batch is one padding-free row.
    """
    chunks = [(examples[s : s + micro], 1.0) for s in range(0, len(examples), micro)]
    chunks += [([filler], 0.0)] * (n_micro - len(chunks))
    loss_sum = 0.0
    collate = collate_for(packing)
    for chunk, weight in chunks:
        mb = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses, _ = fsdp.score(model, token_losses, mb)
        loss = losses.sum() * weight / max(1, n_scored)
        loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum


def _optimizer_step(
    job: Job, tr: Trainable, examples: list[dict], batch_indices, epoch: int, step: int
) -> tuple[dict, int]:
    """One optimizer step on one batch (every rank its slice); returns its steps.csv row and scored tokens."""
    ranks = job.ranks
    t0 = time.perf_counter()
    batch_examples = [examples[i] for i in batch_indices]
    n_scored = sum(sum(1 for y in e["labels"][1:] if y >= 0) for e in batch_examples)
    mine = distributed.my_slice(batch_examples, ranks)
    n_micro = fsdp.micro_batch_count(len(batch_examples), ranks.world, job.micro) if tr.sharded else 0
    loss_sum = backward_batch(
        tr.hf_model,
        mine,
        job.micro,
        job.pad_id,
        n_scored,
        ranks.device,
        job.bf16,
        n_micro,
        batch_examples[0],
        job.packing,
    )
    if not tr.sharded:  # FSDP has reduce-scattered (summed) them during backward
        distributed.sum_gradients(tr.params, ranks)
    loss_sum = distributed.sum_scalar(loss_sum, ranks)
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.params, job.train_cfg["max_grad_norm"])
    lr = tr.scheduler.get_last_lr()[0]
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(e["input_ids"]) for e in batch_examples)
    return {
        "epoch": epoch + 1,
        "step": step + 1,
        "loss": loss_sum,
        "lr": lr,
        "grad_norm": fsdp.as_float(grad_norm),
        "tokens": n_tokens,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(n_tokens / seconds, 1),
        "sample_indices": " ".join(str(int(i)) for i in batch_indices),
    }, n_scored


def _train_epoch(
    job: Job,
    tr: Trainable,
    examples: list[dict],
    epoch_order,
    epoch: int,
    step: int,
    log_rows: list[dict],
    bar,
    tracker: tracking.Tracker | None = None,
) -> tuple[int, float]:
    """Epoch ``epoch`` (0-based) in consecutive batches of its order; returns the step count after it and
    its train loss per scored token. The RNG (LoRA dropout) is reseeded from (seed, run, epoch, rank)."""
    torch.manual_seed(derive_seed(job.seed, "train", job.run_name, epoch, job.ranks.rank))
    epoch_loss, epoch_tokens = 0.0, 0
    for batch_indices in batches_of(epoch_order, job.batch_size):
        row, n_scored = _optimizer_step(job, tr, examples, batch_indices, epoch, step)
        log_rows.append(row)
        if tracker is not None:
            tracker.log_step(row)
        epoch_loss += row["loss"] * n_scored
        epoch_tokens += n_scored
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    return step, epoch_loss / max(1, epoch_tokens)


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
    tracker_identity: tracking.RunIdentity | None = None,
) -> None:
    """Fine-tune ``base_dir`` on ``train_path`` in the order ``order_path``, one checkpoint per epoch
    under ``out_dir`` (resuming saved state of this run, if any). ``train.report_to`` trackers
    (tracking.py) log under ``tracker_identity``; they are checked before anything else."""
    base_dir, out_dir, train_path = Path(base_dir), Path(out_dir), Path(train_path)
    report_to = train_cfg.get("report_to") or []
    tracking.check(report_to, tracker_identity)
    ranks = distributed.setup()
    order, examples, tokenizer = checked_inputs(base_dir, train_path, order_path, task_spec, train_cfg["epochs"])
    fp = resume.fingerprint(
        base_dir=base_dir,
        train_path=train_path,
        order=order,
        task_spec=task_spec,
        train_cfg=train_cfg,
        seed=seed,
        run_name=run_name,
    )
    info = resume.saved_info(out_dir / ".resume", out_dir, fp, ranks)
    start_epoch, step = (info["epoch"], info["step"]) if info else (0, 0)
    log_rows: list[dict] = info["log"] if info else []
    job = Job(
        base_dir,
        out_dir,
        run_name,
        seed,
        train_cfg,
        fp,
        ranks,
        total_steps(len(examples), train_cfg),
        tokenizer.pad_token_id,
        use_bf16(train_cfg, ranks.device),
    )
    if start_epoch < job.epochs:
        torch.manual_seed(derive_seed(seed, "train", run_name))  # LoRA's initial A (overwritten on resume)
        tr = build(base_dir, train_cfg, ranks.device, job.total_steps, ranks.world)
        if info:
            resume.load_state(job.resume_dir / "state", tr.model, tr.optimizer, tr.scheduler, ranks.main)
    if info and ranks.main:
        print(f"[{run_name}] resuming after epoch {start_epoch} (step {step}/{job.total_steps})", flush=True)
    bar = tqdm(
        total=job.total_steps,
        initial=step,
        desc=f"fine-tune {run_name}",
        unit="step",
        disable=not (progress and ranks.main),
    )
    tracker = tracking.open_trackers(
        report_to,
        tracker_identity,
        step,
        {**train_cfg, "seed": seed, "run_name": run_name, "fingerprint": fp},
        ranks.main,
    )
    try:
        for epoch in range(start_epoch, job.epochs):
            t_epoch = time.perf_counter()
            step, train_loss = _train_epoch(job, tr, examples, order[epoch], epoch, step, log_rows, bar, tracker)
            # Flushed before the state is saved: a rerun never re-logs steps up to the saved one.
            tracker.log_epoch(
                step, tracking.epoch_summary([r for r in log_rows if r["epoch"] == epoch + 1], train_loss)
            )
            checkpointing.save_epoch(job, tr, epoch, step, log_rows, train_loss, t_epoch)
            distributed.barrier(ranks)
    finally:
        tracker.close()
    bar.close()
    if ranks.main:
        resume.write_steps(out_dir / "steps.csv", log_rows)
        shutil.rmtree(job.resume_dir)
    distributed.teardown(ranks)
