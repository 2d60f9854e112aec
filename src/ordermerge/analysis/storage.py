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
                        info = json.loads((Path(p.of("rounded", **w, precision=precision, run=k, epoch=epochs))
                                           / ROUND_JSON).read_text())
                        after = single.loc[(model, task, scheme, precision, k), "val_loss"]
                        before = single.loc[(model, task, scheme, base_precision, k), "val_loss"] \
                            if base_precision else np.nan
                        rows.append({**w, "precision": precision, "from": base_precision or cfg["train"]["save_dtype"],
                                     "run": k, "elements": info["elements"],
                                     "changed_fraction": info["changed_fp32"] / max(1, info["elements"]),
                                     "zero_fraction": info["zero_fraction"], "erased_fraction": info["erased_fraction"],
                                     "relative_norm_lost": info["relative_norm_lost"],
                                     "val_loss_saved": before, "val_loss_rounded": after,
                                     "val_loss_delta": after - before})
    return pd.DataFrame(rows)


def storage_markdown(t: pd.DataFrame) -> str:
    lines = ["# What storage precision lost (final checkpoints)", "",
             "Task vector τ = θ − θ_base. changed: elements the saved update moves; erased: of all elements, those the",
             "saved update moved and rounding set back to the base's value exactly; zero: elements equal to the base",
             "after rounding (what resampleN redraws); norm lost: ‖τ_saved − τ_rounded‖ / ‖τ_saved‖. Val loss: the same",
             "run evaluated as saved and as rounded.", "",
             "| model | task | scheme | precision | run | changed % | erased % | zero % | norm lost % | val loss saved |"
             " val loss rounded | Δ val loss |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in t.itertuples():
        lines.append(f"| {r.model} | {r.task} | {r.scheme} | {r.precision} | {r.run} | {100 * r.changed_fraction:.1f} | "
                     f"{100 * r.erased_fraction:.1f} | {100 * r.zero_fraction:.1f} | {100 * r.relative_norm_lost:.1f} | "
                     f"{r.val_loss_saved:.4f} | {r.val_loss_rounded:.4f} | {r.val_loss_delta:+.4f} |")
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
        axes[0].bar(x, 100 * (g["zero_fraction"] - g["erased_fraction"]), width, bottom=100 * g["erased_fraction"],
                    color=cmap(i), alpha=0.35, label=f"{name}: already equal to the base")
        axes[1].bar(x, 100 * g["relative_norm_lost"], width, color=cmap(i), label=name)
        for j, (before, after) in enumerate(zip(g["val_loss_saved"], g["val_loss_rounded"])):
            axes[2].plot([0, 1], [before, after], "o-", color=cmap(i), alpha=0.8,
                         label=f"{name} (mean Δ {g['val_loss_delta'].mean():+.4f})" if j == 0 else None)
    for ax in axes[:2]:
        ax.set_xticks(range(len(runs)), [f"run {k}" for k in runs])
    axes[0].set_ylabel("task-vector elements (%)")
    axes[0].set_title("(a) elements exactly equal to the base after rounding")
    axes[0].legend(fontsize=8)
    axes[1].set_ylabel("‖τ_saved − τ_rounded‖ / ‖τ_saved‖ (%)")
    axes[1].set_title("(b) share of the update's norm lost")
    axes[1].legend(fontsize=8)
    axes[2].set_xticks([0, 1], [f"as saved ({t['from'].iloc[0]})", "rounded"])
    axes[2].set_xlim(-0.3, 1.3)
    axes[2].set_ylabel("validation loss (nats / response token)")
    axes[2].set_title("(c) each run's val loss before and after rounding")
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
