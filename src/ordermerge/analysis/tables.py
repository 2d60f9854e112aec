"""Tables: 1 (single vs merges), 2 (across model sizes), 4 (shuffle vs fixbatch), and the tidy metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ordermerge.analysis.stats import bootstrap_ci, format_ci

METRICS = ("val_loss", "exact_match", "task_score")
# One set of K runs and its merges: a model, task and order scheme, in one stored precision.
GROUP = ["model", "task", "scheme", "precision"]
# Accuracy metrics by kind of answer (data/kinds.py): exact match of the numeric or text answer, token F1 of
# a text answer, or for multiple-choice tasks accuracy by log-likelihood (raw and per character). A task's
# headline one is its `task_metric`.
TASK_METRICS = ("exact_match", "f1", "mc_accuracy", "mc_accuracy_norm")


def with_task_score(metrics: pd.DataFrame) -> pd.DataFrame:
    """Adds ``task_score``, the value of each row's ``task_metric`` (exact match where unnamed), so that
    the tables compare numeric and multiple-choice tasks through one column."""
    m = metrics.copy()
    m["task_metric"] = m["task_metric"].fillna("exact_match") if "task_metric" in m else "exact_match"
    m["task_score"] = np.nan
    for name in TASK_METRICS:
        m[name] = pd.to_numeric(m[name], errors="coerce") if name in m else np.nan  # null: not this task's metric
        picked = m["task_metric"] == name
        m.loc[picked, "task_score"] = m.loc[picked, name]
    return m


def tidy_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, task, scheme, method, seed, run, metric): what every table reads. A metric that
    does not apply to a task (exact match of a multiple-choice task) has no row."""
    ids = ["model", "task", "scheme", "precision", "kind", "method", "seed", "run", "epoch"]
    m = with_task_score(metrics)
    present = [name for name in TASK_METRICS if m[name].notna().any()]
    tidy = m.melt(id_vars=ids, value_vars=["val_loss", *present], var_name="metric", value_name="value")
    return tidy[tidy["value"].notna() | (tidy["metric"] == "val_loss")].reset_index(drop=True)


def paired_p(single_losses: list[pd.DataFrame], merged_losses: list[pd.DataFrame]) -> float:
    """Wilcoxon signed-rank p: per-sample val loss of the merge (mean over seeds) vs the mean single run."""
    if not single_losses or not merged_losses:
        return float("nan")
    single = pd.concat(single_losses).groupby("sample_id")["loss"].mean()
    merged = pd.concat(merged_losses).groupby("sample_id")["loss"].mean()
    diff = (merged - single.reindex(merged.index)).dropna()
    if len(diff) < 2 or np.allclose(diff, 0):
        return float("nan")
    return float(stats.wilcoxon(diff).pvalue)


def _matrix(frames: list[pd.DataFrame], column: str, ids: pd.Index) -> np.ndarray:
    """rows = frames (runs or merge seeds), columns = ``ids``: one per-sample column of each frame."""
    return np.array([f.set_index("sample_id")[column].reindex(ids).to_numpy(dtype=float) for f in frames])


