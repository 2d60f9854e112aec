"""Multi-task merge (paper Table 3): single-task fine-tunes of one base merged into one model.

Faithful to the paper's Table 3: each task contributes ONE single-task model (run ``multitask.run``
of the first scheme, final epoch: the fine-tune the workflow already has), the merge sees one input
per task, and the merged model is evaluated on every task against that task's own single-task
model. Imported by the Snakefile: no torch.
"""

from __future__ import annotations


def merge_variants(methods: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(method, seed) pairs to build: average is deterministic, so only its first seed."""
    return [(m, s) for m in methods for s in (seeds[:1] if m == "average" else seeds)]
