"""``slerp``: spherical linear interpolation between the 2 models' weights, per tensor, as mergekit
defines it (``mergekit/merge_methods/slerp.py``; Shoemake, SIGGRAPH 1985).

For one tensor of the first input, a, and of the second, b, both flattened, with â = a/‖a‖ and
b̂ = b/‖b‖ (a norm at or below 1e-8 is left as it is, as in mergekit) and cos θ = ⟨â, b̂⟩:

    |cos θ| > 0.9995 (nearly colinear):  (1 − t)·a + t·b                            (lerp)
    otherwise:                           sin(θ − tθ)/sin θ · a + sin(tθ)/sin θ · b

on the weights themselves (not task vectors: the base is not read). t = 0 is a, t = 1 is b.

Streaming: the norms and the dot product are whole-tensor quantities, so ``prepare`` sums each
tensor's fp64 Gram matrix over its chunks (in chunk order: the same on any thread count or device)
and turns it into two coefficients per tensor; the merge pass is then elementwise, c_a·a + c_b·b in
fp32, one rounding per multiply and per add, rounded once to the stored dtype. A coefficient of
exactly 0 adds nothing, so t = 0 and t = 1 give the inputs' bytes (−0 and all).

Against mergekit: the same formula and threshold; its norms and dot are fp32 sums, ours fp64, so a
coefficient may differ in its last fp32 bits and an element by a rounding of the stored dtype.
Fine-tunes of one base are nearly colinear in most tensors, where slerp is lerp (as in mergekit);
merge.json records per tensor cos θ, whether it fell back to lerp, and the two coefficients.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ordermerge.merging.bits import gram_fp64, stored_bits
from ordermerge.merging.methods import MergeMethod, require_uniform_weights
from ordermerge.merging.passes import tensor_totals
from ordermerge.merging.task_vectors import fp32

DOT_THRESHOLD = 0.9995  # mergekit's: above it (in |cos θ|) the two are taken as colinear, and lerped
EPS = 1e-8  # mergekit's: a tensor with a norm at or below it is not normalised


def slerp_coefficients(gram: np.ndarray, t: float) -> tuple[float, float, float, bool]:
    """(c_a, c_b, cos θ, lerp?) of mergekit's slerp at ``t`` from the (2, 2) Gram matrix of a and b."""
    na, nb = math.sqrt(gram[0, 0]), math.sqrt(gram[1, 1])
    cos = float(gram[0, 1]) / (na if na > EPS else 1.0) / (nb if nb > EPS else 1.0)
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t, cos, True
    theta = math.acos(cos)
    theta_t = theta * t  # as mergekit: sin(θ − tθ), exactly sin θ at t = 0 and sin 0 at t = 1
    return math.sin(theta - theta_t) / math.sin(theta), math.sin(theta_t) / math.sin(theta), cos, False


def input_rows(ctx, name: str, start: int, count: int, device=None) -> torch.Tensor:
    """(K, count) of the K inputs' chunk in their stored dtype, on ``device`` (the base is not read)."""
    rows = torch.from_numpy(ctx.read(name, start, count)).view(ctx.base.info(name).torch_dtype)
    return rows.to(device or ctx.device)


def input_grams(ctx, pool, tasks, progress: bool, desc: str) -> dict[str, np.ndarray]:
    """Per tensor: the (K, K) fp64 Gram matrix of the K inputs' weights; refuses non-finite weights."""
    grams = tensor_totals(
        pool, lambda n, lo, c: gram_fp64(input_rows(ctx, n, lo, c, "cpu"), ctx.scratch), tasks, progress, desc
    )
    for name, gram in grams.items():
        if not np.all(np.isfinite(gram)):
            raise ValueError(
                f"tensor {name}: an input holds inf or NaN weights (or norms beyond fp64), so its "
                "angle is undefined; merge finite checkpoints"
            )
    return grams


def combine(rows: torch.Tensor, coefficients, scratch) -> torch.Tensor:
    """Σ c_i·rows_i over the nonzero c_i, in input order, in fp32 (one rounding per multiply and add),
    rounded once to the rows' dtype. Starts from the first term, not from 0: one term with c = 1 is
    that input's bytes exactly (−0 included)."""
    wide = scratch("sphere_rows", rows.shape, torch.float32, rows.device).copy_(rows)
    acc = scratch("sphere_sum", rows.shape[1:], torch.float32, rows.device)
    term = scratch("sphere_term", rows.shape[1:], torch.float32, rows.device)
    terms = [(row, fp32(c)) for row, c in zip(wide, coefficients) if fp32(c) != 0.0]
    if not terms:
        return acc.zero_().to(rows.dtype, copy=True)
    torch.mul(terms[0][0], terms[0][1], out=acc)
    for row, c in terms[1:]:
        acc.add_(torch.mul(row, c, out=term))
    return acc.to(rows.dtype, copy=True)  # never the (reused) buffer itself, fp32 inputs too


class Merger(MergeMethod):
    def check(self, ctx):
        require_uniform_weights(ctx, "slerp weighs the 2 models by --t, not by weights")

    def prepare(self, ctx, pool, tasks, progress):
        t = ctx.params["t"]
        for name, gram in input_grams(ctx, pool, tasks, progress, "slerp angles").items():
            ca, cb, cos, lerp = slerp_coefficients(gram, t)
            ctx.per_tensor[name] = (ca, cb)
            ctx.tensor_stats[name] = {"cos": cos, "lerp": lerp, "coefficients": [ca, cb]}

    def merge_chunk(self, ctx, name, start, count):
        out = combine(input_rows(ctx, name, start, count), ctx.per_tensor[name], ctx.scratch)
        return stored_bits(out).cpu().numpy(), None

    def summary(self, ctx, tasks, results):
        lerped = sum(s["lerp"] for s in ctx.tensor_stats.values())
        stats = {"slerp_tensors": len(ctx.tensor_stats) - lerped, "lerp_tensors": lerped}
        return stats, {name: ctx.tensor_stats[name] for name in sorted(ctx.tensor_stats)}, {}
