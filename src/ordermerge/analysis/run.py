"""The analysis stage: one family of figures and tables at a time (see analysis.plan for the families).

Fig. 1 and the imbalance statistics, Fig. 3 (anchor segments with merges), Fig. 4 (loss per epoch,
when every epoch is scored), Table 1, Table 2 (≥ 2 models), Table 4 (both schemes) and one tidy
metrics table that the tables are computed from; the K-sweep and Table 3 are in analysis.subsets.
Every file read and written is one that :class:`~ordermerge.analysis.plan.Plan` lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ordermerge.analysis import subsets
from ordermerge.analysis.figures import plot_fig1, plot_fig3, plot_fig4
from ordermerge.analysis.plan import FAMILIES, Plan
from ordermerge.analysis.stats import paired_rho, permutation_p, spearman
from ordermerge.analysis.tables import (comparison, comparison_markdown, table1, table1_markdown, tidy_metrics,
                                        write_table)
from ordermerge.data.orders import first_epoch_positions, load_order
from ordermerge.paths import EVAL_FILES


def _split_losses(csv: str | Path, split: str) -> pd.DataFrame:
    df = pd.read_csv(csv)
    return df[df["split"] == split].sort_values("row")


def _tag(cell: dict) -> str:
    return f"{cell['model']}, {cell['task']}, {cell['scheme']}"


def position_loss_matrix(plan: Plan, cell: dict, epoch: int):
    """positions[k, i], losses[k, i]: sample i's first-epoch position and final train loss in run k."""
    positions = [first_epoch_positions(load_order(Path(p))) for p in plan.orders(cell)]
    losses = [_split_losses(p, "train")["loss"].to_numpy() for p in plan.run_losses(cell, epoch)]
    return np.array(positions), np.array(losses)


