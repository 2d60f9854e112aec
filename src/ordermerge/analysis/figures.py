"""Figures: Fig. 1 (position vs final loss), Fig. 3 (anchor-run segments), Fig. 4 (loss vs epoch)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ordermerge.analysis.stats import binned_means, format_ci, spearman  # noqa: E402
from ordermerge.merging import registry  # noqa: E402
from ordermerge.storage.atomic import atomic_path  # noqa: E402

POSITION_LABEL = "position in the first epoch (0 = seen first)"
LOSS_LABEL = "final training loss (nats / response token)"
SIGN_NOTE = (
    "ρ < 0: samples seen early end with a higher loss (the paper's direction); ρ > 0: the opposite. "
    "Paired ρ compares runs sample by sample, cancelling difficulty."
)


# One colour per merge method key in every figure (Fig. 3, Fig. 4, the K-sweep), in the registry's key order:
# the strong tab10 colours first, then their light tab20 partners; gray and black are left to the single runs.
_PALETTE = [plt.get_cmap("tab10")(i) for i in range(10) if i != 7] + [
    plt.get_cmap("tab20")(2 * i + 1) for i in range(10) if i != 7
]


def method_colour(key: str):
    """The colour of merge method ``key`` (average, resample1, ...): its place in registry.method_keys()."""
    keys = registry.method_keys()
    return _PALETTE[keys.index(key) % len(_PALETTE)] if key in keys else "tab:gray"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_fig1(positions: np.ndarray, losses: np.ndarray, row: dict, anchor: int, title: str, path: Path) -> None:
    n = positions.shape[1]
    bins = max(2, min(8, n // 4))
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    x, y = positions[anchor], losses[anchor]
    ax_a.scatter(x, y, s=18, alpha=0.5, color="tab:blue", label="samples")
    c, m, h = binned_means(x, y, bins)
    ax_a.errorbar(c, m, yerr=h, fmt="o-", color="black", capsize=3, label="binned mean ± 95% CI")
    slope, intercept = np.polyfit(x, y, 1)
    xs = np.array([0, n - 1])
    ax_a.plot(xs, intercept + slope * xs, "--", color="tab:red", label=f"linear fit (slope {slope:+.2e}/position)")
    ax_a.set_title(f"(a) run {anchor}: Spearman ρ = {row['rho_anchor']:+.2f} (p = {row['p_anchor']:.2g})")
    ax_a.set_xlabel(POSITION_LABEL)
    ax_a.set_ylabel(LOSS_LABEL)
    ax_a.legend(fontsize=8)
    cmap = plt.get_cmap("tab10")
    for k in range(positions.shape[0]):
        c, m, _ = binned_means(positions[k], losses[k], bins)
        ax_b.scatter(positions[k], losses[k], s=8, alpha=0.25, color=cmap(k % 10))
        label = f"run {k}: ρ = {spearman(positions[k], losses[k])[0]:+.2f}" if k < 10 else None
        ax_b.plot(c, m, "o-", color=cmap(k % 10), label=label)
    ax_b.set_title(
        f"(b) all {positions.shape[0]} runs; paired ρ = {row['rho_paired']:+.3f}, 95% CI"
        f"{format_ci(row['rho_paired_ci_low'], row['rho_paired_ci_high'], digits=3)} (perm. p = "
        f"{row['p_paired_permutation']:.2g})\n{row['verdict_paired']}",
        fontsize=9,
    )
    ax_b.set_xlabel(POSITION_LABEL)
    ax_b.legend(fontsize=8, ncol=2)
    fig.suptitle(title + "\n" + SIGN_NOTE, fontsize=10)
    _save(fig, path)


def segment_means(anchor_positions: np.ndarray, losses: np.ndarray, segments: int) -> np.ndarray:
    """Mean loss per segment of the anchor's first-epoch order (segment 0 = seen first)."""
    order = np.argsort(anchor_positions)
    return np.array([losses[chunk].mean() for chunk in np.array_split(order, segments)])


def plot_fig3(
    positions: np.ndarray,
    losses: np.ndarray,
    merged: dict[str, np.ndarray],
    anchor: int,
    segments: int,
    title: str,
    path: Path,
) -> list[dict]:
    """Returns the per-series ρ vs the anchor's positions (for the imbalance table)."""
    anchor_pos = positions[anchor]
    xs = np.arange(segments)
    fig, ax = plt.subplots(figsize=(8, 5))
    rows = []
    rho = spearman(anchor_pos, losses[anchor])[0]
    ax.plot(
        xs,
        segment_means(anchor_pos, losses[anchor], segments),
        "o-",
        color="black",
        lw=2,
        label=f"anchor run {anchor} (ρ = {rho:+.2f})",
    )
    rows.append({"series": f"run{anchor}", "role": "anchor", "rho_vs_anchor_position": rho})
    for k in range(positions.shape[0]):
        if k == anchor:
            continue
        rho = spearman(anchor_pos, losses[k])[0]
        rows.append({"series": f"run{k}", "role": "other run", "rho_vs_anchor_position": rho})
        ax.plot(
            xs,
            segment_means(anchor_pos, losses[k], segments),
            "x",
            color="tab:gray",
            ms=8,
            label="other runs" if k == (1 if anchor == 0 else 0) else None,
        )
    for i, (method, merged_losses) in enumerate(sorted(merged.items())):
        rho = spearman(anchor_pos, merged_losses)[0]
        rows.append({"series": method, "role": "merged", "rho_vs_anchor_position": rho})
        ax.plot(
            xs + 0.08 * (i + 1),
            segment_means(anchor_pos, merged_losses, segments),
            "o",
            ms=7,
            color=method_colour(method),
            label=f"merged: {method} (ρ = {rho:+.2f})",
        )
    ax.set_xticks(xs, [f"{s + 1}" for s in xs])
    ax.set_xlabel(f"segment of the anchor run's first epoch (1 = seen first; {segments} segments)")
    ax.set_ylabel("mean final training loss (nats / response token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)
    return rows


def plot_fig4(curves: dict[str, dict[int, list[float]]], split: str, title: str, path: Path) -> None:
    """curves[series][epoch] = losses (one per run for 'single', one per seed for merges)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for series, by_epoch in curves.items():
        epochs = sorted(by_epoch)
        means = [np.mean(by_epoch[e]) for e in epochs]
        stds = [np.std(by_epoch[e], ddof=1) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
        style = (
            dict(color="black", lw=2, capsize=3) if series == "single" else dict(color=method_colour(series), capsize=3)
        )
        label = "single runs (mean ± std)" if series == "single" else f"merged: {series}"
        ax.errorbar(epochs, means, yerr=stds, fmt="o-", label=label, **style)
    ax.set_xlabel("epoch (checkpoint at its end)")
    ax.set_xticks(sorted({e for c in curves.values() for e in c}))
    ax.set_ylabel(f"{split} loss (nats / response token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)
