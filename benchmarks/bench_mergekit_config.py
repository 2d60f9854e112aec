"""ordermerge ``merge --config`` and mergekit ``mergekit-yaml`` on the SAME YAML configs, side by side.

K synthetic bf16 fine-tunes of a SmolLM2-135M-sized base (bench_merge's, cached under --cache). For each
config (linear, task_arithmetic, ties in float32 and in bfloat16 arithmetic, ties without trimming
(density 1: the sign election and disjoint mean alone), dare_linear) both whole
commands run in fresh processes, page cache warm, ordermerge's input digests cached (bench_merge's
default rows; mergekit hashes nothing): wall time (best of --repeats), CPU time and peak RSS of each, and
mergekit's time / ordermerge's. Then how far the outputs are apart:

- deterministic methods: the largest difference in bf16 ulps, the fraction of elements that differ, and
  ||om - mk|| / ||mk - base|| (the difference relative to the merged update);
- dare_linear draws random numbers, from different generators in the two tools (ordermerge: its own
  seeded PCG64 streams and 1/density; mergekit: torch.bernoulli and, with rescale, a per-tensor L1 norm
  ratio), so the bytes cannot agree. Compared instead are the distributions of the merged update Δ =
  merged − base: the fraction of elements it changes, its mean and standard deviation, and its distance
  from the task-arithmetic merge it estimates (ordermerge task_arithmetic with the same weights).

    python benchmarks/bench_mergekit_config.py [--k 4] [--repeats 2] [--configs linear,ties,...]

mergekit 0.1.5 lives in its own environment (/tmp/mk, bench_merge.MERGEKIT_PYTHON); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from bench_merge import MERGEKIT_PYTHON, agreement, bench_inputs, command, has_mergekit

from ordermerge.storage.checkpoint import LazyCheckpoint


def _models(models: list[Path], **params) -> str:
    lines = ["models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters:"] + [f"      {k}: {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def configs(base: Path, models: list[Path]) -> dict[str, str]:
    """The configs, shaped like mergekit's examples (absolute paths: mergekit reads them from the working
    directory, ordermerge from the config's directory)."""
    k = len(models)
    return {
        "linear": _models(models, weight=1.0) + "merge_method: linear\ndtype: bfloat16\n",
        "task_arithmetic": _models(models, weight=round(1 / k, 6)) + "merge_method: task_arithmetic\n"
        f"base_model: {base}\ndtype: float32\nout_dtype: bfloat16\n",
        "ties": _models(models, weight=1.0, density=0.2) + f"merge_method: ties\nbase_model: {base}\n"
        "parameters:\n  normalize: true\n  int8_mask: true\ndtype: float32\nout_dtype: bfloat16\n",
        "ties_density1": _models(models, weight=1.0, density=1.0) + f"merge_method: ties\nbase_model: {base}\n"
        "dtype: float32\nout_dtype: bfloat16\n",
        "ties_bf16": _models(models, weight=1.0, density=0.2) + f"merge_method: ties\nbase_model: {base}\n"
        "parameters:\n  normalize: true\n  int8_mask: true\ndtype: bfloat16\n",
        "dare_linear": _models(models, weight=round(1 / k, 6), density=0.1) + f"merge_method: dare_linear\n"
        f"base_model: {base}\ndtype: float32\nout_dtype: bfloat16\n",
    }


def run_ordermerge(config: Path, out: Path) -> tuple[float, float, int]:
    return command(sys.executable, "ordermerge.cli:main", ["merge", "--config", config, "--out", out, "--force"])


