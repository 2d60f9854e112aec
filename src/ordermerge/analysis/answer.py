"""The report's landing page (``results/answer.rst``): the run's answer before anything else. The paired
position statistic with its interval and verdict, Table 1's headline rows with their intervals, which
merge (if any) beat every single run, and where to look next. Written by ``analyze`` from the tables it
has just computed; the Snakefile's ``report:`` directive shows it first when it exists."""

from __future__ import annotations

import pandas as pd

from ordermerge.analysis.stats import format_ci


def _rst_table(header: list[str], rows: list[list[str]]) -> str:
    """A grid table: RST's only table form that needs no column-width guessing by the reader."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line, fmt(header), line.replace("-", "="), *(x for r in rows for x in (fmt(r), line))])


def answer_rst(imbalance: pd.DataFrame, t1: pd.DataFrame, cfg: dict) -> str:
    out = [
        "Does the data order matter, and does merging help?",
        "=" * 52,
        "",
        f"K = {cfg['runs']} fine-tunes of the same base, one data order each, {cfg['train']['epochs']} epochs; "
        f"merges: {', '.join(cfg['merge']['methods'])} (merge seeds {', '.join(map(str, cfg['merge']['seeds']))}).",
        "Intervals are 95 % bootstrap intervals over samples.",
        "",
        f"One training, stored in {len(cfg['precisions'])} precision(s): {', '.join(cfg['precisions'])} (the first is "
        "the headline). Every merge, evaluation and statistic below is made once per precision from the same "
        "runs; bf16 rounds most small updates back to the base's value (tables/storage.md).",
        "",
        "Position effect",
        "---------------",
        "",
        "Paired ρ: across pairs of runs, a sample's change in first-epoch position against its change in "
        "final training loss (its difficulty cancels). ρ < 0: samples seen early end with a higher loss "
        "(the paper's direction).",
        "",
    ]
    for r in imbalance.itertuples():
        out.append(
            f"- **{r.model} / {r.task} / {r.scheme} / {r.precision}** ({r.n_samples} samples × {r.runs} runs): "
            f"paired ρ = **{r.rho_paired:+.3f}**{format_ci(r.rho_paired_ci_low, r.rho_paired_ci_high, digits=3)}, "
            f"permutation p = {r.p_paired_permutation:.2g}. **{r.verdict_paired}.**"
        )
    out += ["", "Merges vs single runs (Table 1)", "-------------------------------", ""]
    header = [
        "method",
        "n",
        "val loss",
        "Δ vs mean single",
        "Δ vs best single",
        "beats every run",
        "task score %",
        "Δ score (pts)",
    ]
    winners = []

    def spread(mean: float, std: float, n: int, fmt: str) -> str:  # ± only where there is a spread to show
        return f"{mean:{fmt}} ± {std:{fmt}}" if n > 1 else f"{mean:{fmt}}"

    for (model, task, scheme, precision), group in t1.groupby(["model", "task", "scheme", "precision"], sort=False):
        metric = group["task_metric"].iloc[0]
        title = f"{model} / {task} / {scheme}, stored in {precision}" + (
            f" ({metric})" if isinstance(metric, str) else ""
        )
        rows = []
        for r in group.itertuples():
            merged = r.method != "single"
            flag = r.val_loss_beats_best_single
            beats = bool(flag) if merged and flag is not None and flag == flag else None
            if beats:
                winners.append(f"{r.method} ({model} / {task} / {scheme} / {precision})")
            rows.append(
                [
                    r.method,
                    str(r.n),
                    spread(r.val_loss_mean, r.val_loss_std, r.n, ".4f"),
                    f"{r.val_loss_delta:+.4f}{format_ci(r.val_loss_delta_ci_low, r.val_loss_delta_ci_high)}"
                    if merged
                    else "–",
                    f"{r.val_loss_delta_best:+.4f}"
                    f"{format_ci(r.val_loss_delta_best_ci_low, r.val_loss_delta_best_ci_high)}"
                    if merged
                    else "–",
                    ("yes" if beats else "no") if merged else "–",
                    spread(100 * r.task_score_mean, 100 * r.task_score_std, r.n, ".1f")
                    if r.task_score_mean == r.task_score_mean
                    else "–",
                    f"{100 * r.task_score_delta:+.1f}"
                    f"{format_ci(r.task_score_delta_ci_low, r.task_score_delta_ci_high, 100, 1)}"
                    if merged and r.task_score_delta == r.task_score_delta
                    else "–",
                ]
            )
        out += [f"**{title}**", "", _rst_table(header, rows), ""]
    out.append("n: runs (single) or merge seeds; ± is the standard deviation over them.")
    out.append("")
    out.append(
        ("**Better than every single run on val loss:** " + ", ".join(winners) + ".")
        if winners
        else "**No merge has a lower val loss than every single run.**"
    )
    out += [
        "",
        "Where to look next",
        "------------------",
        "",
        "- **Figures**: Fig. 1 (first-epoch position vs final loss, per run and paired), Fig. 3 (loss by "
        "segment of the anchor run's order, merges included), Fig. 4 when every epoch is scored.",
        "- **Tables**: table1 (every Δ with its interval), imbalance (all position statistics), metrics "
        "(every evaluated model, tidy).",
        "- The files: ``results/tables/`` and ``results/figures/``; per job logs and timings under ``logs/``.",
        "",
    ]
    return "\n".join(out)
