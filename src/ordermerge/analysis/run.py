"""The analysis stage: reads the results tree, writes every figure and table.

Fig. 1 and the imbalance statistics, Fig. 3 (anchor segments with merges), Fig. 4 (loss per
epoch, when every epoch is scored), Table 1, Table 2 (≥ 2 models), Table 4 (both schemes), one
tidy metrics table that the tables are computed from (lm-eval's scores too, under eval.harness) and
the harness agreement table (eval.harness: mirror).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ordermerge.analysis.figures import plot_fig1, plot_fig3, plot_fig4
from ordermerge.analysis.harness import agreement_markdown, agreement_table, tidy_harness
from ordermerge.analysis.stats import paired_rho, paired_rho_ci, permutation_p, residual_rho_ci, spearman, verdict
from ordermerge.analysis.storage import plot_storage, storage_markdown, storage_table, update_markdown, update_table
from ordermerge.analysis.subsets import analyze_ksweep_and_multitask
from ordermerge.analysis.tables import comparison, comparison_markdown, table1, table1_markdown, tidy_metrics
from ordermerge.data.orders import first_epoch_positions, load_order
from ordermerge.merging.registry import merge_variants
from ordermerge.paths import EVAL_FILES, Paths
from ordermerge.plan import figure_name, groups, has_fig4, has_harness_agreement, has_table2, has_table4, rounded
from ordermerge.storage.atomic import atomic_path


def _split_losses(csv: Path, split: str) -> pd.DataFrame:
    df = pd.read_csv(csv)
    return df[df["split"] == split].sort_values("row")


def position_loss_matrix(p: Paths, w: dict, runs: int, epoch: int):
    """positions[k, i], losses[k, i]: sample i's first-epoch position and final train loss in run k
    (``w``: model, task, scheme and precision)."""
    positions, losses = [], []
    for k in range(runs):
        positions.append(first_epoch_positions(load_order(p.of("order", **w, run=k))))
        losses.append(_split_losses(Path(p.of("run_losses", **w, run=k, epoch=epoch)), "train")["loss"].to_numpy())
    return np.array(positions), np.array(losses)


def loss_methods(cfg: dict) -> list[str]:
    """The merges whose per-sample losses were scored (losses.methods; null: every merge method)."""
    return cfg["losses"].get("methods") or cfg["merge"]["methods"]


def imbalance_row(positions: np.ndarray, losses: np.ndarray, anchor: int, seed: int) -> dict:
    n = positions.shape[1]
    per_run = [spearman(positions[k], losses[k]) for k in range(positions.shape[0])]
    tenth = max(1, n // 10)
    first = np.concatenate([losses[k][positions[k] < tenth] for k in range(len(losses))])
    last = np.concatenate([losses[k][positions[k] >= n - tenth] for k in range(len(losses))])
    residual = losses - losses.mean(axis=0, keepdims=True)  # loss minus the sample's mean over runs
    pooled = spearman(positions.ravel(), residual.ravel())
    paired = paired_rho(positions, losses)
    paired_lo, paired_hi = paired_rho_ci(positions, losses, seed)
    residual_lo, residual_hi = residual_rho_ci(positions, losses, seed)
    return {
        "n_samples": n,
        "runs": positions.shape[0],
        "rho_anchor": per_run[anchor][0],
        "p_anchor": per_run[anchor][1],
        "rho_mean_over_runs": float(np.mean([r for r, _ in per_run])),
        "rho_residual_pooled": pooled[0],
        "p_residual_pooled": pooled[1],
        "rho_residual_ci_low": residual_lo,
        "rho_residual_ci_high": residual_hi,
        "rho_paired": paired,
        "rho_paired_ci_low": paired_lo,
        "rho_paired_ci_high": paired_hi,
        "verdict_paired": verdict(paired_lo, paired_hi),
        "p_paired_permutation": permutation_p(positions, losses, n_perm=499, seed=seed),
        "loss_first_decile": float(first.mean()),
        "loss_last_decile": float(last.mean()),
    }


def evaluations(
    cfg: dict, results: Path, stems: tuple[str, str] = ("eval_single", "eval_merged")
) -> list[tuple[tuple[str, str, str, str, str], Path]]:
    """(model, task, scheme, precision, method) and the stem of every single-run and merged evaluation the
    config plans (paths.py spells them; registry.merge_variants says which seeds), in results-tree order;
    ``stems=HARNESS_STEMS``: their lm-eval evaluations, in the same order."""
    p = Paths(str(results))
    single, merged = stems
    out = []
    for w in groups(cfg):
        key = tuple(w.values())
        out += [((*key, "single"), p.of(single, **w, run=k)) for k in range(cfg["runs"])]
        out += [
            ((*key, m), p.of(merged, **w, method=m, mseed=s))
            for m, s in merge_variants(cfg["merge"]["methods"], cfg["merge"]["seeds"])
        ]
    return sorted(((key, Path(stem)) for key, stem in out), key=lambda item: item[1])


HARNESS_STEMS = ("harness_single", "harness_merged")


def load_metrics(cfg: dict, results: Path) -> pd.DataFrame:
    rows = [json.loads(Path(f"{stem}{EVAL_FILES['metrics']}").read_text()) for _, stem in evaluations(cfg, results)]
    return pd.DataFrame(rows)


def load_val_losses(cfg: dict, results: Path) -> dict:
    out: dict = {}
    for key, stem in evaluations(cfg, results):
        out.setdefault(key, []).append(pd.read_csv(f"{stem}{EVAL_FILES['val_losses']}"))
    return out


def load_test_scores(cfg: dict, results: Path) -> dict:
    """Per-sample task metric of every evaluation (sample_id, correct as 0/1), for Table 1's intervals."""
    out: dict = {}
    for key, stem in evaluations(cfg, results):
        rows = pd.read_json(f"{stem}{EVAL_FILES['generations']}", lines=True, dtype={"sample_id": str})
        frame = (
            rows[["sample_id", "correct"]].astype({"correct": float})
            if len(rows)
            else pd.DataFrame({"sample_id": pd.Series(dtype=str), "correct": pd.Series(dtype=float)})
        )
        out.setdefault(key, []).append(frame)
    return out


