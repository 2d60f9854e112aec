"""How long Snakemake takes to plan the workflow at paper scale, against the smoke config's plan.

Builds a paper-scale config (Llama-2-7b from the hub, K=20 orders, 3 epochs, every epoch scored,
methods average/select/resample1..4, 5 merge seeds, several hub tasks) in a temporary directory and
times `snakemake -n` on it (a fresh process each time: parsing, validation, DAG, the job listing),
best of --repeat, next to the smoke config (tests/configs/smoke.yaml) measured in the same run.
Nothing is fetched: a dry run only names the hub model and datasets.

    python benchmarks/bench_dag.py [--tasks 4] [--runs 20] [--schemes shuffle fixbatch] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The paper's tasks with a GSM8K-like hub loader spec: a dry run never loads them.
PAPER_TASKS = {
    "gsm8k": {"path": "gsm8k", "name": "main"},
    "gsm8k-rft": {"path": "json", "data_files": "data/gsm8k_rft.jsonl"},
    "math": {"path": "hendrycks/competition_math", "prompt_field": "problem", "response_field": "solution"},
    "alpaca": {"path": "tatsu-lab/alpaca", "prompt_field": "instruction", "response_field": "output"},
    "humaneval": {
        "path": "openai_humaneval",
        "split": "test",
        "prompt_field": "prompt",
        "response_field": "canonical_solution",
    },
}


def paper_config(n_tasks: int, runs: int, schemes: list[str]) -> dict:
    names = list(PAPER_TASKS)[:n_tasks] + [f"task{i}" for i in range(max(0, n_tasks - len(PAPER_TASKS)))]
    tasks = {
        n: {
            "source": "hf",
            **PAPER_TASKS.get(n, {"path": "gsm8k", "name": "main"}),
            "max_length": 1024,
            "n_train": 7000,
            "n_val": 200,
            "n_test": 1000,
        }
        for n in names
    }
    return {
        "results_dir": "results",
        "models": {"llama2-7b": {"source": "meta-llama/Llama-2-7b-hf"}},
        "tasks": tasks,
        "runs": runs,
        "schemes": schemes,
        "train": {"epochs": 3, "batch_size": 64, "lr": 2.0e-5, "compute_dtype": "bfloat16"},
        "losses": {"epochs": "all"},
        "merge": {
            "methods": ["average", "select", "resample1", "resample2", "resample3", "resample4"],
            "seeds": [0, 1, 2, 3, 4],
        },
        "resources": {"fine_tune": {"gpus": 1, "mem_mb": 160000, "runtime": 480}},
    }


def dry_run(configfile: Path, workdir: Path) -> tuple[float, dict[str, int]]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        str(BIN / "snakemake"),
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(configfile),
        "--profile",
        str(ROOT / "profiles" / "slurm"),
        "-n",
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    seconds = time.perf_counter() - t
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"dry run of {configfile} failed:\n{out[-3000:]}")
    block = out.split("Job stats:", 1)[1]
    return seconds, {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def best_of(configfile: Path, repeat: int) -> tuple[float, dict[str, int]]:
    runs = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as wd:
            runs.append(dry_run(configfile, Path(wd)))
    return min(s for s, _ in runs), runs[0][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--schemes", nargs="+", default=["shuffle"], choices=["shuffle", "fixbatch"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paper = Path(tmp) / "paper.yaml"
        paper.write_text(yaml.safe_dump(paper_config(args.tasks, args.runs, args.schemes), sort_keys=False))
        smoke_s, smoke_jobs = best_of(ROOT / "tests" / "configs" / "smoke.yaml", args.repeat)
        paper_s, paper_jobs = best_of(paper, args.repeat)

    print(f"dry run (snakemake -n, fresh process, best of {args.repeat}), on {os.cpu_count()} CPUs")
    print(f"{'config':<44} {'jobs':>6} {'seconds':>8} {'ms/job':>7}")
    label = f"paper: K={args.runs}, 3 ep, 6 methods x 5 seeds, {args.tasks} tasks, {'+'.join(args.schemes)}"
    for name, s, jobs in [("smoke (tests/configs/smoke.yaml)", smoke_s, smoke_jobs), (label, paper_s, paper_jobs)]:
        print(f"{name:<44} {jobs['total']:>6} {s:>8.2f} {1000 * s / jobs['total']:>7.1f}")
    print(
        f"paper / smoke: {paper_jobs['total'] / smoke_jobs['total']:.1f}x the jobs, {paper_s / smoke_s:.2f}x the time"
    )
    print("paper-scale jobs per rule: " + ", ".join(f"{k} {v}" for k, v in paper_jobs.items() if k != "total"))


if __name__ == "__main__":
    main()
