"""``task_arithmetic`` (Ilharco et al., ICLR 2023): θ_base + λ Σ w_i τ_i."""

from __future__ import annotations

from ordermerge.merging import task_vectors as tv
from ordermerge.merging.bits import stored_bits
from ordermerge.merging.methods import TaskVectorMethod


class Merger(TaskVectorMethod):
    def merge_chunk(self, ctx, name, start, count):
        rows, base = ctx.rows(name, start, count)
        return stored_bits(
            tv.task_arithmetic(rows, base, ctx.probs, ctx.params["scale"], ctx.scratch)
        ).cpu().numpy(), None
