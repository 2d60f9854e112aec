"""The analysis stage: Fig. 1 (position vs final loss), the imbalance statistics, and Table 1."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .atomic import atomic_path  # noqa: E402
from .orders import first_epoch_positions, load_order  # noqa: E402
from .stats import binned_means, paired_rho, permutation_p, spearman  # noqa: E402


def position_loss_matrix(results: Path, model: str, task: str, scheme: str, runs: int, epoch: int):
    """positions[k, i], losses[k, i]: sample i's first-epoch position and final train loss in run k."""
    base = results / model / task / scheme
    positions, losses = [], []
    for k in range(runs):
        positions.append(first_epoch_positions(load_order(base / "orders" / f"run{k}.npy")))
        df = pd.read_csv(base / "losses" / f"run{k}" / f"epoch{epoch}.csv")
        df = df[df["split"] == "train"].sort_values("row")
        losses.append(df["loss"].to_numpy())
    return np.array(positions), np.array(losses)


def imbalance_row(positions: np.ndarray, losses: np.ndarray, anchor: int, seed: int) -> dict:
    n = positions.shape[1]
    per_run = [spearman(positions[k], losses[k]) for k in range(positions.shape[0])]
    tenth = max(1, n // 10)
    first = np.concatenate([losses[k][positions[k] < tenth] for k in range(len(losses))])
    last = np.concatenate([losses[k][positions[k] >= n - tenth] for k in range(len(losses))])
    residual = losses - losses.mean(axis=0, keepdims=True)
    pooled = spearman(positions.ravel(), residual.ravel())
    return {
        "n_samples": n,
        "runs": positions.shape[0],
        "rho_anchor": per_run[anchor][0],
        "p_anchor": per_run[anchor][1],
        "rho_mean_over_runs": float(np.mean([r for r, _ in per_run])),
        "rho_residual_pooled": pooled[0],
        "p_residual_pooled": pooled[1],
        "rho_paired": paired_rho(positions, losses),
        "p_paired_permutation": permutation_p(positions, losses, n_perm=499, seed=seed),
        "loss_first_decile": float(first.mean()),
        "loss_last_decile": float(last.mean()),
    }


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
    ax_a.set_xlabel("position in the first epoch (0 = seen first)")
    ax_a.set_ylabel("final training loss (nats / response token)")
    ax_a.legend(fontsize=8)
    cmap = plt.get_cmap("tab10")
    for k in range(positions.shape[0]):
        c, m, _ = binned_means(positions[k], losses[k], bins)
        ax_b.scatter(positions[k], losses[k], s=8, alpha=0.25, color=cmap(k % 10))
        ax_b.plot(c, m, "o-", color=cmap(k % 10), label=f"run {k}: ρ = {spearman(positions[k], losses[k])[0]:+.2f}")
    ax_b.set_title(f"(b) all {positions.shape[0]} runs; paired ρ = {row['rho_paired']:+.2f} "
                   f"(perm. p = {row['p_paired_permutation']:.2g})")
    ax_b.set_xlabel("position in the first epoch (0 = seen first)")
    ax_b.legend(fontsize=8, ncol=2)
    fig.suptitle(title + "\nρ < 0: samples seen early end with a higher loss (the paper's direction); "
                 "ρ > 0: the opposite. Paired ρ compares runs sample by sample, cancelling difficulty.", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def load_metrics(results: Path) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*/*/*/eval/**/*.json"))]
    return pd.DataFrame(rows)


def table1(metrics: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Single SFT (mean ± std over runs) vs each merge (mean ± std over merge seeds)."""
    out = []
    for (model, task, scheme), g in metrics.groupby(["model", "task", "scheme"], sort=True):
        single = g[g["kind"] == "single"]
        ref = {"val_loss": single["val_loss"].mean(), "exact_match": single["exact_match"].mean()}
        for method in ["single", *methods]:
            rows = single if method == "single" else g[(g["kind"] == "merged") & (g["method"] == method)]
            if rows.empty:
                continue
            rec = {"model": model, "task": task, "scheme": scheme, "method": method, "n": len(rows)}
            for metric in ("val_loss", "exact_match"):
                mean = rows[metric].mean()
                rec[f"{metric}_mean"] = mean
                rec[f"{metric}_std"] = rows[metric].std(ddof=1) if len(rows) > 1 else 0.0
                rec[f"{metric}_delta"] = mean - ref[metric]
            out.append(rec)
    return pd.DataFrame(out)


def table1_markdown(t: pd.DataFrame) -> str:
    lines = ["# Table 1: single fine-tunes vs merges", "",
             "Single: mean ± std over the K runs. Merges: mean ± std over merge seeds (average is deterministic).",
             "Δ is against the single-run mean; lower val loss is better, higher exact match is better.", "",
             "| model | task | scheme | method | n | val loss | Δ val loss | exact match % | Δ EM (pts) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in t.itertuples():
        lines.append(
            f"| {r.model} | {r.task} | {r.scheme} | {r.method} | {r.n} | {r.val_loss_mean:.4f} ± {r.val_loss_std:.4f} | "
            f"{r.val_loss_delta:+.4f} | {100 * r.exact_match_mean:.1f} ± {100 * r.exact_match_std:.1f} | "
            f"{100 * r.exact_match_delta:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def analyze(cfg: dict, results_dir: str | Path, out_dir: str | Path) -> None:
    results, out = Path(results_dir), Path(out_dir)
    epochs, runs, anchor = cfg["train"]["epochs"], cfg["runs"], cfg["analysis"]["anchor_run"]
    rows = []
    for model in cfg["models"]:
        for task in cfg["tasks"]:
            for scheme in cfg["schemes"]:
                positions, losses = position_loss_matrix(results, model, task, scheme, runs, epochs)
                row = {"model": model, "task": task, "scheme": scheme, "epoch": epochs,
                       **imbalance_row(positions, losses, anchor, cfg["seed"])}
                rows.append(row)
                plot_fig1(positions, losses, row, anchor,
                          f"Fig. 1 — {model}, {task}, {scheme}: first-epoch position vs loss after epoch {epochs}",
                          out / "figures" / f"fig1_{model}_{task}_{scheme}.png")
    with atomic_path(out / "tables" / "imbalance.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    t1 = table1(load_metrics(results), cfg["merge"]["methods"])
    with atomic_path(out / "tables" / "table1.csv") as tmp:
        t1.to_csv(tmp, index=False)
    with atomic_path(out / "tables" / "table1.md") as tmp:
        tmp.write_text(table1_markdown(t1))
    print(table1_markdown(t1))
    print(pd.DataFrame(rows).to_string())