def run_mergekit(config: Path, out: Path) -> tuple[float, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    return command(
        MERGEKIT_PYTHON,
        "mergekit.scripts.run_yaml:main",
        [config, out, "--quiet", "--random-seed", "0", "--no-copy-tokenizer"],
    )


def best(run, config: Path, out: Path, repeats: int) -> tuple[float, float, int]:
    runs = [run(config, out) for _ in range(repeats)]
    fastest = min(runs, key=lambda r: r[0])
    return fastest[0], fastest[1], max(r[2] for r in runs)


def update_stats(merged: Path, base: Path, reference: Path) -> dict:
    """Δ = merged − base over every tensor: changed fraction, mean, std, ||Δ|| / ||Δ_ref|| (also over the
    matrices alone and the vectors alone: norms and biases are small tensors, where a per-tensor rescale
    factor is noisy), ||Δ − Δ_ref|| / ||Δ_ref||."""
    m, b, r = LazyCheckpoint(merged), LazyCheckpoint(base), LazyCheckpoint(reference)
    n = changed = 0
    s1 = dist2 = 0.0
    s2, ref2 = {1: 0.0, 2: 0.0}, {1: 0.0, 2: 0.0}
    for name in b.keys():
        tb = b.get(name).double()
        delta, ref = m.get(name).double() - tb, r.get(name).double() - tb
        n += delta.numel()
        changed += int((delta != 0).sum())
        s1 += float(delta.sum())
        dim = min(2, delta.dim())
        s2[dim], ref2[dim] = s2[dim] + float(delta.square().sum()), ref2[dim] + float(ref.square().sum())
        dist2 += float((delta - ref).square().sum())
    mean, total, total_ref = s1 / n, sum(s2.values()), sum(ref2.values())
    return {
        "changed": changed / n,
        "mean": mean,
        "std": (total / n - mean**2) ** 0.5,
        "norm_ratio": (total / total_ref) ** 0.5,
        "matrices": (s2[2] / ref2[2]) ** 0.5,
        "vectors": (s2[1] / ref2[1]) ** 0.5,
        "rel_l2_to_ta": (dist2 / total_ref) ** 0.5,
    }


def zero_elections(base: Path, models: list[Path]) -> float:
    """The fraction of elements where Σ τ_i is exactly 0 while some τ_i is not (equal weights, no trimming):
    there mergekit elects + and takes the positive entries, ordermerge keeps the base (docs/mergekit.md)."""
    b, ms = LazyCheckpoint(base), [LazyCheckpoint(m) for m in models]
    n = zero = 0
    for name in b.keys():
        tb = b.get(name).float()
        taus = torch.stack([m.get(name).float() - tb for m in ms])
        zero += int(((taus.sum(0) == 0) & (taus != 0).any(0)).sum())
        n += tb.numel()
    return zero / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path("/tmp/ordermerge-bench"))
    p.add_argument("--configs", default="linear,task_arithmetic,ties,ties_density1,ties_bf16,dare_linear")
    a = p.parse_args()
    if not has_mergekit():
        sys.exit(
            f"mergekit is not importable from {MERGEKIT_PYTHON}: python3 -m venv /tmp/mk && "
            "/tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5"
        )
    base, models = bench_inputs(a.cache, a.k)
    work = a.cache / "mergekit-config"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["ORDERMERGE_CACHE_DIR"] = str(work / "digest-cache")
    texts = configs(base, models)
    names = [n for n in a.configs.split(",") if n]
    for name, text in texts.items():
        (work / f"{name}.yml").write_text(text)
    run_ordermerge(work / "linear.yml", work / "warm")  # fills the digest cache; mergekit hashes nothing
    version = os.popen(f"{MERGEKIT_PYTHON} -c 'import importlib.metadata as m; print(m.version(\"mergekit\"))'").read()
    print(
        f"\nK={a.k} bf16 fine-tunes of {base}; ordermerge vs mergekit {version.strip()}, same YAML, whole commands "
        f"(imports included), best of {a.repeats}; {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print(f"{'config':16s} {'ordermerge':>28s} {'mergekit':>28s} {'mk/om':>6s}   agreement (om vs mk)")
    outputs = {}
    for name in names:
        config = work / f"{name}.yml"
        om, mk = work / f"{name}-om", work / f"{name}-mk"
        ts, tc, tr = best(run_ordermerge, config, om, a.repeats)
        ms, mc, mr = best(run_mergekit, config, mk, a.repeats)
        outputs[name] = (om, mk)
        g = agreement(om, mk, base)
        note = (
            f"max {g['max_ulps']} ulp, {g['differ']:.2%} of elements differ, ||om-mk||/||mk-base|| "
            f"{g['rel_l2']:.2e}" + (f", {g['only_in_one']} tensors in one only" if g["only_in_one"] else "")
        )
        print(
            f"{name:16s} {ts:6.2f}s {tc:6.2f}s CPU {tr:5d} MB {ms:6.2f}s {mc:6.2f}s CPU {mr:5d} MB "
            f"{ms / ts:5.2f}x   {note}",
            flush=True,
        )
        if name in ("ties", "ties_bf16"):
            kept = json.loads((om / "merge.json").read_text())["kept_fraction"]
            print(
                f"{'':16s} ordermerge kept {min(kept):.2%}-{max(kept):.2%} of each task vector: every element tied "
                "with the k-th largest |τ| (mergekit: exactly floor(density·n), 20.00%)",
                flush=True,
            )
        if name == "ties_density1":
            print(
                f"{'':16s} of which explained: Σ τ_i = 0 exactly with some τ_i != 0 (mergekit elects +, "
                f"ordermerge keeps the base) at {zero_elections(base, models):.2%} of elements",
                flush=True,
            )
    if "dare_linear" in outputs:
        reference = work / "expected-ta"
        ta = texts["dare_linear"].replace("merge_method: dare_linear", "merge_method: task_arithmetic")
        ta = "\n".join(line for line in ta.splitlines() if "density" not in line) + "\n"
        (work / "expected-ta.yml").write_text(ta)
        run_ordermerge(work / "expected-ta.yml", reference)
        print(
            "\ndare_linear (density 0.1): random in both tools, different generators, so distributions, not bytes. "
            "Δ = merged − base; reference: task arithmetic with the same weights (what DARE estimates)"
        )
        print(
            f"{'':12s} {'changed':>9s} {'mean(Δ)':>11s} {'std(Δ)':>11s} {'|Δ|/|Δ_TA|':>11s} {'matrices':>9s} "
            f"{'vectors':>8s} {'|Δ-Δ_TA|/|Δ_TA|':>16s}"
        )
        for label, out in (*zip(("ordermerge", "mergekit"), outputs["dare_linear"]), ("TA (exact)", reference)):
            s = update_stats(out, base, reference)
            print(
                f"{label:12s} {s['changed']:9.4f} {s['mean']:11.3e} {s['std']:11.3e} {s['norm_ratio']:11.4f} "
                f"{s['matrices']:9.4f} {s['vectors']:8.4f} {s['rel_l2_to_ta']:16.4f}"
            )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
