"""The merge methods on K same-shaped tensors (or one chunk of them): pure functions.

- ``average`` (paper Eq. 1): Σ w_i θ_i, accumulated in fp32, stored in the inputs' dtype.
- ``select`` (paper Eq. 2): every element is taken whole from ONE sub-model, drawn with p_i = w_i.
- ``select`` + ``resample=n`` (paper Eq. 3): where the drawn sub-model's task vector is exactly
  zero (stored value == base's stored value, compared bit for bit), draw again from ALL K
  sub-models, up to n times.

Select works on raw bits, in chunks of ``CHUNK`` elements of the flattened tensor. Each chunk has
its own CPU random stream seeded by (seed, tensor name, chunk index), so bytes depend on neither
tensor order, sharding, threads nor device, and chunks can be merged in parallel.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from ordermerge.seeding import derive_seed
from ordermerge.storage.dtypes import stored_bits  # noqa: F401  (re-exported for the merge methods)

# Elements per random stream. Part of what a seed means: changing it changes every select merge.
CHUNK = 1 << 18
INT_VIEW = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}  # the same, for raw numpy buffers
_ARANGE = np.arange(CHUNK, dtype=np.intp)


def normalized_weights(weights: list[float] | None, k: int) -> list[float]:
    if weights is None:
        return [1.0 / k] * k
    if len(weights) != k:
        raise ValueError(f"got {len(weights)} weights for {k} models; give exactly one weight per model")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    total = float(sum(weights))
    return [w / total for w in weights]


def chunk_rng(seed: int, name: str, chunk: int) -> np.random.PCG64:
    """The random stream of chunk ``chunk`` (elements chunk*CHUNK...) of tensor ``name``.

    A bare bit generator: its raw output is stable across numpy versions, unlike Generator methods.
    """
    return np.random.PCG64(derive_seed(seed, "merge", name, chunk))


def weighted_average(tensors, weights: list[float], scratch=None) -> torch.Tensor:
    """Σ w_i t_i in fp32, rounded once to the inputs' dtype; elementwise, so chunking keeps the bytes.

    ``scratch(key, shape, dtype, device)`` (the merge engine's per-thread buffers) supplies the fp32
    temporaries when given; the ops, and so the bytes, are the same."""
    shape, device = tensors[0].shape, tensors[0].device
    if scratch is None:
        acc, widened = (torch.empty(shape, dtype=torch.float32, device=device) for _ in range(2))
    else:
        acc, widened = (scratch(key, shape, torch.float32, device) for key in ("average_sum", "average_term"))
    acc.zero_()  # widened is reused: a fresh fp32 copy per input costs page faults
    for t, w in zip(tensors, weights):
        acc.add_(widened.copy_(t), alpha=w)
    return acc.to(tensors[0].dtype, copy=True)  # never the (reused) buffer itself, fp32 inputs too


def gram_fp64(rows: torch.Tensor, scratch=None) -> np.ndarray:
    """(K, K) float64 ⟨r_i, r_j⟩ of (K, n) float rows (one chunk), on the CPU whatever the merge's device.

    Elementwise products and torch's own sum, no BLAS (whose order varies with alignment and threads),
    so whole-tensor quantities summed from it, and every byte after them, are the same on any device.
    With ``scratch`` the temporaries are reused per-thread buffers; same ops, same sums."""
    rows = rows.cpu()
    shape = (rows.shape, rows.shape[1:])
    if scratch is None:
        wide, product = (torch.empty(s, dtype=torch.float64) for s in shape)
    else:
        wide, product = (scratch(key, s, torch.float64, "cpu") for key, s in zip(("gram_f64", "gram_product"), shape))
    wide.copy_(rows)
    k = rows.shape[0]
    gram = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            gram[i, j] = gram[j, i] = float(torch.mul(wide[i], wide[j], out=product).sum())
    return gram


def _raw_bytes(rng: np.random.PCG64, n: int) -> np.ndarray:
    return rng.random_raw(-(-n // 8)).astype("<u8", copy=False).view(np.uint8)[:n]


def draw_indices(n: int, probs: list[float], rng: np.random.PCG64) -> np.ndarray:
    """``n`` i.i.d. sub-model indices (uint8) with P(i) = probs[i] (exactly 1/K when uniform)."""
    k = len(probs)
    if all(abs(p - 1.0 / k) < 1e-12 for p in probs):
        # One random byte per element: bytes below the largest multiple of k are uniform mod k,
        # the few above it (fewer than k/256) are redrawn. Much cheaper than Generator.integers.
        b = _raw_bytes(rng, n)
        limit = 256 - 256 % k
        bad = np.flatnonzero(b >= limit) if limit < 256 else ()
        while len(bad):
            b[bad] = _raw_bytes(rng, len(bad))
            bad = bad[b[bad] >= limit]
        return b - np.uint8(k) * (b // np.uint8(k))  # b % k; numpy's uint8 remainder is slow
    u = (rng.random_raw(n) >> np.uint64(11)) * 2.0**-53  # uniform doubles in [0, 1)
    return np.minimum(np.searchsorted(np.cumsum(probs), u, side="right"), k - 1).astype(np.uint8)


_LOCAL = threading.local()


def _thread_buffer(n: int, dtype) -> np.ndarray:
    """An uninitialised array of ``n`` elements, reused by this thread: a chunk's 1 MiB of flat
    positions costs no fresh mapping (and page faults) per chunk (see the engine's _bounded_heap)."""
    buf = getattr(_LOCAL, "positions", None)
    nbytes = n * np.dtype(dtype).itemsize
    if buf is None or buf.size < nbytes:
        buf = _LOCAL.positions = np.empty(nbytes, np.uint8)
    return buf[:nbytes].view(dtype)


@dataclass
class SelectStats:
    counts: list[int]  # elements finally taken from each sub-model
    resampled: list[int] = field(default_factory=list)  # elements redrawn in each round
    zero_after: int = 0  # elements whose drawn value still equals the base's

    def __add__(self, other: SelectStats) -> SelectStats:
        return SelectStats(
            [a + b for a, b in zip(self.counts, other.counts)],
            [a + b for a, b in zip(self.resampled, other.resampled)],
            self.zero_after + other.zero_after,
        )


def select_bits(
    stack: np.ndarray, probs: list[float], rng: np.random.PCG64, base: np.ndarray | None = None, resample: int = 0
) -> tuple[np.ndarray, SelectStats]:
    """Select on one chunk: ``stack`` is (K, n) C-contiguous raw bits, ``base`` (n,) the base's bits."""
    if resample > 0 and base is None:
        raise ValueError("resample needs the base tensor to find zero task-vector elements")
    k, n = stack.shape
    flat = stack.reshape(-1)
    # Flat positions (model * n + element) index the stack in one take: no K x n masks. In intp,
    # take's own index type, into a reused buffer: int32 positions would make take allocate (and
    # page-fault) an intp copy of them at every gather.
    lin_type = np.intp
    positions = _ARANGE[:n] if n <= CHUNK else np.arange(n, dtype=np.intp)
    idx = draw_indices(n, probs, rng)
    lin = _thread_buffer(n, lin_type)
    out = np.empty(n, dtype=stack.dtype)

    def gather() -> None:
        np.multiply(idx, n, out=lin, dtype=lin_type)
        np.add(lin, positions, out=lin)
        flat.take(lin, out=out, mode="wrap")  # in range by construction; "wrap" skips the bounds check

    gather()
    stats = SelectStats(counts=[], resampled=[])
    for _ in range(resample):
        # The drawn value equals the base's exactly where the drawn task vector is zero. Every
        # element gets a fresh draw (from ALL K, as the paper does) but only those zeros take it:
        # dense passes beat gathering the zeros' positions, which are a third to two thirds of all.
        zero = out == base
        stats.resampled.append(int(np.count_nonzero(zero)))
        if not stats.resampled[-1]:
            stats.resampled += [0] * (resample - len(stats.resampled))  # nothing left to redraw
            break
        new = draw_indices(n, probs, rng)
        mask = np.negative(zero.view(np.uint8))  # 0x00 / 0xFF
        new ^= idx
        new &= mask
        idx ^= new  # idx = where(zero, new, idx), branch-free: np.copyto(where=) is ~5x slower
        gather()
    if resample > 0:
        stats.zero_after = int(np.count_nonzero(out == base))
    stats.counts = torch.bincount(torch.from_numpy(idx), minlength=k).tolist()  # 3x numpy's on uint8
    return out, stats


def select(
    tensors: list[torch.Tensor],
    probs: list[float],
    seed: int,
    name: str = "",
    base: torch.Tensor | None = None,
    resample: int = 0,
) -> tuple[torch.Tensor, SelectStats]:
    """Parameter selection (+ resampling) of whole tensors; the streaming merge gives the same bytes."""
    if resample > 0 and base is None:
        raise ValueError("resample needs the base tensor to find zero task-vector elements")
    shape, dtype = tensors[0].shape, tensors[0].dtype
    stack = torch.stack([stored_bits(t).reshape(-1) for t in tensors]).numpy()
    base_bits = stored_bits(base).reshape(-1).numpy() if resample else None
    out = np.empty_like(stack[0])
    stats = SelectStats([0] * len(tensors), [0] * resample)
    for c, lo in enumerate(range(0, out.size, CHUNK)):
        hi = min(lo + CHUNK, out.size)
        part, s = select_bits(
            np.ascontiguousarray(stack[:, lo:hi]),
            probs,
            chunk_rng(seed, name, c),
            None if base_bits is None else base_bits[lo:hi],
            resample,
        )
        out[lo:hi] = part
        stats = stats + s
    return torch.from_numpy(out).view(dtype).reshape(shape), stats