def _write_table(out: Path, name: str, df: pd.DataFrame, markdown: str | None) -> None:
    p = Paths(str(out))
    with atomic_path(Path(p.of("table", name=name, ext="csv"))) as tmp:
        df.to_csv(tmp, index=False)
    if markdown is not None:
        with atomic_path(Path(p.of("table", name=name, ext="md"))) as tmp:
            tmp.write_text(markdown)


def _figure(out: Path, name: str) -> Path:
    return Path(Paths(str(out)).of("figure", name=name))


def _loss_curves(p: Paths, w: dict, cfg: dict, split: str) -> dict[str, dict[int, list[float]]]:
    """Token-weighted mean loss per epoch: every single run, and each merge (first seed)."""

    def mean_loss(csv: Path) -> float:
        df = _split_losses(csv, split)
        return float((df["loss"] * df["tokens"]).sum() / df["tokens"].sum())

    seed = cfg["merge"]["seeds"][0]
    curves: dict[str, dict[int, list[float]]] = {"single": {}}
    for e in range(1, cfg["train"]["epochs"] + 1):
        for k in range(cfg["runs"]):
            curves["single"].setdefault(e, []).append(mean_loss(Path(p.of("run_losses", **w, run=k, epoch=e))))
        for method in loss_methods(cfg):
            curves.setdefault(method, {})[e] = [
                mean_loss(Path(p.of("merged_losses", **w, method=method, mseed=seed, epoch=e)))
            ]
    return curves


def _with_harness(cfg: dict, results: Path, out: Path, tidy: pd.DataFrame) -> pd.DataFrame:
    """eval.harness: lm-eval's rows appended to the tidy metrics (column ``harness``: the lm-eval task,
    empty for ordermerge's own), and for ``mirror`` the agreement table."""
    harness = cfg.get("eval", {}).get("harness") or []
    tidy = tidy.assign(harness="")
    if not harness:
        return tidy
    ours, theirs = evaluations(cfg, results), evaluations(cfg, results, HARNESS_STEMS)
    tidy = pd.concat([tidy, tidy_harness([stem for _, stem in theirs])], ignore_index=True)
    if has_harness_agreement(cfg):
        table, differ = agreement_table([(a, b) for (_, a), (_, b) in zip(ours, theirs)])
        _write_table(out, "harness_agreement", table, agreement_markdown(table, differ))
    return tidy


