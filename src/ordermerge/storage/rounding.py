"""``ordermerge round``: a checkpoint stored in a narrower precision, and what storing it there lost.

The fine-tune is trained once and saved in fp32; each narrower precision (``storage/precisions.py``) is
made from that checkpoint here, tensor by tensor (memory: one tensor at a time, never the model):
- ``nearest``: IEEE round-to-nearest-even, exactly what ``tensor.to(dtype)`` (and so a fine-tune saved with
  ``save_dtype: bfloat16``) stores: the twin is bit-identical to saving in that dtype;
- ``stochastic`` (bf16 only): the fp32 bits' low 16 bits plus a uniform draw from [0, 2^16), truncated, so a
  value rounds up with probability equal to its distance from the lower bf16 neighbour: unbiased, and an
  update below half a bf16 step survives with probability |update| / step instead of never. The draw of a
  tensor is seeded by (seed, tensor name): the same bits whatever the order or threads.

``round.json`` in the output records, against the base, what rounding cost the task vector
τ = θ − θ_base: elements whose fp32 update was non-zero and became exactly zero (``erased``), and
‖τ_fp32 − τ_rounded‖ / ‖τ_fp32‖ (the share of the update's norm lost).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ordermerge.seeding import derive_seed
from ordermerge.storage.atomic import atomic_path
from ordermerge.storage.checkpoint import _DTYPE_NAMES, CheckpointError, LazyCheckpoint, ShardedWriter, copy_sidecars
from ordermerge.storage.dtypes import torch_dtype
from ordermerge.storage.precisions import get as get_precision

ROUND_JSON = "round.json"


def stochastic_bf16(t: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 -> bf16 by stochastic rounding (seeded): unbiased, E[result] = t for finite values in range."""
    bits = t.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=gen, dtype=torch.int64)
    upper = ((bits + noise) >> 16) & 0xFFFF
    out = torch.where(upper >= 1 << 15, upper - (1 << 16), upper).to(torch.int16).view(torch.bfloat16)
    # A carry into an all-ones exponent would turn a finite value into inf; non-finite inputs have no
    # neighbours to draw between: round-to-nearest for both.
    keep = torch.isfinite(t) & torch.isfinite(out)
    return torch.where(keep, out, t.to(torch.bfloat16))


def round_tensor(t: torch.Tensor, precision: str, seed: int, name: str) -> torch.Tensor:
    p = get_precision(precision)
    dtype = torch_dtype(p.dtype)
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    if t.element_size() < dtype.itemsize:
        raise CheckpointError(
            f"tensor {name} is {t.dtype}, narrower than {precision} ({p.dtype}): stored values "
            "cannot be widened back to what was trained; round the fp32 checkpoint instead"
        )
    if p.rounding == "nearest":
        return t.to(dtype)
    if t.dtype != torch.float32 or dtype != torch.bfloat16:
        raise CheckpointError(
            f"stochastic rounding is implemented for float32 -> bfloat16 only, not {t.dtype} -> {p.dtype}"
        )
    return stochastic_bf16(t, derive_seed(seed, "stochastic-rounding", name))


def round_checkpoint(
    model_dir: str | Path,
    base_dir: str | Path,
    precision: str,
    seed: int,
    out_dir: str | Path,
    shard_size: int = 5 * 10**9,
) -> dict:
    """Writes ``model_dir`` rounded to ``precision`` into ``out_dir`` (atomically) and returns the storage-loss
    statistics it records in ``round.json``."""
    model_dir, base_dir, out_dir = Path(model_dir), Path(base_dir), Path(out_dir)
    p = get_precision(precision)
    model, base = LazyCheckpoint(model_dir), LazyCheckpoint(base_dir)
    names = model.keys()
    missing = sorted(set(names) - set(base.keys()))
    if missing:
        raise CheckpointError(
            f"{model_dir}: tensor {missing[0]} is not in the base {base_dir}; round fine-tunes of this base only"
        )
    target = torch_dtype(p.dtype)
    layout = [
        (
            n,
            model.info(n).shape,
            _DTYPE_NAMES[target] if model.info(n).torch_dtype.is_floating_point else model.info(n).dtype,
        )
        for n in names
    ]
    stats = {"elements": 0, "changed_fp32": 0, "zero_after": 0, "erased": 0, "norm2_tau": 0.0, "norm2_lost": 0.0}
    with atomic_path(out_dir, directory=True) as tmp:
        copy_sidecars(model_dir, tmp, p.dtype)
        writer = ShardedWriter(tmp, shard_size, layout)
        try:
            for name in names:
                t = model.get(name)
                r = round_tensor(t, precision, seed, name)
                writer.add(name, r)
                if t.is_floating_point():
                    b = base.get(name).to(torch.float64)
                    tau, tau_r = t.to(torch.float64) - b, r.to(torch.float64) - b
                    stats["elements"] += t.numel()
                    stats["changed_fp32"] += int((tau != 0).sum())
                    stats["zero_after"] += int((tau_r == 0).sum())
                    stats["erased"] += int(((tau != 0) & (tau_r == 0)).sum())
                    stats["norm2_tau"] += float((tau * tau).sum())
                    stats["norm2_lost"] += float(((tau - tau_r) ** 2).sum())
        finally:
            writer.close()
        meta_path = model_dir / "checkpoint.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            meta["zero_task_vector_fraction"] = stats["zero_after"] / max(1, stats["elements"])
            (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")
        summary = {
            "source": str(model_dir),
            "base": str(base_dir),
            "precision": precision,
            "dtype": p.dtype,
            "rounding": p.rounding,
            "seed": seed if p.random else None,
            **stats,
            "erased_fraction": stats["erased"] / max(1, stats["elements"]),
            "zero_fraction": stats["zero_after"] / max(1, stats["elements"]),
            "relative_norm_lost": (stats["norm2_lost"] / stats["norm2_tau"]) ** 0.5 if stats["norm2_tau"] else 0.0,
        }
        (tmp / ROUND_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    model.close()
    base.close()
    return summary
