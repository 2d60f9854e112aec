"""``ties`` (Yadav et al., NeurIPS 2023): trim each τ_i to its top-density magnitudes per tensor, elect
signs, take the weighted mean of the agreeing entries.

The per-tensor thresholds come first, from two radix-select passes over the chunks.
"""

from __future__ import annotations

import torch

from ordermerge.merging import task_vectors as tv
from ordermerge.merging.bits import stored_bits
from ordermerge.merging.methods import TaskVectorMethod
from ordermerge.merging.passes import TensorSums, chunks_per_tensor, gather


class Merger(TaskVectorMethod):
    def prepare(self, ctx, pool, tasks, progress):
        """Each input's exact k-th largest |τ| per tensor, by a two-pass radix select on its fp32 bits.

        Memory: per worker, one chunk of K inputs + base and its (K, CHUNK) fp32 task vectors; per
        tensor in flight, K x 2^16 int64 histogram counts (4 MB at K = 8), never a whole tensor.
        """
        k = len(ctx.models)
        chunks = chunks_per_tensor(tasks)
        rank = {n: torch.full((k,), tv.ties_rank(ctx.base.info(n).numel, ctx.params["density"])) for n in chunks}
        high = TensorSums(chunks, lambda n, hist: tv.top_bin(hist, rank[n]))
        gather(pool, lambda n, lo, c: high.add(n, tv.high_histogram(tv.task_vectors(*ctx.rows(n, lo, c)))),
               tasks, progress, "ties thresholds 1/2")
        low = TensorSums(chunks, lambda n, hist: tv.top_bin(hist, high.done[n][1])[0])
        gather(pool, lambda n, lo, c: low.add(n, tv.low_histogram(tv.task_vectors(*ctx.rows(n, lo, c)),
                                                                  high.done[n][0])),
               tasks, progress, "ties thresholds 2/2")
        for n in chunks:
            ctx.per_tensor[n] = tv.magnitude_threshold(high.done[n][0], low.done[n])
            ctx.tensor_stats[n] = {"threshold": ctx.per_tensor[n].tolist()}

    def merge_chunk(self, ctx, name, start, count):
        rows, base = ctx.rows(name, start, count)
        out, kept = tv.ties(rows, base, ctx.probs, ctx.params["scale"], ctx.per_tensor[name])
        return stored_bits(out).cpu().numpy(), tv.KeptCounts(kept, count)
