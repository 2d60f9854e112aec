"""``dare`` (Yu et al., ICML 2024): drop τ elements with probability p, rescale by 1/(1−p), add.

The keep mask comes from the chunk's own random stream, so bytes depend on neither threads nor device.
"""

from __future__ import annotations

import torch

from ordermerge.merging import task_vectors as tv
from ordermerge.merging.bits import CHUNK, chunk_rng, stored_bits
from ordermerge.merging.methods import TaskVectorMethod


class Merger(TaskVectorMethod):
    def merge_chunk(self, ctx, name, start, count):
        rows, base = ctx.rows(name, start, count)
        p = ctx.params
        k = len(ctx.models)
        buf = ctx.scratch("dare_keep", (k, count), torch.bool, "cpu").numpy()  # the draws are made on the CPU
        keep = tv.dare_keep_mask(k, count, p["drop_rate"], chunk_rng(ctx.seed, name, start // CHUNK), out=buf)
        out, kept = tv.dare(
            rows, base, ctx.probs, p["scale"], torch.from_numpy(keep).to(ctx.device), p["drop_rate"], ctx.scratch
        )
        return stored_bits(out).cpu().numpy(), tv.KeptCounts(kept, count)
