"""``select`` (Ju et al., Eq. 2) and ``resampleN`` (Eq. 3): every element taken whole from one input.

Raw bits gathered on the CPU (where the per-chunk random draws are made) whatever the device.
``resample`` is this method's parameter (``ctx.params``); the registry spells select with
``resample = N`` as the key ``resampleN`` in paths and configs.
"""

from __future__ import annotations

from ordermerge.merging.bits import CHUNK, SelectStats, chunk_rng, select_bits
from ordermerge.merging.methods import MergeMethod


class Merger(MergeMethod):
    def merge_chunk(self, ctx, name, start, count):
        resample = ctx.params["resample"]
        stack = ctx.read(name, start, count, with_base=resample > 0)
        k = len(ctx.models)
        rng = chunk_rng(ctx.seed, name, start // CHUNK)
        return select_bits(stack[:k], ctx.probs, rng, stack[k] if resample else None, resample)

    def summary(self, ctx, tasks, results):
        per_tensor: dict[str, SelectStats] = {}
        for (name, _, _), stats in zip(tasks, results):
            if isinstance(stats, SelectStats):
                per_tensor[name] = per_tensor[name] + stats if name in per_tensor else stats
        total = SelectStats([0] * len(ctx.models), [0] * ctx.params["resample"])
        for stats in per_tensor.values():
            total = total + stats
        selected = sum(total.counts)
        stats = {
            # over the elements that were selected (integer tensors are copied, not selected)
            "fraction_from": [c / max(1, selected) for c in total.counts],
            "resampled_per_round": total.resampled,
            "zero_task_vector_after": total.zero_after,
        }
        return (
            stats,
            {
                name: {
                    "fraction_from": [c / max(1, sum(s.counts)) for c in s.counts],
                    "resampled": s.resampled,
                    "zero_after": s.zero_after,
                }
                for name, s in sorted(per_tensor.items())
            },
            {},
        )
