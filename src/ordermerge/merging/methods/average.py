"""``average`` (Ju et al., Eq. 1): Σ w_i θ_i in fp32, stored in the inputs' dtype."""

from __future__ import annotations

import torch

from ordermerge.merging.bits import stored_bits, weighted_average
from ordermerge.merging.methods import MergeMethod


class Merger(MergeMethod):
    def merge_chunk(self, ctx, name, start, count):
        rows = torch.from_numpy(ctx.read(name, start, count)).view(ctx.base.info(name).torch_dtype).to(ctx.device)
        return stored_bits(weighted_average(rows, ctx.probs, ctx.scratch)).cpu().numpy(), None
