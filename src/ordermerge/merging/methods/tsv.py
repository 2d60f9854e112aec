"""``tsv``: TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference
in Model Merging").

Per 2-D float tensor, with τ_i = θ_i − θ_base in fp32: keep each τ_i's top k = max(1, ⌊min(m, n) / K⌋)
singular triplets, stack the kept U's (m × Kk) and V's (n × Kk), decorrelate each stack by orthogonal
Procrustes (the nearest matrix with orthonormal columns, P Qᵀ from the stack's SVD P Σ Qᵀ), and
merge τ = U⊥ diag(S) V⊥ᵀ, θ = θ_base + λ·τ. Other float tensors (1-D) get task arithmetic with the
weights. The engine hands this method each 2-D tensor whole (K full tensors of one name at a time).

Deterministic: the SVDs run on the CPU in fp32 on one thread (the engine's workers run torch with one
intra-op thread), so the bytes depend on neither ``--device`` nor the number of workers.
"""

from __future__ import annotations

import torch

from ordermerge.merging import task_vectors as tv
from ordermerge.merging.bits import CHUNK, stored_bits
from ordermerge.merging.methods import TaskVectorMethod


def _orthogonalize(stack: torch.Tensor) -> torch.Tensor:
    """Orthogonal Procrustes: the matrix with orthonormal columns nearest to ``stack`` (P Qᵀ)."""
    p, _, qh = torch.linalg.svd(stack, full_matrices=False)
    return p @ qh


def tsv_delta(taus: torch.Tensor) -> torch.Tensor:
    """The merged (m, n) fp32 task vector of (K, m, n) fp32 task vectors."""
    k, m, n = taus.shape
    rank = max(1, min(m, n) // k)
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :rank])
        ss.append(s[:rank])
        vs.append(vh[:rank].T)
    u_perp, v_perp = _orthogonalize(torch.cat(us, 1)), _orthogonalize(torch.cat(vs, 1))
    return (u_perp * torch.cat(ss)) @ v_perp.T


class Merger(TaskVectorMethod):
    def chunk_size(self, info):
        return info.numel if len(info.shape) == 2 and info.numel else CHUNK

    def merge_chunk(self, ctx, name, start, count):
        shape = ctx.base.info(name).shape
        if len(shape) != 2:
            rows, base = ctx.rows(name, start, count)
            return stored_bits(tv.task_arithmetic(rows, base, ctx.probs, ctx.params["scale"])).cpu().numpy(), None
        rows, base = ctx.rows(name, start, count, device="cpu")
        delta = tsv_delta(tv.task_vectors(rows, base).reshape(len(rows), *shape)).reshape(-1)
        return stored_bits(tv.apply_delta(base, delta, ctx.params["scale"])).numpy(), None