def _weighted(values: np.ndarray, weights: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per row: the ``weights``-weighted mean over the resampled columns ``idx`` (token-weighted val loss)."""
    return (values[:, idx] * weights[:, idx]).sum(axis=1) / weights[:, idx].sum(axis=1)


def delta_intervals(
    single: list[pd.DataFrame],
    merged: list[pd.DataFrame],
    column: str,
    weight: str | None,
    lower_is_better: bool,
    seed: int,
    name: str,
) -> dict:
    """Δ of a merge (mean over seeds) against the mean single run and against the best single run, each with
    a 95 % bootstrap interval over evaluation samples (a sample is resampled with all its runs and seeds;
    runs and merge seeds stay as they are). The best run is re-chosen inside every resample, so
    ``beats_best`` means better than every single run, not only than their mean."""
    nan = {"delta_ci": (np.nan, np.nan), "delta_best": np.nan, "delta_best_ci": (np.nan, np.nan), "beats_best": None}
    if not single or not merged:
        return nan
    ids = pd.Index(sorted(set.intersection(*(set(f["sample_id"]) for f in single + merged))))
    if len(ids) < 2:
        return nan
    s, m = _matrix(single, column, ids), _matrix(merged, column, ids)
    weighted = weight is not None and all(weight in f for f in single + merged)
    ws = _matrix(single, weight, ids) if weighted else np.ones_like(s)
    wm = _matrix(merged, weight, ids) if weighted else np.ones_like(m)
    best = np.min if lower_is_better else np.max

    def delta(idx):
        return _weighted(m, wm, idx).mean() - _weighted(s, ws, idx).mean()

    def delta_best(idx):
        return _weighted(m, wm, idx).mean() - best(_weighted(s, ws, idx))

    everything = np.arange(len(ids))
    d_best = float(delta_best(everything))
    return {
        "delta_ci": bootstrap_ci(delta, len(ids), seed, f"{name}-delta"),
        "delta_best": d_best,
        "delta_best_ci": bootstrap_ci(delta_best, len(ids), seed, f"{name}-delta-best"),
        "beats_best": bool(d_best < 0) if lower_is_better else bool(d_best > 0),
    }


def table1(
    metrics: pd.DataFrame, methods: list[str], val_losses: dict, test_scores: dict | None = None, seed: int = 0
) -> pd.DataFrame:
    """Single SFT (mean ± std over runs) vs each merge (mean ± std over merge seeds), with each Δ's 95 %
    bootstrap interval and whether the merge beats the best single run.

    ``val_losses[(model, task, scheme, precision, method)]`` lists per-sample val-loss frames (sample_id, loss,
    tokens; one per run/seed); ``test_scores`` the same with a per-sample ``correct`` column (the task
    metric of each decoded or scored test sample).
    """
    out, test_scores = [], test_scores or {}
    groups = with_task_score(metrics).groupby(GROUP, sort=False)
    for (model, task, scheme, precision), g in groups:
        single = g[g["kind"] == "single"]
        ref = {m: single[m].mean() for m in METRICS}
        key = (model, task, scheme, precision)
        for method in ["single", *methods]:
            rows = single if method == "single" else g[(g["kind"] == "merged") & (g["method"] == method)]
            if rows.empty:
                continue
            rec = {
                "model": model,
                "task": task,
                "scheme": scheme,
                "precision": precision,
                "method": method,
                "n": len(rows),
                "task_metric": rows["task_metric"].iloc[0],
            }
            for metric in METRICS:
                mean = rows[metric].mean()
                rec[f"{metric}_mean"] = mean
                rec[f"{metric}_std"] = rows[metric].std(ddof=1) if len(rows) > 1 else 0.0
                rec[f"{metric}_delta"] = mean - ref[metric]
            for metric, frames, column, weight, lower in (
                ("val_loss", val_losses, "loss", "tokens", True),
                ("task_score", test_scores, "correct", None, False),
            ):
                ci = (
                    delta_intervals(
                        frames.get((*key, "single"), []),
                        frames.get((*key, method), []),
                        column,
                        weight,
                        lower,
                        seed,
                        f"{model}-{task}-{scheme}-{precision}-{method}-{metric}",
                    )
                    if method != "single"
                    else delta_intervals([], [], column, weight, lower, seed, "")
                )
                rec[f"{metric}_delta_ci_low"], rec[f"{metric}_delta_ci_high"] = ci["delta_ci"]
                rec[f"{metric}_delta_best"] = ci["delta_best"]
                rec[f"{metric}_delta_best_ci_low"], rec[f"{metric}_delta_best_ci_high"] = ci["delta_best_ci"]
                rec[f"{metric}_beats_best_single"] = ci["beats_best"]
            rec["p_paired_val_loss"] = (
                float("nan")
                if method == "single"
                else paired_p(val_losses.get((*key, "single"), []), val_losses.get((*key, method), []))
            )
            out.append(rec)
    return pd.DataFrame(out)


def _fmt_p(p: float) -> str:
    return "–" if p != p else f"{p:.2g}"


def _delta(value: float, lo: float, hi: float, scale: float = 1.0, digits: int = 4) -> str:
    return "–" if value != value else f"{scale * value:+.{digits}f}{format_ci(lo, hi, scale, digits)}"


def _beats(value) -> str:
    return "–" if value is None or value != value else ("**yes**" if value else "no")


def _score(r) -> str:
    """Mean ± std in per cent; '–' where no test sample was scored (eval.n_generate: 0)."""
    return (
        "–"
        if r.task_score_mean != r.task_score_mean
        else f"{100 * r.task_score_mean:.1f} ± {100 * r.task_score_std:.1f}"
    )


def table1_markdown(t: pd.DataFrame, title: str = "Table 1: single fine-tunes vs merges") -> str:
    lines = [
        f"# {title}",
        "",
        "Single: mean ± std over the K runs. Merges: mean ± std over merge seeds (average is deterministic).",
        "Δ is against the single-run mean, Δ best against the best single run (re-chosen in every resample);",
        "[brackets]: 95 % bootstrap intervals over evaluation samples. Lower val loss and higher task scores",
        "are better; 'beats best' = better than every single run. p: Wilcoxon signed-rank test of per-sample",
        "val losses, merge (mean over seeds) vs the mean single run. Task metric: exact_match (final numeric",
        "answer) or mc_accuracy (multiple choice, by log-likelihood).",
        "",
        "| model | task | scheme | precision | method | n | val loss | Δ val loss [95% CI] | p | Δ best [95% CI] |"
        " beats best | task metric | score % | Δ score pts [95% CI] | Δ best pts [95% CI] | beats best |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in t.itertuples():
        best_pts = _delta(
            r.task_score_delta_best, r.task_score_delta_best_ci_low, r.task_score_delta_best_ci_high, 100, 1
        )
        lines.append(
            f"| {r.model} | {r.task} | {r.scheme} | {r.precision} | {r.method} | {r.n} | "
            f"{r.val_loss_mean:.4f} ± {r.val_loss_std:.4f} | "
            f"{_delta(r.val_loss_delta, r.val_loss_delta_ci_low, r.val_loss_delta_ci_high)} | "
            f"{_fmt_p(r.p_paired_val_loss)} | "
            f"{_delta(r.val_loss_delta_best, r.val_loss_delta_best_ci_low, r.val_loss_delta_best_ci_high)} | "
            f"{_beats(r.val_loss_beats_best_single)} | "
            f"{r.task_metric if r.task_score_mean == r.task_score_mean else '–'} | {_score(r)} | "
            f"{_delta(r.task_score_delta, r.task_score_delta_ci_low, r.task_score_delta_ci_high, 100, 1)} | "
            f"{best_pts} | {_beats(r.task_score_beats_best_single)} |"
        )
    return "\n".join(lines) + "\n"


def comparison(t1: pd.DataFrame, by: str, merged_method: str) -> pd.DataFrame:
    """Single vs one merge method, one row per value of ``by`` (model for Table 2, scheme for Table 4)."""
    rows = []
    keys = [k for k in GROUP if k != by]
    for key, g in t1.groupby(keys + [by], sort=True):
        single, merged = g[g["method"] == "single"], g[g["method"] == merged_method]
        if single.empty or merged.empty:
            continue
        rows.append(
            {
                **dict(zip(keys + [by], key)),
                "method": merged_method,
                "single_val_loss": single["val_loss_mean"].item(),
                "merged_val_loss": merged["val_loss_mean"].item(),
                "delta_val_loss": merged["val_loss_mean"].item() - single["val_loss_mean"].item(),
                "task_metric": single["task_metric"].item(),
                "single_task_score": single["task_score_mean"].item(),
                "merged_task_score": merged["task_score_mean"].item(),
                "delta_task_score": merged["task_score_mean"].item() - single["task_score_mean"].item(),
            }
        )
    return pd.DataFrame(rows)


def comparison_markdown(t: pd.DataFrame, title: str) -> str:
    cols = list(t.columns)
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in t.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines) + "\n"