def analyze(cfg: dict, results_dir: str | Path, out_dir: str | Path) -> None:
    results, out = Path(results_dir), Path(out_dir)
    epochs, runs, anchor = cfg["train"]["epochs"], cfg["runs"], cfg["analysis"]["anchor_run"]
    first_seed = cfg["merge"]["seeds"][0]
    imbalance, fig3_rows = [], []
    p = Paths(str(results))
    for w in groups(cfg):
        where = " / ".join(w.values())
        positions, losses = position_loss_matrix(p, w, runs, epochs)
        row = {**w, "epoch": epochs, **imbalance_row(positions, losses, anchor, cfg["seed"])}
        imbalance.append(row)
        plot_fig1(
            positions,
            losses,
            row,
            anchor,
            f"Fig. 1 — {where}: first-epoch position vs loss after epoch {epochs}",
            _figure(out, figure_name("fig1", **w)),
        )
        merged = {
            m: _split_losses(Path(p.of("merged_losses", **w, method=m, mseed=first_seed, epoch=epochs)), "train")[
                "loss"
            ].to_numpy()
            for m in loss_methods(cfg)
        }
        segments = max(2, min(10, positions.shape[1] // 4))
        rows = plot_fig3(
            positions,
            losses,
            merged,
            anchor,
            segments,
            f"Fig. 3 — {where}: loss after epoch {epochs}\nby segment of run "
            f"{anchor}'s first-epoch order (merges: seed {first_seed})",
            _figure(out, figure_name("fig3", **w)),
        )
        fig3_rows += [{**w, **r} for r in rows]
        if has_fig4(cfg):
            split = "val" if "val" in cfg["losses"]["splits"] else "train"
            plot_fig4(
                _loss_curves(p, w, cfg, split),
                split,
                f"Fig. 4 — {where}: {split} loss at each epoch, single vs merged",
                _figure(out, figure_name("fig4", **w)),
            )
    _write_table(out, "imbalance", pd.DataFrame(imbalance), None)
    _write_table(out, "fig3_rho", pd.DataFrame(fig3_rows), None)
    metrics = load_metrics(cfg, results)
    # the configured precisions' order (the headline first), not the results tree's
    metrics = metrics.sort_values("precision", key=lambda c: c.map(cfg["precisions"].index), kind="stable")
    extra = analyze_ksweep_and_multitask(cfg, results, out, metrics, _write_table)  # K-sweep, Table 3 (when configured)
    tidy = pd.concat([tidy_metrics(metrics), extra], ignore_index=True) if len(extra) else tidy_metrics(metrics)
    _write_table(out, "metrics", _with_harness(cfg, results, out, tidy), None)
    t1 = table1(
        metrics,
        cfg["merge"]["methods"],
        load_val_losses(cfg, results),
        load_test_scores(cfg, results),
        seed=cfg["seed"],
    )
    _write_table(out, "table1", t1, table1_markdown(t1))
    if rounded(cfg):
        st = storage_table(cfg, results, metrics)
        _write_table(out, "storage", st, storage_markdown(st))
        for (model, task, scheme), g in st.groupby(["model", "task", "scheme"], sort=False):
            plot_storage(
                g,
                f"What storage precision lost — {model} / {task} / {scheme}: final checkpoints of the {runs} runs",
                _figure(out, figure_name("storage", model, task, scheme)),
            )
        up = update_table(cfg, results)
        _write_table(
            out,
            "updates",
            up,
            update_markdown(up)
            if len(up)
            else "# What each stored model keeps of the update\n\nNeeds the saved precision and `average` among "
            "the merges (the reference update).\n",
        )
    best = cfg["merge"]["methods"][-1]
    if has_table2(cfg):
        t2 = comparison(t1, "model", best)
        _write_table(out, "table2", t2, comparison_markdown(t2, f"Table 2: single vs merged ({best}) across models"))
    if has_table4(cfg):
        t4 = comparison(t1, "scheme", best)
        _write_table(out, "table4", t4, comparison_markdown(t4, f"Table 4: shuffle vs fixbatch orders ({best})"))
    from ordermerge.analysis.answer import answer_rst

    with atomic_path(Path(Paths(str(out)).answer)) as tmp:
        tmp.write_text(answer_rst(pd.DataFrame(imbalance), t1, cfg))
    print(table1_markdown(t1))
    print(pd.DataFrame(imbalance).to_string())
