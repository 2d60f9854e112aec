"""What storing a fine-tune in a narrower precision lost: the storage-loss table and figure.

Per run's final checkpoint and rounded precision (``ordermerge round``'s round.json): the task-vector
elements the fp32 update changed that rounding set back to exactly the base's value (erased), the share of
the update's norm lost, ‖τ_fp32 − τ_rounded‖ / ‖τ_fp32‖, and the validation loss of the same run as saved
and as rounded (each precision's own evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ordermerge.analysis.figures import _save, plt
from ordermerge.paths import Paths
from ordermerge.plan import rounded
from ordermerge.storage import precisions
from ordermerge.storage.rounding import ROUND_JSON


def saved(cfg: dict) -> str | None:
    """The configured precision that is the checkpoint as saved, if any (what rounding is measured from)."""
    return next((p for p in cfg["precisions"] if precisions.is_saved_form(p, cfg["train"]["save_dtype"])), None)


def storage_table(cfg: dict, results: Path, metrics: pd.DataFrame) -> pd.DataFrame:
    p, epochs, base_precision = Paths(str(results)), cfg["train"]["epochs"], saved(cfg)
    single = metrics[metrics["kind"] == "single"].set_index(["model", "task", "scheme", "precision", "run"])
    rows = []
    for model in cfg["models"]:
        for task in cfg["tasks"]:
            for scheme in cfg["schemes"]:
                w = {"model": model, "task": task, "scheme": scheme}
                for precision in rounded(cfg):
                    for k in range(cfg["runs"]):
                        info = json.loads(
                            (
                                Path(p.of("rounded", **w, precision=precision, run=k, epoch=epochs)) / ROUND_JSON
                            ).read_text()
                        )
                        after = single.loc[(model, task, scheme, precision, k), "val_loss"]
                        before = (
                            single.loc[(model, task, scheme, base_precision, k), "val_loss"]
                            if base_precision
                            else np.nan
                        )
                        rows.append(
                            {
                                **w,
                                "precision": precision,
                                "from": base_precision or cfg["train"]["save_dtype"],
                                "run": k,
                                "elements": info["elements"],
                                "changed_fraction": info["changed_fp32"] / max(1, info["elements"]),
                                "zero_fraction": info["zero_fraction"],
                                "erased_fraction": info["erased_fraction"],
                                "relative_norm_lost": info["relative_norm_lost"],
                                "val_loss_saved": before,
                                "val_loss_rounded": after,
                                "val_loss_delta": after - before,
                            }
                        )
    return pd.DataFrame(rows)


def storage_markdown(t: pd.DataFrame) -> str:
    lines = [
        "# What storage precision lost (final checkpoints)",
        "",
        "Task vector τ = θ − θ_base. changed: elements the saved update moves; erased: of all elements, those the",
        "saved update moved and rounding set back to the base's value exactly; zero: elements equal to the base",
        "after rounding (what resampleN redraws); norm lost: ‖τ_saved − τ_rounded‖ / ‖τ_saved‖. Val loss: the same",
        "run evaluated as saved and as rounded.",
        "",
        "| model | task | scheme | precision | run | changed % | erased % | zero % | norm lost % | val loss saved |"
        " val loss rounded | Δ val loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in t.itertuples():
        lines.append(
            f"| {r.model} | {r.task} | {r.scheme} | {r.precision} | {r.run} | {100 * r.changed_fraction:.1f} | "
            f"{100 * r.erased_fraction:.1f} | {100 * r.zero_fraction:.1f} | {100 * r.relative_norm_lost:.1f} | "
            f"{r.val_loss_saved:.4f} | {r.val_loss_rounded:.4f} | {r.val_loss_delta:+.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot_storage(t: pd.DataFrame, title: str, path: Path) -> None:
    """(a) elements erased and (b) norm of the update lost, per run and precision; (c) each run's val loss
    as saved and as rounded."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    names = list(dict.fromkeys(t["precision"]))
    runs = sorted(t["run"].unique())
    width = 0.8 / len(names)
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        g = t[t["precision"] == name].set_index("run").loc[runs]
        x = np.arange(len(runs)) + (i - (len(names) - 1) / 2) * width
        axes[0].bar(x, 100 * g["erased_fraction"], width, color=cmap(i), label=f"{name}: erased")
        axes[0].bar(
            x,
            100 * (g["zero_fraction"] - g["erased_fraction"]),
            width,
            bottom=100 * g["erased_fraction"],
            color=cmap(i),
            alpha=0.35,
            label=f"{name}: already equal to the base",
        )
        axes[1].bar(x, 100 * g["relative_norm_lost"], width, color=cmap(i), label=name)
        for j, (before, after) in enumerate(zip(g["val_loss_saved"], g["val_loss_rounded"])):
            axes[2].plot(
                [0, 1],
                [before, after],
                "o-",
                color=cmap(i),
                alpha=0.8,
                label=f"{name} (mean Δ {g['val_loss_delta'].mean():+.4f})" if j == 0 else None,
            )
    for ax in axes[:2]:
        ax.set_xticks(range(len(runs)), [f"run {k}" for k in runs])
    axes[0].set_ylabel("task-vector elements (%)")
    axes[0].set_title("(a) elements exactly equal to the base after rounding")
    axes[1].set_ylabel("‖τ_saved − τ_rounded‖ / ‖τ_saved‖ (%)")
    axes[1].set_title("(b) share of the update's norm lost")
    for ax in axes[:2]:  # room above the bars for the legend (stochastic rounding's noise can exceed 100 %)
        ax.set_ylim(0, 1.45 * max(bar.get_height() + bar.get_y() for bar in ax.patches))
        ax.legend(fontsize=8, loc="upper center", ncol=len(names))
    axes[2].set_xticks([0, 1], [f"as saved ({t['from'].iloc[0]})", "rounded"])
    axes[2].set_xlim(-0.3, 1.3)
    axes[2].set_ylabel("validation loss (nats / response token)")
    axes[2].set_title("(c) val loss of each run, saved vs rounded")
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def update_table(cfg: dict, results: Path) -> pd.DataFrame:
    """What each stored model keeps of the fine-tuning update, the mechanism behind Table 1's precision gap:
    per precision, every single run's and each merge's (first merge seed) task vector τ = θ − θ_base against
    the reference τ_ref of the fp32 `average` merge (the runs' mean update, nothing rounded): the share of
    elements exactly equal to the base, ‖τ‖ / ‖τ_ref‖ and cos(τ, τ_ref). Tensor by tensor (one tensor of
    each model in memory); empty when fp32 or average is not configured."""
    import torch

    from ordermerge.storage.checkpoint import LazyCheckpoint

    saved_p, methods = saved(cfg), cfg["merge"]["methods"]
    if saved_p is None or "average" not in methods:
        return pd.DataFrame()
    p, epoch, seed = Paths(str(results)), cfg["merge"]["epoch"] or cfg["train"]["epochs"], cfg["merge"]["seeds"][0]
    rows = []
    for model in cfg["models"]:
        base = LazyCheckpoint(p.of("base", model=model))
        for task in cfg["tasks"]:
            for scheme in cfg["schemes"]:
                w = {"model": model, "task": task, "scheme": scheme}
                ref = LazyCheckpoint(p.of("merged", **w, precision=saved_p, epoch=epoch, method="average", mseed=seed))
                for precision in cfg["precisions"]:
                    dirs = {
                        f"run{k}": (
                            Path(p.of("checkpoint", **w, run=k, epoch=epoch))
                            if precision == saved_p
                            else Path(p.of("rounded", **w, precision=precision, run=k, epoch=epoch))
                        )
                        for k in range(cfg["runs"])
                    }
                    dirs |= {
                        m: Path(p.of("merged", **w, precision=precision, epoch=epoch, method=m, mseed=seed))
                        for m in methods
                    }  # the first merge seed: every method is built for it
                    cks = {name: LazyCheckpoint(d) for name, d in dirs.items()}
                    sums = {name: [0, 0, 0.0, 0.0, 0.0] for name in dirs}  # zeros, total, dot, |τ|², |τ_ref|²
                    for t in base.keys():  # each tensor of the base and the reference read once
                        b = base.get(t)
                        if not b.is_floating_point():
                            continue
                        b = b.to(torch.float32)  # exact: the base is bf16/fp16/fp32
                        tau_ref = ref.get(t).to(torch.float32) - b
                        rr = float(torch.sum(tau_ref * tau_ref, dtype=torch.float64))
                        for name, ck in cks.items():
                            tau = ck.get(t).to(torch.float32) - b  # 0 exactly where the stored value is the base's
                            acc = sums[name]
                            acc[0] += int(torch.count_nonzero(tau == 0))
                            acc[1] += tau.numel()
                            acc[2] += float(torch.sum(tau * tau_ref, dtype=torch.float64))
                            acc[3] += float(torch.sum(tau * tau, dtype=torch.float64))
                            acc[4] += rr
                    for name, ck in cks.items():
                        ck.close()
                        zeros, total, dot, nn, rr = sums[name]
                        rows.append(
                            {
                                **w,
                                "precision": precision,
                                "model_kind": "single" if name.startswith("run") else "merged",
                                "method": "single" if name.startswith("run") else name,
                                "run": int(name[3:]) if name.startswith("run") else None,
                                "zero_fraction": zeros / max(1, total),
                                "norm_ratio": (nn / rr) ** 0.5,
                                "cosine": dot / (nn * rr) ** 0.5 if nn and rr else float("nan"),
                            }
                        )
                ref.close()
        base.close()
    return pd.DataFrame(rows)


def update_markdown(t: pd.DataFrame) -> str:
    lines = [
        "# What each stored model keeps of the update",
        "",
        "τ = θ − θ_base against τ_ref, the fp32 `average` merge's τ (the runs' mean update, nothing rounded).",
        "zero: elements exactly equal to the base; ‖τ‖/‖τ_ref‖; cos(τ, τ_ref). Single runs: mean ± std over K.",
        "",
        "| model | task | scheme | precision | method | zero % | ‖τ‖ / ‖τ_ref‖ | cos(τ, τ_ref) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = ["model", "task", "scheme", "precision", "method"]
    for key, g in t.groupby(keys, sort=False):

        def cell(col, scale=1.0, fmt=".3f", g=g):
            v = g[col] * scale
            return f"{v.mean():{fmt}} ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else f"{v.mean():{fmt}}"

        lines.append(
            "| " + " | ".join(map(str, key)) + f" | {cell('zero_fraction', 100, '.1f')} | "
            f"{cell('norm_ratio')} | {cell('cosine')} |"
        )
    return "\n".join(lines) + "\n"
