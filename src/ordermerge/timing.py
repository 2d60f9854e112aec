"""Where a run's time went: wall and CPU seconds per stage from the Snakemake benchmark of every job
(``paths.job_benchmark``), and the fine-tuning token budget with its measured tokens/s (from each
run's ``steps.csv``). Machines differ ~2x in speed; the token budget and tokens/s say why a run took
what it took, and let a user predict it elsewhere. Torch-free; ``make run`` prints it at the end."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pandas as pd

from ordermerge.paths import BENCHMARK_SUFFIX, JOBS, LOGS, Paths


def _glob_of(pattern: str) -> str:
    return re.sub(r"\{[^}]+\}", "*", pattern)


def stage_table(logs: Path = Path(LOGS), since: float = 0.0) -> pd.DataFrame:
    """One row per stage: jobs, wall s summed over jobs (lane-s), CPU s, peak RSS of its largest job."""
    rows = []
    for stage in sorted({stage for stage, _ in JOBS.values()}):
        files = [f for f in (logs / stage).glob(f"*{BENCHMARK_SUFFIX}") if f.stat().st_mtime >= since]
        if stage == ".":  # the analysis: logs/analyze.benchmark.tsv
            files = [f for f in logs.glob(f"analyze{BENCHMARK_SUFFIX}") if f.stat().st_mtime >= since]
        if not files:
            continue
        b = pd.concat([pd.read_csv(f, sep="\t") for f in files], ignore_index=True)
        rows.append(
            {
                "stage": "analyze" if stage == "." else stage,
                "jobs": len(files),
                "lane_s": float(b["s"].sum()),
                "cpu_s": float(pd.to_numeric(b.get("cpu_time"), errors="coerce").sum()),
                "max_rss_mb": float(pd.to_numeric(b.get("max_rss"), errors="coerce").max()),
            }
        )
    t = pd.DataFrame(rows, columns=["stage", "jobs", "lane_s", "cpu_s", "max_rss_mb"])
    if len(t):
        t["share"] = t["lane_s"] / t["lane_s"].sum()
    return t.sort_values("lane_s", ascending=False).reset_index(drop=True)


def training_tokens(results: Path, since: float = 0.0) -> dict:
    """Tokens fine-tuned on (the token budget), the seconds the steps took, and tokens/s per job: overall
    and without each run's first step (warm-up: allocation, first kernels)."""
    files = [
        Path(f) for f in sorted(glob.glob(_glob_of(Paths(str(results)).steps))) if Path(f).stat().st_mtime >= since
    ]
    if not files:
        return {"runs": 0}
    steps = [pd.read_csv(f) for f in files]
    tokens = sum(int(s["tokens"].sum()) for s in steps)
    seconds = sum(float(s["seconds"].sum()) for s in steps)
    steady = pd.concat([s.iloc[1:] for s in steps])
    return {
        "runs": len(files),
        "steps": sum(len(s) for s in steps),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else float("nan"),
        "steady_tokens_per_s": float(steady["tokens"].sum() / steady["seconds"].sum()) if len(steady) else float("nan"),
    }


def report(
    results: Path, logs: Path = Path(LOGS), since: float = 0.0, wall: float | None = None, cores: int | None = None
) -> str:
    t, tok = stage_table(logs, since), training_tokens(results, since)
    lines = [
        "Where the time went (Snakemake benchmarks under logs/<stage>/; lane-s = wall seconds summed over jobs):",
        "",
    ]
    lines.append(f"{'stage':20s} {'jobs':>5s} {'lane-s':>8s} {'share':>6s} {'CPU s':>8s} {'peak RSS':>9s}")
    for r in t.itertuples():
        lines.append(
            f"{r.stage:20s} {r.jobs:5d} {r.lane_s:8.0f} {100 * r.share:5.0f}% {r.cpu_s:8.0f} {r.max_rss_mb:7.0f} MB"
        )
    total = float(t["lane_s"].sum()) if len(t) else 0.0
    lines.append(f"{'all jobs':20s} {int(t['jobs'].sum()) if len(t) else 0:5d} {total:8.0f}")
    if tok.get("runs"):
        lines += [
            "",
            f"Fine-tuning token budget: {tok['tokens']:,} tokens in {tok['steps']} optimizer steps over "
            f"{tok['runs']} runs; {tok['tokens_per_s']:.1f} tokens/s per job ({tok['steady_tokens_per_s']:.1f} "
            f"after each run's first step), {tok['seconds']:.0f} s of steps.",
        ]
    if wall:
        lines.append(
            f"Wall time: {wall:.0f} s ({wall / 60:.1f} min)"
            + (f"; {total / wall:.2f} jobs busy on average of {cores} cores" if cores and total else "")
        )
    return "\n".join(lines) + "\n"