def imbalance_row(positions: np.ndarray, losses: np.ndarray, anchor: int, seed: int) -> dict:
    n = positions.shape[1]
    per_run = [spearman(positions[k], losses[k]) for k in range(positions.shape[0])]
    tenth = max(1, n // 10)
    first = np.concatenate([losses[k][positions[k] < tenth] for k in range(len(losses))])
    last = np.concatenate([losses[k][positions[k] >= n - tenth] for k in range(len(losses))])
    residual = losses - losses.mean(axis=0, keepdims=True)  # loss minus the sample's mean over runs
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


def evaluations(cfg: dict, results: str | Path) -> list[tuple[tuple[str, str, str, str], Path]]:
    """(model, task, scheme, method) and the stem of every single-run and merged evaluation the config plans."""
    return [(key, Path(stem)) for key, stem in Plan(cfg, str(results)).evaluations()]


def load_metrics(cfg: dict, results: str | Path) -> pd.DataFrame:
    rows = [json.loads(Path(f"{stem}{EVAL_FILES['metrics']}").read_text()) for _, stem in evaluations(cfg, results)]
    return pd.DataFrame(rows)


def load_val_losses(cfg: dict, results: str | Path) -> dict:
    out: dict = {}
    for key, stem in evaluations(cfg, results):
        out.setdefault(key, []).append(pd.read_csv(f"{stem}{EVAL_FILES['val_losses']}"))
    return out


def fig1(plan: Plan, out: Plan) -> None:
    """Fig. 1 per cell and imbalance.csv: first-epoch position vs final training loss."""
    cfg, epochs, anchor = plan.cfg, plan.cfg["train"]["epochs"], plan.cfg["analysis"]["anchor_run"]
    rows = []
    for cell in plan.cells():
        positions, losses = position_loss_matrix(plan, cell, epochs)
        row = {**cell, "epoch": epochs, **imbalance_row(positions, losses, anchor, cfg["seed"])}
        rows.append(row)
        plot_fig1(positions, losses, row, anchor,
                  f"Fig. 1 — {_tag(cell)}: first-epoch position vs loss after epoch {epochs}",
                  Path(out.figure("fig1", cell)))
    write_table(out.table("imbalance"), pd.DataFrame(rows))
    print(pd.DataFrame(rows).to_string())


def fig3(plan: Plan, out: Plan) -> None:
    """Fig. 3 per cell and fig3_rho.csv: the anchor run's order in segments, with each merge's loss."""
    epochs, anchor = plan.cfg["train"]["epochs"], plan.cfg["analysis"]["anchor_run"]
    first_seed = plan.cfg["merge"]["seeds"][0]
    rows = []
    for cell in plan.cells():
        positions, losses = position_loss_matrix(plan, cell, epochs)
        merged = {m: _split_losses(p, "train")["loss"].to_numpy() for m, p in plan.merged_losses(cell, epochs).items()}
        segments = max(2, min(10, positions.shape[1] // 4))
        seg_rows = plot_fig3(positions, losses, merged, anchor, segments,
                             f"Fig. 3 — {_tag(cell)}: loss after epoch {epochs}\nby segment of run "
                             f"{anchor}'s first-epoch order (merges: seed {first_seed})", Path(out.figure("fig3", cell)))
        rows += [{**cell, **r} for r in seg_rows]
    write_table(out.table("fig3_rho"), pd.DataFrame(rows))


def loss_curves(plan: Plan, cell: dict, split: str) -> dict[str, dict[int, list[float]]]:
    """Token-weighted mean loss per epoch: every single run, and each merge (first seed)."""
    def mean_loss(csv: str) -> float:
        df = _split_losses(csv, split)
        return float((df["loss"] * df["tokens"]).sum() / df["tokens"].sum())

    curves: dict[str, dict[int, list[float]]] = {"single": {}}
    for e in plan.loss_epochs():
        curves["single"][e] = [mean_loss(p) for p in plan.run_losses(cell, e)]
        for method, path in plan.merged_losses(cell, e).items():
            curves.setdefault(method, {})[e] = [mean_loss(path)]
    return curves


def fig4(plan: Plan, out: Plan) -> None:
    """Fig. 4 per cell: the loss at each epoch, single runs vs the merge of that epoch's checkpoints."""
    split = "val" if "val" in plan.cfg["losses"]["splits"] else "train"
    for cell in plan.cells():
        plot_fig4(loss_curves(plan, cell, split), split,
                  f"Fig. 4 — {_tag(cell)}: {split} loss at each epoch, single vs merged", Path(out.figure("fig4", cell)))


def tables(plan: Plan, out: Plan) -> None:
    """Table 1, metrics.csv (K-sweep and multi-task rows included), Table 2 and Table 4 as configured."""
    cfg, results = plan.cfg, plan.results
    metrics = load_metrics(cfg, results)
    extra = subsets.extra_rows(plan)
    write_table(out.table("metrics"), pd.concat([tidy_metrics(metrics), extra], ignore_index=True) if len(extra)
                else tidy_metrics(metrics))
    t1 = table1(metrics, cfg["merge"]["methods"], load_val_losses(cfg, results))
    write_table(out.table("table1"), t1, table1_markdown(t1))
    best = cfg["merge"]["methods"][-1]
    titles = {"table2": f"Table 2: single vs merged ({best}) across models",
              "table4": f"Table 4: shuffle vs fixbatch orders ({best})"}
    for name, by in plan.comparisons().items():
        t = comparison(t1, by, best)
        write_table(out.table(name), t, comparison_markdown(t, titles[name]))
    print(table1_markdown(t1))


WRITERS = {"fig1": fig1, "fig3": fig3, "fig4": fig4, "tables": tables,
           "ksweep": subsets.ksweep_family, "table3": subsets.table3_family}
assert set(WRITERS) == set(FAMILIES)


def analyze(cfg: dict, results_dir: str | Path, out_dir: str | Path, families: list[str] | None = None) -> None:
    """Write the given families (default: every one the config asks for) from ``results_dir`` into
    ``out_dir``; each must write exactly the files its plan lists."""
    plan, out = Plan(cfg, str(results_dir)), Plan(cfg, str(out_dir))
    for family in families or plan.families():
        WRITERS[family](plan, out)
        missing = [p for p in out.outputs(family) if not Path(p).is_file()]
        if missing:
            raise RuntimeError(f"analysis family {family} did not write {', '.join(missing)}")
