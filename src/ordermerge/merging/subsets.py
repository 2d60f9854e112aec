"""K-sweep (beyond the paper): which subsets of the K final checkpoints to merge.

How many fine-tunes does a user need? Merge random subsets of size 2, 4, ..., K and watch the
metrics level off. Subset i of size n is drawn from (seed, "ksweep", n, i) alone, so adding more
subsets or sizes never changes the ones already built; a draw that repeats an earlier subset of
the same size is redrawn, as long as distinct subsets remain. Imported by the Snakefile: no torch.
"""

from __future__ import annotations

from math import comb

from ordermerge.seeding import numpy_rng


def sweep_sizes(runs: int, sizes: list[int] | None) -> list[int]:
    """The configured sizes, or 2, 4, ..., K (and K itself when K is odd)."""
    if sizes:
        return sorted(set(sizes))
    out = list(range(2, runs + 1, 2))
    return out + [runs] if runs % 2 else out


def draw_subsets(runs: int, size: int, count: int, seed: int) -> list[tuple[int, ...]]:
    """Up to ``count`` distinct subsets (sorted run indices) of ``size`` out of ``runs``.

    There are only C(runs, size) distinct subsets: asking for more returns them all (size = K
    gives the single full set). Subset i depends only on (seed, size, i) and the subsets before it.
    """
    if not 1 <= size <= runs:
        raise ValueError(f"subset size {size} must be in 1..{runs} (the K runs)")
    count = min(count, comb(runs, size))
    out: list[tuple[int, ...]] = []
    for i in range(count):
        attempt = 0
        while True:
            rng = numpy_rng(seed, "ksweep", size, i, attempt)
            subset = tuple(sorted(int(x) for x in rng.choice(runs, size=size, replace=False)))
            if subset not in out:
                break
            attempt += 1
        out.append(subset)
    return out


def sweep_plan(runs: int, sizes: list[int] | None, count: int, seed: int) -> dict[int, list[tuple[int, ...]]]:
    """size -> its subsets: every (size, subset index) the workflow merges."""
    return {n: draw_subsets(runs, n, count, seed) for n in sweep_sizes(runs, sizes)}
