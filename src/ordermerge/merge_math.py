"""The merge methods on one tensor: pure functions over K same-shaped tensors.

- ``average`` (paper Eq. 1): Σ w_i θ_i, accumulated in fp32, stored in the inputs' dtype.
- ``select`` (paper Eq. 2): every element is taken whole from ONE sub-model, drawn with p_i = w_i.
- ``select`` + ``resample=n`` (paper Eq. 3): where the drawn sub-model's task vector is exactly
  zero (stored value == base's stored value, compared bit for bit), draw again from ALL K
  sub-models, up to n times.

Randomness comes from the caller's generator (seeded per tensor by (seed, tensor name)), always
on the CPU, so bytes do not depend on tensor order, device or threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def stored_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers: equality here is equality of what is stored."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def normalized_weights(weights: list[float] | None, k: int) -> list[float]:
    if weights is None:
        return [1.0 / k] * k
    if len(weights) != k:
        raise ValueError(f"got {len(weights)} weights for {k} models; give exactly one weight per model")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    total = float(sum(weights))
    return [w / total for w in weights]


def weighted_average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for t, w in zip(tensors, weights):
        acc.add_(t.to(torch.float32), alpha=w)
    return acc.to(tensors[0].dtype)


def draw_indices(numel: int, probs: list[float], generator: torch.Generator) -> torch.Tensor:
    """``numel`` i.i.d. sub-model indices with P(i) = probs[i], as uint8 (K <= 255)."""
    k = len(probs)
    if all(abs(p - 1.0 / k) < 1e-12 for p in probs):
        return torch.randint(0, k, (numel,), generator=generator, dtype=torch.uint8)
    u = torch.rand(numel, generator=generator, dtype=torch.float64)
    cumulative = torch.cumsum(torch.tensor(probs, dtype=torch.float64), 0)
    return torch.searchsorted(cumulative, u, right=True).clamp_(max=k - 1).to(torch.uint8)


@dataclass
class SelectStats:
    counts: list[int]  # elements finally taken from each sub-model
    resampled: list[int] = field(default_factory=list)  # elements redrawn in each round
    zero_after: int = 0  # elements whose drawn value still equals the base's


def _gather(flat_stack: torch.Tensor, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    if positions is None:
        positions = torch.arange(flat_stack.shape[1])
    return flat_stack[idx.long(), positions]


def select(
    tensors: list[torch.Tensor],
    probs: list[float],
    generator: torch.Generator,
    base: torch.Tensor | None = None,
    resample: int = 0,
) -> tuple[torch.Tensor, SelectStats]:
    """Parameter selection with optional resampling of exact-zero task-vector elements."""
    if resample > 0 and base is None:
        raise ValueError("resample needs the base tensor to find zero task-vector elements")
    k = len(tensors)
    shape, dtype = tensors[0].shape, tensors[0].dtype
    flat = torch.stack([t.reshape(-1) for t in tensors])  # K copies of ONE tensor, never K models
    numel = flat.shape[1]
    idx = draw_indices(numel, probs, generator)
    out = _gather(flat, idx)
    stats = SelectStats(counts=[])
    if resample > 0:
        base_bits = stored_bits(base.reshape(-1))
        bits_stack = stored_bits(flat)
        # Zero task vector per (model, element): the sub-model left this element untouched.
        zero = bits_stack == base_bits.unsqueeze(0)
        for _ in range(resample):
            pos = zero[idx.long(), torch.arange(numel)].nonzero().squeeze(1)
            stats.resampled.append(int(pos.numel()))
            if pos.numel() == 0:
                continue
            # Redraw from ALL K (paper: keeps it one parallel tensor op).
            idx[pos] = draw_indices(pos.numel(), probs, generator)
        out = _gather(flat, idx)
        stats.zero_after = int((stored_bits(out) == base_bits).sum())
    stats.counts = torch.bincount(idx.long(), minlength=k).tolist()
    return out.reshape(shape).to(dtype), stats
