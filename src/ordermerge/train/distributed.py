"""One fine-tune over several processes (``torchrun --nproc_per_node N -m ordermerge fine-tune ...``).

The global batch and the order do not change with the number of processes: every rank reads the whole order,
takes a contiguous slice of each optimizer batch (cut further into micro-batches of ``micro_batch_size``)
and scales its loss by the GLOBAL number of scored tokens; summing the ranks' gradients then gives the
single-process gradient (up to the order of floating-point sums). The sum is an explicit all-reduce after
the rank's micro-batches rather than DDP hooks, so a rank whose slice is empty (a short last batch) or has
fewer micro-batches still takes part. Every rank then takes the same optimizer step; rank 0 alone writes
checkpoints, logs and resume state. With ``train.parallel: fsdp`` the ranks hold shards of the model instead
of copies, and FSDP sums the gradients during backward (fsdp.py).

The device is chosen automatically: ``cuda:LOCAL_RANK`` with NCCL when CUDA is present, else the
CPU with gloo. Without torchrun's environment (WORLD_SIZE unset) this is a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 1 << 24  # 64 MB of fp32 per all-reduce: bounded extra memory, few calls
# Other ranks wait while rank 0 writes an epoch's checkpoint and resume state (many GB at 7B).
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return Ranks(rank, world, device)


def teardown(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def my_slice(items: list, ranks: Ranks) -> list:
    """Rank r's contiguous share of one optimizer batch (shares differ by at most one item)."""
    n, w, r = len(items), ranks.world, ranks.rank
    return items[r * n // w : (r + 1) * n // w]


def sum_gradients(params: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Replace every rank's gradients by their sum over ranks (a missing gradient counts as zero)."""
    if ranks.world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    start = 0
    while start < len(params):
        bucket, size = [], 0
        while start < len(params) and (not bucket or size + params[start].numel() <= BUCKET_ELEMENTS):
            bucket.append(params[start])
            size += params[start].numel()
            start += 1
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def sum_scalar(value: float, ranks: Ranks) -> float:
    if ranks.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ranks.device)
    dist.all_reduce(t)
    return float(t.item())
