"""The K-sweep and the multi-task merge (Table 3): their tables, the K-sweep figure, tidy rows.

Called by ``analysis.analyze`` when ``ksweep.enabled`` or ``multitask.tasks`` is set. The builders
are pure functions of small frames (tested on synthetic inputs); the loaders read exactly the files
the config asks for (the same plan the Snakefile builds), never a glob.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ordermerge.merging.registry import merge_variants
from ordermerge.merging.subsets import sweep_plan
from ordermerge.paths import Paths
from ordermerge.plan import figure_name

METRICS = ("val_loss", "exact_match")
IDS = [
    "model",
    "task",
    "scheme",
    "precision",
    "kind",
    "method",
    "seed",
    "run",
    "epoch",
    "subset_size",
    "subset",
    "merged",
]


def token_mean_loss(df: pd.DataFrame) -> float:
    """Token-weighted mean validation loss of a per-sample loss frame (as evaluate computes it)."""
    if "split" in df:
        df = df[df["split"] == "val"]
    return float((df["loss"] * df["tokens"]).sum() / df["tokens"].sum())


def _mean_std(values: pd.Series) -> tuple[float, float]:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


# --- K-sweep -----------------------------------------------------------------------------------


def ksweep_table(sweep: pd.DataFrame, single: pd.DataFrame) -> pd.DataFrame:
    """Per (model, task, scheme, method, subset size): mean ± std over the random subsets, beside the
    single-run mean (the reference a merge has to beat). Exact match is NaN when not decoded.

    ``sweep``: one row per merged subset (model, task, scheme, method, subset_size, val_loss,
    exact_match); ``single``: one row per single run (model, task, scheme, val_loss, exact_match).
    """
    keys = ["model", "task", "scheme", "precision"]
    ref = {k: g for k, g in single.groupby(keys)}
    rows = []
    for key, g in sweep.groupby(keys + ["method", "subset_size"], sort=True):
        rec = {**dict(zip(keys + ["method", "subset_size"], key)), "n_subsets": len(g)}
        for metric in METRICS:
            rec[f"{metric}_mean"], rec[f"{metric}_std"] = _mean_std(g[metric])
            s = ref.get(key[:4])
            # a metric no single run was scored on (eval.n_generate: 0 decodes nothing) is NaN, not an error
            single_mean = _mean_std(s[metric])[0] if s is not None and metric in s else float("nan")
            rec[f"single_{metric}_mean"] = single_mean
            rec[f"{metric}_delta"] = rec[f"{metric}_mean"] - single_mean
        rows.append(rec)
    return pd.DataFrame(rows)


def ksweep_markdown(t: pd.DataFrame) -> str:
    lines = [
        "# K-sweep: merges of random subsets of the K runs",
        "",
        "Mean ± std over the random subsets of each size; Δ against the mean of the single runs (lower val",
        "loss, higher exact match are better). Exact match is blank unless `ksweep.exact_match: true`.",
        "",
        "| model | task | scheme | precision | method | size | subsets | val loss | single val loss | Δ val loss |"
        " exact match % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in t.itertuples():
        em = "" if np.isnan(r.exact_match_mean) else f"{100 * r.exact_match_mean:.1f} ± {100 * r.exact_match_std:.1f}"
        lines.append(
            f"| {r.model} | {r.task} | {r.scheme} | {r.precision} | {r.method} | {r.subset_size} | {r.n_subsets} | "
            f"{r.val_loss_mean:.4f} ± {r.val_loss_std:.4f} | {r.single_val_loss_mean:.4f} | "
            f"{r.val_loss_delta:+.4f} | {em} |"
        )
    return "\n".join(lines) + "\n"


def load_ksweep(results: Path, cfg: dict) -> pd.DataFrame:
    """One row per (model, task, scheme, size, subset, method) the config's K-sweep built."""
    ks, seed = cfg["ksweep"], cfg["merge"]["seeds"][0]
    plan = sweep_plan(cfg["runs"], ks["sizes"], ks["subsets"], cfg["seed"])
    rows, p = [], Paths(str(results))
    for model in cfg["models"]:
        for task in cfg["tasks"]:
            for scheme, precision in itertools.product(cfg["schemes"], cfg["precisions"]):
                w = {"model": model, "task": task, "scheme": scheme, "precision": precision}
                for size, subsets in plan.items():
                    for i, runs in enumerate(subsets):
                        for method in ks["methods"]:
                            files = {
                                kind: f.format(**w, size=size, subset=i, method=method)
                                for kind, f in p.eval_outputs("ksweep_merged").items()
                            }
                            em = float("nan")
                            if ks["exact_match"]:
                                em = json.loads(Path(files["metrics"]).read_text())["exact_match"]
                            rows.append(
                                {
                                    **w,
                                    "kind": "ksweep",
                                    "method": method,
                                    "seed": seed,
                                    "run": None,
                                    "epoch": cfg["train"]["epochs"],
                                    "subset_size": size,
                                    "subset": i,
                                    "merged": " ".join(f"run{k}" for k in runs),
                                    "val_loss": token_mean_loss(pd.read_csv(files["val_losses"])),
                                    "exact_match": em,
                                }
                            )
    return pd.DataFrame(rows)


