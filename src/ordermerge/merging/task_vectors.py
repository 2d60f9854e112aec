"""Task-vector baselines on K same-shaped tensors (or one chunk of them): pure functions.

With τ_i = θ_i − θ_base in fp32 and weights w_i (normalised to sum 1), the result is stored in
the inputs' dtype:

- ``task_arithmetic`` (Ilharco et al. 2023): θ_base + λ Σ w_i τ_i.
- ``ties`` (Yadav et al. 2023): trim each τ_i to its top-``density`` magnitudes over the WHOLE
  tensor (a per-tensor threshold, found by :func:`magnitude_threshold` before the merge pass), elect
  the sign of Σ w_i τ̂_i, take the weighted mean of the entries that agree with it, times λ.
- ``dare`` (Yu et al. 2024): drop each τ_i element with probability p, rescale by 1/(1−p), then
  task arithmetic.
- ``model_stock`` (Jang et al. 2024): t·θ_avg + (1−t)·θ_base with t = K·cos / (1 + (K−1)·cos) from
  the mean pairwise cosine between task vectors over the whole tensor (:func:`model_stock_ratio`).

Every elementwise step is one IEEE-rounded op (no fused multiply-add, no division by a scalar,
which CUDA turns into a reciprocal multiply; scalars are rounded to fp32 first), and sums over the
K inputs run in input order. So a chunk's bytes depend on neither chunking, threads nor device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ordermerge.merging import bits

_HIGH_BINS, _LOW_BINS = 1 << 15, 1 << 16  # |τ| as fp32 bits, sign bit clear: 15 high bits, 16 low


@dataclass
class KeptCounts:
    """Elements of each input's task vector that entered the merge (ties: trimmed to; dare: not dropped)."""

    kept: list[int]
    elements: int

    @staticmethod
    def zero(k: int) -> KeptCounts:
        return KeptCounts([0] * k, 0)

    def __add__(self, other: KeptCounts) -> KeptCounts:
        return KeptCounts([a + b for a, b in zip(self.kept, other.kept)], self.elements + other.elements)

    def fractions(self) -> list[float]:
        return [c / max(1, self.elements) for c in self.kept]


def fp32(x: float) -> float:
    """``x`` rounded to fp32 once, here, so every device multiplies by the same scalar."""
    return float(np.float32(x))


