"""Statistics of the position effect: plain and difficulty-adjusted (paired) rank correlations."""

from __future__ import annotations

from itertools import combinations

import numpy as np
from scipy import stats

from ordermerge.seeding import numpy_rng


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def paired_rho(positions: np.ndarray, losses: np.ndarray) -> float:
    """ρ between Δ first-epoch position and Δ final loss over all run pairs (rows = runs).

    Differencing two runs cancels each sample's difficulty, which swamps the plain ρ at small scale.
    """
    dp, dl = [], []
    for i, j in combinations(range(positions.shape[0]), 2):
        dp.append(positions[i] - positions[j])
        dl.append(losses[i] - losses[j])
    return float(stats.spearmanr(np.concatenate(dp), np.concatenate(dl)).statistic)


def permutation_p(positions: np.ndarray, losses: np.ndarray, n_perm: int = 999, seed: int = 0) -> float:
    """Two-sided p of the paired ρ under the null 'position does not matter': each sample's
    positions are shuffled across runs (its losses stay), preserving per-run permutations' marginals."""
    observed = abs(paired_rho(positions, losses))
    rng = numpy_rng(seed, "permutation-test")
    hits = 0
    for _ in range(n_perm):
        shuffled = np.array([rng.permutation(col) for col in positions.T]).T
        hits += abs(paired_rho(shuffled, losses)) >= observed
    return (hits + 1) / (n_perm + 1)


def binned_means(x: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres, means and 95 % CI half-widths of y in equal-count bins of x."""
    order = np.argsort(x)
    centres, means, half = [], [], []
    for chunk in np.array_split(order, bins):
        if len(chunk) == 0:
            continue
        centres.append(float(np.mean(x[chunk])))
        means.append(float(np.mean(y[chunk])))
        sem = float(np.std(y[chunk], ddof=1) / np.sqrt(len(chunk))) if len(chunk) > 1 else 0.0
        half.append(1.96 * sem)
    return np.array(centres), np.array(means), np.array(half)