def plot_ksweep(table: pd.DataFrame, single: pd.DataFrame, title: str, path: Path) -> None:
    """Val loss (and exact match, when decoded) vs subset size: one line per method, mean ± std over
    subsets; the single runs' mean (± std band) as the reference."""
    from ordermerge.analysis.figures import _save, method_colour, plt

    panels = [("val_loss", "validation loss (nats / response token)")]
    if table["exact_match_mean"].notna().any():
        panels.insert(0, ("exact_match", "exact match of the final answer (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(8 if len(panels) == 1 else 13, 5), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels):
        scale = 100.0 if metric == "exact_match" else 1.0
        ref_mean, ref_std = _mean_std(single[metric])
        ax.axhline(scale * ref_mean, color="black", ls="--", lw=1.5, label=f"single runs: mean ({len(single)} runs)")
        ax.axhspan(
            scale * (ref_mean - ref_std),
            scale * (ref_mean + ref_std),
            color="gray",
            alpha=0.15,
            label="single runs: ± std",
        )
        for i, (method, g) in enumerate(table.groupby("method", sort=False)):
            g = g.sort_values("subset_size")
            ax.errorbar(
                g["subset_size"] + 0.05 * i,
                scale * g[f"{metric}_mean"],
                yerr=scale * g[f"{metric}_std"],
                fmt="o-",
                capsize=3,
                color=method_colour(method),
                label=f"merged: {method} (mean ± std over subsets)",
            )
        sizes = sorted(table["subset_size"].unique())
        ax.set_xticks(sizes)
        ax.set_xlim(min(sizes) - 0.5, max(sizes) + 0.5)  # one size alone would otherwise stretch the offsets
        ax.set_xlabel("runs merged (subset size n of the K runs)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    note = "" if len(panels) > 1 else "\n(exact match not decoded: set ksweep.exact_match: true)"
    fig.suptitle(title + note, fontsize=10)
    _save(fig, path)


# --- Multi-task merge (Table 3) ------------------------------------------------------------------


def table3(merged: pd.DataFrame, single: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per evaluated task, its single-task model vs the multi-task merge of each method (mean ± std
    over merge seeds), Δ vs single; then per method the mean Δ over tasks (task '(mean)', the
    paper's avg Δ).

    ``merged``: rows (model, task, method, seed, val_loss, exact_match), ``task`` being the task the
    merge was evaluated on; ``single``: each task's single-task model, one row per (model, task).
    """
    rows = []
    for (model, precision, task), s in single.groupby(["model", "precision", "task"], sort=False):
        ref = {m: _mean_std(s[m])[0] if m in s else float("nan") for m in METRICS}
        rows.append(
            {
                "model": model,
                "precision": precision,
                "task": task,
                "method": "single-task",
                "n": len(s),
                **{f"{m}_{stat}": v for m in METRICS for stat, v in (("mean", ref[m]), ("std", 0.0), ("delta", 0.0))},
            }
        )
        g = merged[(merged["model"] == model) & (merged["task"] == task) & (merged["precision"] == precision)]
        for method in methods:
            r = g[g["method"] == method]
            if r.empty:
                continue
            rec = {"model": model, "precision": precision, "task": task, "method": method, "n": len(r)}
            for m in METRICS:
                rec[f"{m}_mean"], rec[f"{m}_std"] = _mean_std(r[m])
                rec[f"{m}_delta"] = rec[f"{m}_mean"] - ref[m]
            rows.append(rec)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    merges = out[out["method"] != "single-task"]
    deltas = [f"{m}_delta" for m in METRICS]
    avg = merges.groupby(["model", "precision", "method"], sort=False).agg(
        n=("task", "size"), **{d: (d, "mean") for d in deltas}
    )
    return pd.concat([out, avg.reset_index().assign(task="(mean)")], ignore_index=True)


def table3_markdown(t: pd.DataFrame) -> str:
    lines = [
        "# Table 3: multi-task merge vs single-task fine-tunes",
        "",
        "Each task's single-task model (one fine-tune) vs the merge of all tasks' single-task models,",
        "evaluated on that task; merges: mean ± std over merge seeds. Δ vs single-task; '(mean over tasks)'",
        "rows average Δ over the tasks (the paper's avg Δ). Lower val loss, higher exact match are better.",
        "",
        "| model | precision | task | method | n | val loss | Δ val loss | exact match % | Δ EM (pts) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in t.itertuples():
        if r.task == "(mean)":
            lines.append(
                f"| {r.model} | {r.precision} | (mean over {r.n} tasks) | {r.method} | | | {r.val_loss_delta:+.4f} | | "
                f"{100 * r.exact_match_delta:+.1f} |"
            )
            continue
        lines.append(
            f"| {r.model} | {r.precision} | {r.task} | {r.method} | {r.n} | "
            f"{r.val_loss_mean:.4f} ± {r.val_loss_std:.4f} | {r.val_loss_delta:+.4f} | "
            f"{100 * r.exact_match_mean:.1f} ± {100 * r.exact_match_std:.1f} | "
            f"{100 * r.exact_match_delta:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def load_multitask(results: Path, cfg: dict) -> pd.DataFrame:
    mt = cfg["multitask"]
    rows = []
    for model in cfg["models"]:
        for task in mt["tasks"]:
            for method, seed in merge_variants(mt["methods"], mt["seeds"]):
                for precision in cfg["precisions"]:
                    metrics = Paths(str(results)).eval_outputs("eval_multitask")["metrics"]
                    m = json.loads(
                        Path(
                            metrics.format(model=model, task=task, precision=precision, method=method, mseed=seed)
                        ).read_text()
                    )
                    rows.append(
                        {**{k: m.get(k) for k in IDS}, "val_loss": m["val_loss"], "exact_match": m["exact_match"]}
                    )
    return pd.DataFrame(rows)


# --- tidy rows and the stage itself --------------------------------------------------------------


def tidy_extra(frame: pd.DataFrame) -> pd.DataFrame:
    """Tidy rows (as metrics.csv) for K-sweep / multi-task models; ``kind`` tells them apart, and
    subset_size, subset and merged (the runs or tasks merged) identify them. No row for a metric
    that was not computed."""
    if frame.empty:
        return pd.DataFrame(columns=IDS + ["metric", "value"])
    tidy = frame.melt(id_vars=IDS, value_vars=list(METRICS), var_name="metric", value_name="value")
    return tidy.dropna(subset=["value"]).reset_index(drop=True)


def analyze_ksweep_and_multitask(
    cfg: dict, results: Path, out: Path, metrics: pd.DataFrame, write_table
) -> pd.DataFrame:
    """Writes ksweep.csv/.md + figures and table3.csv/.md as configured; returns their tidy rows."""
    frames = []
    single = metrics[metrics["kind"] == "single"] if not metrics.empty else metrics
    if (cfg.get("ksweep") or {}).get("enabled"):
        sweep = load_ksweep(results, cfg)
        t = ksweep_table(sweep, single)
        write_table(out, "ksweep", t, ksweep_markdown(t))
        for (model, task, scheme, precision), g in t.groupby(["model", "task", "scheme", "precision"]):
            s = single[
                (single["model"] == model)
                & (single["task"] == task)
                & (single["scheme"] == scheme)
                & (single["precision"] == precision)
            ]
            plot_ksweep(
                g,
                s,
                f"K-sweep — {model}, {task}, {scheme}, stored in {precision}:\nmerges of random subsets "
                f"of the {cfg['runs']} runs vs the single runs",
                Path(Paths(str(out)).of("figure", name=figure_name("ksweep", model, task, scheme, precision))),
            )
        frames.append(sweep)
        print(ksweep_markdown(t))
    mt = cfg.get("multitask") or {}
    if mt.get("tasks"):
        merged = load_multitask(results, cfg)
        scheme = cfg["schemes"][0]
        ref = single[(single["scheme"] == scheme) & (single["run"] == mt["run"]) & single["task"].isin(mt["tasks"])]
        t = table3(merged, ref, mt["methods"])
        write_table(out, "table3", t, table3_markdown(t))
        frames.append(merged)
        print(table3_markdown(t))
    return tidy_extra(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