def _empty(scratch, key: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A temporary: from ``scratch(key, shape, dtype, device)`` (the engine's per-thread buffers,
    :meth:`MergeContext.scratch`) when given, else freshly allocated. Same ops, same bytes."""
    if scratch is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return scratch(key, shape, dtype, device)


def task_vectors(rows: torch.Tensor, base: torch.Tensor, scratch=None) -> torch.Tensor:
    """(K, n) fp32 task vectors of (K, n) rows against the (n,) base."""
    taus = _empty(scratch, "taus", rows.shape, torch.float32, rows.device).copy_(rows)
    return taus.sub_(_empty(scratch, "base_f32", base.shape, torch.float32, base.device).copy_(base))


def weighted_sum(rows: torch.Tensor, weights: list[float], scratch=None) -> torch.Tensor:
    """Σ w_i rows_i in fp32, in input order, one rounding per multiply and per add."""
    acc = _empty(scratch, "sum", rows.shape[1:], torch.float32, rows.device).zero_()
    tmp = _empty(scratch, "sum_term", rows.shape[1:], torch.float32, rows.device)
    for row, w in zip(rows, weights):
        acc.add_(torch.mul(row, fp32(w), out=tmp))
    return acc


def apply_delta(base: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """θ_base + λ·delta, rounded once to the base's dtype."""
    return delta.mul_(fp32(scale)).add_(base.float()).to(base.dtype, copy=True)  # never a reused buffer


def task_arithmetic(rows, base, weights, scale, scratch=None) -> torch.Tensor:
    return apply_delta(base, weighted_sum(task_vectors(rows, base, scratch), weights, scratch), scale)


_WORDS = 1 << 15  # 64-bit random words drawn at a time: the same stream, in cache-sized pieces


def dare_keep_mask(k: int, n: int, drop_rate: float, rng: np.random.PCG64, out: np.ndarray | None = None) -> np.ndarray:
    """(K, n) bool, True where an element survives; P(drop) = floor(p·2³²)/2³², exact in integers.

    One 32-bit word per element from the chunk's own stream (raw output: stable across numpy),
    drawn in pieces (the stream is the same) into ``out`` if given: no chunk-sized temporaries.
    """
    keep = np.empty(k * n, dtype=bool) if out is None else out.reshape(-1)[: k * n]
    limit = np.uint32(int(drop_rate * 2**32))
    for lo in range(0, k * n, 2 * _WORDS):
        m = min(2 * _WORDS, k * n - lo)
        words = rng.random_raw(-(-m // 2)).astype("<u8", copy=False).view("<u4")[:m]
        np.greater_equal(words, limit, out=keep[lo : lo + m])
    return keep.reshape(k, n)


def dare(
    rows, base, weights, scale, keep: torch.Tensor, drop_rate: float, scratch=None
) -> tuple[torch.Tensor, list[int]]:
    """DARE on one chunk with its keep mask; also returns the kept count per input."""
    taus = task_vectors(rows, base, scratch)
    # times 1.0 or 0.0 (a float copy of the mask: a bool operand takes torch's slow mixed-type loop)
    taus.mul_(_empty(scratch, "keep_f32", keep.shape, torch.float32, keep.device).copy_(keep))
    taus.mul_(fp32(1.0 / (1.0 - drop_rate)))
    kept = np.count_nonzero(keep.numpy(), axis=1) if keep.device.type == "cpu" else keep.sum(1)
    return apply_delta(base, weighted_sum(taus, weights, scratch), scale), kept.tolist()


def magnitude_bits(taus: torch.Tensor, scratch=None) -> torch.Tensor:
    """|τ| as int32 fp32 bits: for non-negative floats, integer order is magnitude order."""
    return torch.abs(taus, out=_empty(scratch, "magnitude", taus.shape, torch.float32, taus.device)).view(torch.int32)


def _row_offsets(k: int, nbins: int, device) -> torch.Tensor:
    # Input i counts into bins i*nbins...: one bincount for all K (int32: K*2^16 < 2^31 for K <= 255)
    return (torch.arange(k, dtype=torch.int32, device=device) * nbins).unsqueeze(1)


def high_histogram(taus: torch.Tensor) -> torch.Tensor:
    """(K, 2¹⁵) counts of |τ|'s high 15 bits: the first pass of an exact radix select."""
    k = taus.shape[0]
    bins = (magnitude_bits(taus) >> 16) + _row_offsets(k, _HIGH_BINS, taus.device)
    return torch.bincount(bins.reshape(-1), minlength=k * _HIGH_BINS).reshape(k, _HIGH_BINS).cpu()


def key_histogram(taus: torch.Tensor, scratch=None) -> torch.Tensor:
    """(K, 2¹⁶) counts of 2·(|τ|'s high 15 bits) + (its low 16 bits are not all zero).

    The first pass of the exact radix select: summed over a pair of bins it is :func:`high_histogram`;
    the odd bin says how many elements of a high bin have low bits at all, so the second pass can be
    skipped where the k-th largest is one whose low bits are zero (:func:`need_low_pass`).
    """
    k, shape, dev = taus.shape[0], taus.shape, taus.device
    bits = magnitude_bits(taus, scratch)
    key = torch.bitwise_right_shift(bits, 15, out=_empty(scratch, "key", shape, torch.int32, dev))
    # (low 15 bits + 0x7FFF) >> 15 is 1 where they are not all zero, else 0: int32 ops only (an OR
    # with a bool takes torch's slow mixed-type loop). key = 2h + b15 | (low 15 bits != 0).
    inexact = bits.bitwise_and_(0x7FFF).add_(0x7FFF).bitwise_right_shift_(15)
    key.bitwise_or_(inexact).add_(_row_offsets(k, _LOW_BINS, dev))
    return torch.bincount(key.reshape(-1), minlength=k * _LOW_BINS).reshape(k, _LOW_BINS).cpu()


def high_from_keys(hist: torch.Tensor) -> torch.Tensor:
    """The (K, 2¹⁵) :func:`high_histogram` of a :func:`key_histogram`."""
    return hist.view(hist.shape[0], _HIGH_BINS, 2).sum(2)


def need_low_pass(hist: torch.Tensor, high_bin: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(K,) bool: whether input i's k-th largest |τ| may have non-zero low bits (the second pass is
    needed), given its :func:`key_histogram`, chosen high bin and the rank left inside that bin.

    Inside a high bin the elements with non-zero low bits are the largest; if the rank goes past
    them, the k-th largest is exactly ``high_bin << 16`` (low bits 0), as the second pass would find.
    """
    with_low = hist.gather(1, (2 * high_bin + 1).unsqueeze(1)).squeeze(1)
    return rank <= with_low


def first_pass(hist: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """From a tensor's summed :func:`key_histogram`: each input's high bin of its k-th largest |τ|,
    the rank left inside that bin, and whether any input needs the second (low bits) pass."""
    high_bin, left = top_bin(high_from_keys(hist), rank)
    return high_bin, left, bool(need_low_pass(hist, high_bin, left).any())


def low_histogram(taus: torch.Tensor, high_bin: torch.Tensor, scratch=None) -> torch.Tensor:
    """(K, 2¹⁶) counts of |τ|'s low 16 bits among the elements in input i's chosen high bin."""
    k, shape, dev = taus.shape[0], taus.shape, taus.device
    bits = magnitude_bits(taus, scratch)
    high = torch.bitwise_right_shift(bits, 16, out=_empty(scratch, "key", shape, torch.int32, dev))
    inside = torch.eq(high, high_bin.to(dev).unsqueeze(1), out=_empty(scratch, "inexact", shape, torch.bool, dev))
    bins = bits.bitwise_and_(0xFFFF).add_(_row_offsets(k, _LOW_BINS, dev))
    return torch.bincount(bins[inside], minlength=k * _LOW_BINS).reshape(k, _LOW_BINS).cpu()


def top_bin(hist: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the highest bin b with ≥ rank elements in bins ≥ b, and the rank left inside b."""
    from_top = hist.flip(1).cumsum(1)  # from_top[:, j] = elements in bins ≥ nbins-1-j
    j = torch.searchsorted(from_top, rank.unsqueeze(1)).squeeze(1)
    above = torch.where(j > 0, from_top.gather(1, (j - 1).clamp_min(0).unsqueeze(1)).squeeze(1), 0)
    return hist.shape[1] - 1 - j, rank - above


def ties_rank(numel: int, density: float) -> int:
    """How many of a tensor's largest |τ| TIES keeps (at least one)."""
    return max(1, math.ceil(density * numel - 1e-9))  # the epsilon: 0.3 * 10 is 3.0000000000000004


def magnitude_threshold(high_bin: torch.Tensor, low_bin: torch.Tensor) -> torch.Tensor:
    """(K,) fp32 thresholds: the exact k-th largest |τ| of each input, from the two radix passes."""
    return ((high_bin << 16) | low_bin).to(torch.int32).view(torch.float32)


def ties(rows, base, weights, scale, thresholds: torch.Tensor, scratch=None) -> tuple[torch.Tensor, list[int]]:
    """TIES on one chunk, given each input's per-tensor threshold; also returns kept counts.

    With ``scratch`` every (K, n) and (n,) temporary is a reused per-thread buffer; the ops, and so
    the bytes, are the same as without.
    """
    taus = task_vectors(rows, base, scratch)
    shape, dev = taus.shape, taus.device
    f32 = _empty(scratch, "ties_f32", shape, torch.float32, dev)
    kept = torch.ge(
        torch.abs(taus, out=f32),
        thresholds.to(dev).unsqueeze(1),
        out=_empty(scratch, "ties_kept", shape, torch.bool, dev),
    )
    kept.logical_and_(
        torch.ne(taus, 0, out=_empty(scratch, "ties_agree", shape, torch.bool, dev))
    )  # ties at the threshold all stay
    # Masks multiply as float copies (1.0 / 0.0): a bool operand takes torch's slow mixed-type loop.
    mask = _empty(scratch, "ties_mask", shape, torch.float32, dev)
    taus.mul_(mask.copy_(kept))
    w = [fp32(x) for x in weights]
    weighted = taus.mul_(torch.tensor(w, device=dev).unsqueeze(1))
    elected = _empty(scratch, "ties_elected", shape[1:], torch.float32, dev).zero_()
    for row in weighted:
        elected.add_(row)
    agree = torch.eq(
        torch.sign(weighted, out=f32),
        torch.sign(elected, out=_empty(scratch, "ties_sign", shape[1:], torch.float32, dev)),
        out=_empty(scratch, "ties_agree", shape, torch.bool, dev),
    )
    agree.logical_and_(kept)
    num = _empty(scratch, "ties_num", shape[1:], torch.float32, dev).zero_()
    den = _empty(scratch, "ties_den", shape[1:], torch.float32, dev).zero_()
    tmp = _empty(scratch, "ties_term", shape[1:], torch.float32, dev)
    for row, a, wi in zip(weighted, mask.copy_(agree), w):
        num.add_(torch.mul(row, a, out=tmp))
        den.add_(torch.mul(a, wi, out=tmp))
    delta = num.div_(den).masked_fill_(den == 0, 0.0)  # no input agrees (or all trimmed): no change
    counts = np.count_nonzero(kept.numpy(), axis=1) if dev.type == "cpu" else kept.sum(1)
    return apply_delta(base, delta, scale), counts.tolist()


def gram_fp64(rows: torch.Tensor, base: torch.Tensor, scratch=None) -> np.ndarray:
    """(K, K) float64 ⟨τ_i, τ_j⟩ over one chunk, on the CPU whatever the merge's device (:func:`bits.gram_fp64`
    of the fp32 task vectors)."""
    return bits.gram_fp64(task_vectors(rows.cpu(), base.cpu(), scratch), scratch)


def model_stock_ratio(gram: np.ndarray) -> tuple[float, float]:
    """(t, mean cosine) of Jang et al. Eq. 5 from a tensor's Gram matrix of task vectors.

    A zero task vector has cosine 0 with every other. A negative mean cosine (anti-aligned task
    vectors, outside the paper's geometry) is clamped to 0, i.e. t = 0: the base.
    """
    k = gram.shape[0]
    norms = np.sqrt(np.diag(gram))
    cosines = [
        gram[i, j] / (norms[i] * norms[j]) if norms[i] * norms[j] > 0 else 0.0
        for i in range(k)
        for j in range(i + 1, k)
    ]
    cos = max(0.0, float(np.mean(cosines)))
    return k * cos / (1 + (k - 1) * cos), cos


def model_stock(rows, base, ratio: float, scratch=None) -> torch.Tensor:
    """t·mean_i θ_i + (1−t)·θ_base in fp32, rounded once to the base's dtype."""
    k, dev = rows.shape[0], rows.device
    widened = _empty(scratch, "stock_rows", rows.shape, torch.float32, dev).copy_(rows)
    avg = weighted_sum(widened, [1.0 / k] * k, scratch)
    part = _empty(scratch, "stock_base", base.shape, torch.float32, dev).copy_(base).mul_(fp32(1.0 - ratio))
    return avg.mul_(fp32(ratio)).add_(part).to(base.dtype, copy=True)
