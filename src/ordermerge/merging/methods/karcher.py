"""``karcher``: the spherical mean of K >= 2 models, per tensor: the weighted Karcher (Riemannian,
Fréchet) mean of the inputs' weight directions on the unit sphere, times the weighted mean of their
norms; mergekit's ``karcher`` (``mergekit/merge_methods/karcher.py``, ``karcher_merge_tensors``),
chosen over its ``multislerp`` (one tangent-space step, undefined for antipodal sets) because it is
the mean the sphere's geometry defines, and equals slerp at t = 0.5 for 2 inputs of equal norm.

For one tensor, flattened, with norms n_i = ‖θ_i‖ and directions û_i = θ_i/n_i; inputs with n_i <= tol
drop out of the direction, weights a_i renormalised over the rest (the weights w_i, uniform unless
``--weights``; mergekit passes uniform ones):

    u ← Σ a_i û_i / ‖Σ a_i û_i‖                       (the first valid û if that norm < tol)
    repeat at most max_iter times:
        T = Σ_{i: θ_i >= tol} a_i · θ_i / sin θ_i · (û_i − cos θ_i · u),  cos θ_i = clamp(⟨u, û_i⟩, ±1)
        stop if ‖T‖ < tol;  u ← cos‖T‖ · u + sin‖T‖ · T/‖T‖;  u ← u/‖u‖
    result = (Σ_i w_i n_i) · u

Streaming: u stays in the span of the û_i, so the iteration runs on K coefficients with the K × K
Gram matrix of the inputs (``prepare``'s whole-tensor pass, fp64, summed in chunk order); the merge
pass is then elementwise, Σ c_i θ_i in fp32 (slerp's :func:`~ordermerge.merging.methods.slerp.combine`).
Against mergekit: the same algorithm in exact arithmetic; mergekit rounds û_i and u to the stored
dtype between steps and sums in fp32, we keep them exact in fp64 until the one final rounding.
"""

from __future__ import annotations

import math

import numpy as np

from ordermerge.merging.bits import stored_bits
from ordermerge.merging.methods import MergeMethod
from ordermerge.merging.methods.slerp import combine, input_grams, input_rows


def karcher_coefficients(
    gram: np.ndarray, weights: list[float], max_iter: int, tol: float
) -> tuple[np.ndarray, int, bool]:
    """(c, steps, converged): Σ c_i θ_i is the Karcher mean of θ_i (module docstring) from their Gram matrix."""
    k = len(weights)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    valid = [i for i in range(k) if norms[i] > tol]
    out = np.zeros(k)
    if not valid:
        return out, 0, True  # every input (near) zero: so is the mean
    a = np.array([weights[i] for i in valid], dtype=np.float64)
    a = a / a.sum()
    n = norms[valid]
    unit = gram[np.ix_(valid, valid)] / np.outer(n, n)  # Gram matrix of the directions û_i

    def length(beta):  # ‖Σ β_j û_j‖
        return math.sqrt(max(0.0, float(beta @ unit @ beta)))

    beta = a.copy()
    norm_u = length(beta)
    beta = beta / norm_u if norm_u >= tol else np.eye(len(valid))[0]
    steps, converged = 0, False
    for _ in range(max_iter):
        cos = np.clip(unit @ beta, -1.0, 1.0)
        tangent = np.zeros(len(valid))
        for i, (ai, ci) in enumerate(zip(a, cos)):
            theta = math.acos(ci)
            if theta < tol:
                continue
            f = ai * theta / math.sin(theta)
            tangent[i] += f
            tangent -= f * ci * beta
        norm_t = length(tangent)
        if norm_t < tol:
            converged = True
            break
        steps += 1
        beta = math.cos(norm_t) * beta + math.sin(norm_t) * tangent / norm_t
        norm_u = length(beta)
        if norm_u > tol:
            beta = beta / norm_u
    scale = float(sum(w * x for w, x in zip(weights, norms)))
    out[valid] = scale * beta / n
    return out, steps, converged


class Merger(MergeMethod):
    def prepare(self, ctx, pool, tasks, progress):
        p = ctx.params
        for name, gram in input_grams(ctx, pool, tasks, progress, "karcher means").items():
            coefficients, steps, converged = karcher_coefficients(gram, ctx.probs, p["max_iter"], p["tol"])
            ctx.per_tensor[name] = coefficients.tolist()
            ctx.tensor_stats[name] = {"coefficients": coefficients.tolist(), "steps": steps, "converged": converged}

    def merge_chunk(self, ctx, name, start, count):
        out = combine(input_rows(ctx, name, start, count), ctx.per_tensor[name], ctx.scratch)
        return stored_bits(out).cpu().numpy(), None

    def summary(self, ctx, tasks, results):
        stats = ctx.tensor_stats.values()
        headline = {
            "most_steps": max((s["steps"] for s in stats), default=0),
            "not_converged_tensors": sum(not s["converged"] for s in stats),
        }
        return headline, {name: ctx.tensor_stats[name] for name in sorted(ctx.tensor_stats)}, {}
