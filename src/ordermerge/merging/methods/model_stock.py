"""``model_stock`` (Jang et al., ECCV 2024): interpolate the average toward the base by the task
vectors' mean pairwise cosine, per tensor (a Gram matrix summed over chunks first)."""

from __future__ import annotations

from ordermerge.merging import task_vectors as tv
from ordermerge.merging.bits import stored_bits
from ordermerge.merging.methods import TaskVectorMethod, require_uniform_weights
from ordermerge.merging.passes import tensor_totals


class Merger(TaskVectorMethod):
    def check(self, ctx):
        require_uniform_weights(ctx, "model_stock averages the inputs uniformly (Jang et al.)")

    def prepare(self, ctx, pool, tasks, progress):
        """Per tensor: the Gram matrix of task vectors, summed over chunks in chunk order (fp64, CPU)."""
        grams = tensor_totals(
            pool,
            lambda n, lo, c: tv.gram_fp64(*ctx.rows(n, lo, c, device="cpu"), ctx.scratch),
            tasks,
            progress,
            "model_stock angles",
        )
        for name, gram in grams.items():
            ratio, cosine = tv.model_stock_ratio(gram)
            ctx.per_tensor[name] = ratio
            ctx.tensor_stats[name] = {"ratio": ratio, "cosine": cosine}

    def merge_chunk(self, ctx, name, start, count):
        rows, base = ctx.rows(name, start, count)
        return stored_bits(tv.model_stock(rows, base, ctx.per_tensor[name], ctx.scratch)).cpu().numpy(), None
