"""``ties`` (Yadav et al., NeurIPS 2023): trim each τ_i to its top-density magnitudes per tensor, elect
signs, take the weighted mean of the agreeing entries.

The per-tensor thresholds come first, from an exact radix select over the chunks (one pass, or two
where the k-th largest |τ| may have low bits).
"""

from __future__ import annotations

import torch

from ordermerge.merging import task_vectors as tv
from ordermerge.merging.bits import stored_bits
from ordermerge.merging.methods import TaskVectorMethod
from ordermerge.merging.passes import TensorSums, chunks_per_tensor, gather


class Merger(TaskVectorMethod):
    def prepare(self, ctx, pool, tasks, progress):
        """Each input's exact k-th largest |τ| per tensor, by a radix select on its fp32 bits.

        Pass 1 counts the high 15 bits (and, per high bin, how many elements have low bits at all);
        pass 2 counts the low 16 bits inside the chosen high bin, only for the tensors where the k-th
        largest may have low bits (bf16 task vectors mostly have none): so usually one pass, not two.

        Memory: per worker, reused buffers of one chunk of K inputs + base and its (K, CHUNK) fp32
        task vectors; per tensor in flight, K x 2^16 int64 histogram counts (4 MB at K = 8).
        """
        k = len(ctx.models)
        chunks = chunks_per_tensor(tasks)
        rank = {n: torch.full((k,), tv.ties_rank(ctx.base.info(n).numel, ctx.params["density"])) for n in chunks}
        high = TensorSums(chunks, lambda n, hist: tv.first_pass(hist, rank[n]))
        gather(
            pool,
            lambda n, lo, c: high.add(n, tv.key_histogram(self._taus(ctx, n, lo, c), ctx.scratch)),
            tasks,
            progress,
            "ties thresholds",
        )
        second = [t for t in tasks if high.done[t[0]][2]]
        low = TensorSums(chunks_per_tensor(second), lambda n, hist: tv.top_bin(hist, high.done[n][1])[0])
        gather(
            pool,
            lambda n, lo, c: low.add(n, tv.low_histogram(self._taus(ctx, n, lo, c), high.done[n][0], ctx.scratch)),
            second,
            progress,
            "ties thresholds, low bits",
        )
        for n in chunks:
            hb = high.done[n][0]
            ctx.per_tensor[n] = tv.magnitude_threshold(hb, low.done[n] if n in low.done else torch.zeros_like(hb))
            ctx.tensor_stats[n] = {"threshold": ctx.per_tensor[n].tolist()}

    @staticmethod
    def _taus(ctx, name, start, count):
        return tv.task_vectors(*ctx.rows(name, start, count), ctx.scratch)

    def merge_chunk(self, ctx, name, start, count):
        rows, base = ctx.rows(name, start, count)
        out, kept = tv.ties(rows, base, ctx.probs, ctx.params["scale"], ctx.per_tensor[name], ctx.scratch)
        return stored_bits(out).cpu().numpy(), tv.KeptCounts(kept, count)
