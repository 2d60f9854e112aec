"""Resume state of a fine-tune run, in ``<out_dir>/.resume/`` (the layout is described in loop.py).

A fingerprint of the inputs and config ties saved state to one run; ``restore`` republishes the
epoch outputs of state that belongs to this run and discards state that does not; ``save_state`` /
``load_state`` write and read the trainable weights, AdamW moments and schedule (safetensors + JSON,
never pickle).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ordermerge.storage.atomic import atomic_path
from ordermerge.train import distributed, fsdp


def fingerprint(
    *, base_dir: Path, train_path: Path, order, task_spec: dict, train_cfg: dict, seed: int, run_name: str
) -> str:
    h = hashlib.sha256()
    # How the work is split over processes changes no result beyond rounding, nor the state's format;
    # where the numbers are also reported (report_to) changes nothing.
    train_cfg = {
        k: v for k, v in train_cfg.items() if k not in ("parallel", "report_to") and not (k == "packing" and not v)
    }
    h.update(json.dumps([task_spec, train_cfg, seed, run_name], sort_keys=True).encode())
    h.update(order.tobytes())
    h.update(train_path.read_bytes())
    h.update((base_dir / "config.json").read_bytes())
    for p in sorted(base_dir.glob("*.safetensors")):  # a rebuilt base changes size or mtime
        h.update(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    return h.hexdigest()


def save_state(
    state_dir: Path, model, optimizer, scheduler, info: dict, tensors: bool, gathered: dict | None = None
) -> None:
    """``gathered``: the tensors already collected from sharded ranks (fsdp.full_training_tensors)."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()  # param_groups only, when gathered: its state is sharded
    with atomic_path(state_dir, directory=True) as tmp:
        if tensors and gathered is not None:
            save_file(gathered, str(tmp / "training.safetensors"))
        elif tensors:
            flat = {
                f"param.{n}": p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad
            }
            for i, s in opt["state"].items():
                flat.update({f"optim.{i}.{k}": v.detach().to("cpu").contiguous() for k, v in s.items()})
            save_file(flat, str(tmp / "training.safetensors"))
        info = {**info, "optimizer_groups": opt["param_groups"], "scheduler": scheduler.state_dict()}
        (tmp / "state.json").write_text(json.dumps(info, indent=1) + "\n")


def load_state(state_dir: Path, model, optimizer, scheduler, main: bool = True) -> None:
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


def publish(source: Path, target: Path) -> None:
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


def write_steps(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def restore(resume_dir: Path, out_dir: Path, fingerprint: str) -> None:
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
        publish(resume_dir / f"epoch{e}", out_dir / f"epoch{e}")


def saved_info(resume_dir: Path, out_dir: Path, fingerprint: str, ranks) -> dict | None:
    """Rank 0 restores (or discards) the saved state; then every rank reads what is left, if any."""
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        restore(resume_dir, out_dir, fingerprint)
    distributed.barrier(ranks)
    state = resume_dir / "state"
    return json.loads((state / "state.json").read_text()) if state.exists() else None
