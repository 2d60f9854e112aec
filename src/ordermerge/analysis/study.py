"""`ordermerge study-report`: the study's runs (configs/study.yaml: the default extended, and its
replications with new data orders) gathered into one folder a reader can browse (docs/results/): each run's
figures and Markdown tables copied as they are, and a README.md that puts the runs' position-effect
statistics and Table 1 side by side, then pools the replications: the paired ρ over the runs of every
replicate (the same samples in 4 x R orders) and each merge's Δ val loss averaged over replicates, each
with a 95 % bootstrap interval over samples. The per-run rows are copied from the runs' own tables; the
pooled rows are computed here from the runs' per-sample files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ordermerge.analysis.stats import format_ci
from ordermerge.paths import EVAL_FILES, Paths

SEED = 0  # the pooled intervals' bootstrap seed (deterministic)


def imbalance_markdown(runs: dict[str, Path]) -> str:
    lines = [
        "| run | task | scheme | precision | n × K | paired ρ [95% CI] | perm. p | verdict | residual ρ [95% CI] |"
        " loss, first vs last decile |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        t = pd.read_csv(Paths(str(results)).of("table", name="imbalance", ext="csv"))
        for r in t.itertuples():
            lines.append(
                f"| {name} | {r.task} | {r.scheme} | {r.precision} | {r.n_samples} × {r.runs} | {r.rho_paired:+.3f}"
                f"{format_ci(r.rho_paired_ci_low, r.rho_paired_ci_high, digits=3)} | {r.p_paired_permutation:.3g} | "
                f"{r.verdict_paired} | {r.rho_residual_pooled:+.3f}"
                f"{format_ci(r.rho_residual_ci_low, r.rho_residual_ci_high, digits=3)} | "
                f"{r.loss_first_decile:.4f} vs {r.loss_last_decile:.4f} |"
            )
    return "\n".join(lines) + "\n"


def merges_markdown(runs: dict[str, Path]) -> str:
    lines = [
        "| run | task | scheme | precision | method | val loss | Δ vs mean single [95% CI] | Δ vs best single "
        "[95% CI] | beats every single run (val loss) | score % | Δ score pts [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        t = pd.read_csv(Paths(str(results)).of("table", name="table1", ext="csv"))
        for r in t[t["method"] != "single"].itertuples():
            score = (
                "–"
                if r.task_score_mean != r.task_score_mean
                else (
                    f"{100 * r.task_score_mean:.1f} | {100 * r.task_score_delta:+.1f}"
                    f"{format_ci(r.task_score_delta_ci_low, r.task_score_delta_ci_high, 100, 1)}"
                )
            )
            lines.append(
                f"| {name} | {r.task} | {r.scheme} | {r.precision} | {r.method} | {r.val_loss_mean:.4f} | "
                f"{r.val_loss_delta:+.4f}{format_ci(r.val_loss_delta_ci_low, r.val_loss_delta_ci_high)} | "
                f"{r.val_loss_delta_best:+.4f}"
                f"{format_ci(r.val_loss_delta_best_ci_low, r.val_loss_delta_best_ci_high)} | "
                f"{'yes' if r.val_loss_beats_best_single else 'no'} | "
                f"{score if score != '–' else '– | –'} |"
            )
    return "\n".join(lines) + "\n"


def _group_key(r) -> tuple:
    return r.model, r.task, r.scheme, r.precision


def pooled_rho_markdown(runs: dict[str, Path]) -> str:
    """Per (model, task, scheme, precision) present in every run: the paired ρ over all the runs' fine-tunes
    together (replicates share the data split, so every pair of fine-tunes is a pair of orders)."""
    from ordermerge.analysis.run import position_loss_matrix
    from ordermerge.analysis.stats import paired_rho, paired_rho_ci, permutation_p, verdict

    tables = {name: pd.read_csv(Paths(str(res)).of("table", name="imbalance", ext="csv")) for name, res in runs.items()}
    keys = [
        k
        for k in map(_group_key, next(iter(tables.values())).itertuples())
        if all(k in set(map(_group_key, t.itertuples())) for t in tables.values())
    ]
    lines = [
        "| task | scheme | precision | runs pooled | paired ρ [95% CI] | perm. p | verdict | per-run ρ: sign agrees |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        w = dict(zip(("model", "task", "scheme", "precision"), key))
        pos, loss, signs = [], [], []
        for name, res in runs.items():
            r = tables[name][[_group_key(x) == key for x in tables[name].itertuples()]].iloc[0]
            a, b = position_loss_matrix(Paths(str(res)), w, int(r.runs), int(r.epoch))
            pos.append(a)
            loss.append(b)
            signs.append(np.sign(r.rho_paired))
        positions, losses = np.concatenate(pos), np.concatenate(loss)
        rho = paired_rho(positions, losses)
        lo, hi = paired_rho_ci(positions, losses, SEED)
        agree = sum(sg == np.sign(rho) for sg in signs)
        lines.append(
            f"| {w['task']} | {w['scheme']} | {w['precision']} | {len(positions)} | {rho:+.3f}"
            f"{format_ci(lo, hi, digits=3)} | {permutation_p(positions, losses, n_perm=499, seed=SEED):.3g} | "
            f"{verdict(lo, hi)} | {agree} of {len(signs)} replicates |"
        )
    return "\n".join(lines) + "\n"


def _val_matrix(stems: list[str]) -> tuple[pd.Index, np.ndarray, np.ndarray]:
    frames = [pd.read_csv(stem + EVAL_FILES["val_losses"]).set_index("sample_id").sort_index() for stem in stems]
    ids = frames[0].index
    return (
        ids,
        np.array([f.loc[ids, "loss"].to_numpy(float) for f in frames]),
        np.array([f.loc[ids, "tokens"].to_numpy(float) for f in frames]),
    )


def pooled_merges_markdown(runs: dict[str, Path]) -> str:
    """Each merge's Δ val loss against the mean single run, averaged over the replicates (equal weight),
    with a 95 % bootstrap interval over validation samples (a sample resampled with all its runs, merge
    seeds and replicates), and in how many replicates it beat every single run."""
    from ordermerge.analysis.stats import bootstrap_ci
    from ordermerge.analysis.tables import _weighted

    per_run = {}
    for name, res in runs.items():
        p = Paths(str(res))
        m = pd.read_csv(p.of("table", name="metrics", ext="csv"), keep_default_na=False)
        m = m[(m["metric"] == "val_loss") & (m.get("harness", "") == "")]
        t1 = pd.read_csv(p.of("table", name="table1", ext="csv"))
        per_run[name] = (p, m, t1)
    lines = [
        "| task | scheme | precision | method | replicates | Δ vs mean single, mean over replicates [95% CI] |"
        " beats every run in |",
        "|---|---|---|---|---|---|---|",
    ]
    first = next(iter(per_run.values()))[2]
    for r in first[first["method"] != "single"].itertuples():
        key, deltas, beats = _group_key(r), [], 0
        present = [
            n
            for n, (_, _, t1) in per_run.items()
            if ((t1["method"] == r.method) & (t1.apply(_group_key, axis=1) == key)).any()
        ]
        if len(present) < 2:
            continue
        for name in present:
            p, m, t1 = per_run[name]
            w = dict(zip(("model", "task", "scheme", "precision"), key))
            g = m[
                (m["model"] == w["model"])
                & (m["task"] == w["task"])
                & (m["scheme"] == w["scheme"])
                & (m["precision"] == w["precision"])
            ]
            singles = [p.of("eval_single", **w, run=int(float(k))) for k in g[g["kind"] == "single"]["run"]]
            merged = [
                p.of("eval_merged", **w, method=r.method, mseed=int(float(s)))
                for s in g[(g["kind"] == "merged") & (g["method"] == r.method)]["seed"]
            ]
            ids, s_loss, s_tok = _val_matrix(singles)
            _, m_loss, m_tok = _val_matrix(merged)
            deltas.append((s_loss, s_tok, m_loss, m_tok))
            row = t1[(t1["method"] == r.method) & (t1.apply(_group_key, axis=1) == key)].iloc[0]
            beats += bool(row["val_loss_beats_best_single"])

        def delta(idx, deltas=deltas):  # token-weighted val loss, as Table 1's
            return float(
                np.mean([_weighted(ml, mt, idx).mean() - _weighted(sl, st, idx).mean() for sl, st, ml, mt in deltas])
            )

        n = deltas[0][0].shape[1]
        lo, hi = bootstrap_ci(delta, n, SEED, f"pooled-{'-'.join(key)}-{r.method}")
        lines.append(
            f"| {r.task} | {r.scheme} | {r.precision} | {r.method} | {len(present)} | "
            f"{delta(np.arange(n)):+.4f}{format_ci(lo, hi)} | {beats} of {len(present)} |"
        )
    return "\n".join(lines) + "\n"


def study_report(runs: dict[str, Path], out: Path) -> list[Path]:
    """Copies each run's figures/*.png and tables/*.md under ``out/<run>/`` and writes ``out/README.md``."""
    out.mkdir(parents=True, exist_ok=True)
    written, sections = [], []
    for name, results in runs.items():
        dest = out / name
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir()
        p = Paths(str(results))
        figures = sorted(Path(p.of("figure", name="x")).parent.glob("*.png"))
        tables = sorted(Path(p.of("table", name="x", ext="md")).parent.glob("*.md"))
        for f in figures + tables:
            written.append(Path(shutil.copy2(f, dest / f.name)))
        timing = Path(p.timing)
        if timing.exists():
            written.append(Path(shutil.copy2(timing, dest / timing.name)))
        sections.append(f"## {name}\n\n" + "\n".join(f"- [{f.name}]({name}/{f.name})" for f in figures + tables) + "\n")
    readme = (
        "# Study results\n\nGenerated by `make study` (`ordermerge study-report`) from the runs of "
        "`configs/study.yaml`; every number is copied from the runs' own tables.\n\n"
        "## Position effect (paired ρ: first-epoch position vs final loss, difficulty cancelled)\n\n"
        + imbalance_markdown(runs)
        + "\n## Merges vs single runs (Table 1)\n\n"
        + merges_markdown(runs)
        + (
            (
                "\n## Pooled over the replicates\n\nPaired ρ over the fine-tunes of every run together "
                "(same samples, new orders):\n\n"
                + pooled_rho_markdown(runs)
                + "\nMerges: Δ val loss vs the mean single run, averaged over the runs that have the merge:\n\n"
                + pooled_merges_markdown(runs)
            )
            if len(runs) > 1
            else ""
        )
        + "\n"
        + "\n".join(sections)
    )
    (out / "README.md").write_text(readme)
    return written + [out / "README.md"]
