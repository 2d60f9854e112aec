"""Merge speed and memory against the cost of reading the inputs once.

K synthetic fine-tunes of a bf16 base (a real SmolLM2 directory via --base, else a random base with
SmolLM2-135M's tensor shapes) are built once under --cache: base + small relative noise rounded to
bf16, so most elements are stored unchanged, as in real bf16 fine-tunes. Then, page cache warm:
the read floor (cat of the K inputs, best of 3), the unavoidable extras (sha256 of the inputs for
merge.json; writing + fsync of one output), each ordermerge method (wall time in a fresh process
after imports, ratio to the floor, peak RSS), mergekit linear if /tmp/mk has it, and a K sweep.

    python benchmarks/bench_merge.py [--base DIR] [--k 8] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
    "hidden_act": "silu", "torch_dtype": "bfloat16",
}
NOISE = 0.003  # relative update size: leaves ~60 % of bf16 elements exactly unchanged
MERGEKIT_PYTHON = Path("/tmp/mk/bin/python")

# Runs in a fresh process so that RSS is the merge's own; timing starts after the imports.
MERGE_SNIPPET = """
import json, sys, time
import torch
from ordermerge.merge import merge_models
a = json.loads(sys.argv[1])
if a["threads"]:
    torch.set_num_threads(a["threads"])
t = time.perf_counter()
merge_models(a["base"], a["models"], a["out"], method=a["method"], resample=a["resample"], force=True, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def synthetic_base(directory: Path) -> Path:
    if (directory / "model.safetensors").exists():
        return directory
    c = SMOLLM2_135M
    h, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}
    g = torch.Generator().manual_seed(0)
    state = {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
             for n, s in shapes.items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(c, indent=2))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def fine_tunes(base: Path, root: Path, k: int) -> list[Path]:
    """K cached fine-tunes; returns their directories and prints the unchanged fraction of new ones."""
    state = None
    dirs = []
    for i in range(k):
        d = root / f"ft{i}"
        dirs.append(d)
        if (d / "model.safetensors").exists():
            continue
        state = state or load_file(str(base / "model.safetensors"))
        g = torch.Generator().manual_seed(1000 + i)
        ft, same, total = {}, 0, 0
        for name, t in state.items():
            f = t.float()
            ft[name] = f.add_(f * torch.randn(f.shape, generator=g), alpha=NOISE).to(t.dtype)
            same += int((ft[name].view(torch.int16) == t.view(torch.int16)).sum())
            total += t.numel()
        tmp = root / f".tmp-ft{i}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy2(base / "config.json", tmp / "config.json")
        save_file(ft, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tmp.rename(d)
        print(f"built {d} ({same / total:.0%} of elements unchanged)", flush=True)
    return dirs


def weight_files(dirs: list[Path]) -> list[Path]:
    return [p for d in dirs for p in sorted(d.glob("*.safetensors"))]


def read_floor(dirs: list[Path]) -> float:
    files = [str(p) for p in weight_files(dirs)]
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        best = min(best, time.perf_counter() - t)
    return best


def hash_floor(dirs: list[Path], threads: int) -> float:
    def digest(p):
        with open(p, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(digest, weight_files(dirs)))
    return time.perf_counter() - t


def write_floor(nbytes: int, where: Path) -> float:
    data = os.urandom(1 << 24)
    t = time.perf_counter()
    with tempfile.NamedTemporaryFile(dir=where) as fh:
        for _ in range(0, nbytes, len(data)):
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return time.perf_counter() - t


def run_measured(cmd: list[str]) -> tuple[str, float, float, int]:
    """Run a command: its stdout, wall seconds, CPU seconds and peak RSS in MB (its own, from wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{err.read().decode()[-3000:]}")
        out.seek(0)
        return out.read().decode(), wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024


def ordermerge(base, models, out, method, resample, threads, repeats) -> tuple[float, float, int]:
    """Best in-process merge time (after imports) of ``repeats`` fresh processes, its CPU time, peak RSS."""
    args = json.dumps({"base": str(base), "models": [str(m) for m in models], "out": str(out), "method": method,
                       "resample": resample, "threads": threads})
    best = (float("inf"), 0.0, 0)
    for _ in range(repeats):
        text, _, cpu, rss = run_measured([sys.executable, "-c", MERGE_SNIPPET, args])
        best = min(best, (json.loads(text.strip().splitlines()[-1])["seconds"], cpu, rss))
    return best


def ordermerge_cli(base, models, out) -> float:
    cmd = [sys.executable, "-m", "ordermerge", "merge", "--base", str(base), "--method", "average", "--force",
           "--out", str(out), *map(str, models)]
    return run_measured(cmd)[1]


def mergekit_linear(models, out: Path) -> tuple[float, float, int]:
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / "mergekit-linear.yml"
    lines = ["merge_method: linear", "dtype: bfloat16", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters:", "      weight: 1.0"]
    config.write_text("\n".join(lines) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    _, wall, cpu, rss = run_measured([str(MERGEKIT_PYTHON.parent / "mergekit-yaml"), str(config), str(out), "--quiet"])
    return wall, cpu, rss


def has_mergekit() -> bool:
    return MERGEKIT_PYTHON.exists() and subprocess.run([str(MERGEKIT_PYTHON), "-c", "import mergekit"],
                                                       capture_output=True).returncode == 0


def max_ulps(a_dir: Path, b_dir: Path) -> int:
    a = {k: v for f in weight_files([a_dir]) for k, v in load_file(str(f)).items()}
    b = {k: v for f in weight_files([b_dir]) for k, v in load_file(str(f)).items()}
    worst = 0
    for name, t in a.items():
        if name in b:
            # bf16 bits as sign-magnitude -> a monotone integer line, so differences count ulps
            ia, ib = (x.view(torch.int16).int() for x in (t, b[name]))
            ia, ib = (torch.where(x < 0, -(x & 0x7FFF), x) for x in (ia, ib))
            worst = max(worst, int((ia - ib).abs().max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="a bf16 HF directory (model.safetensors); default: synthetic SmolLM2-135M")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="one repeat, K sweep 2 and 4 only, no mergekit")
    p.add_argument("--cache", type=Path, default=Path("/tmp/ordermerge-bench"))
    p.add_argument("--threads", type=int, help="torch threads for the merges (default: torch's own)")
    a = p.parse_args()
    sweep = (2, 4) if a.quick else (2, 4, 8, 16)
    repeats = 1 if a.quick else 2
    threads = a.threads or torch.get_num_threads()
    base = a.base or synthetic_base(a.cache / "base-synthetic")
    models = fine_tunes(base, a.cache / f"fine-tunes-of-{base.name}", max(a.k, *sweep))
    out = a.cache / "out"
    size = sum(p.stat().st_size for p in weight_files([base]))

    print(f"\nK={a.k} bf16 fine-tunes of {base} ({size / 1e6:.0f} MB each), {threads} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    floor = read_floor(models[: a.k])
    print(f"read floor (cat, warm cache)      {floor:6.2f} s  ({a.k * size / floor / 1e9:.1f} GB/s)")
    print(f"sha256 of inputs ({threads} threads)       {hash_floor([base, *models[: a.k]], threads):6.2f} s"
          "  (merge.json needs it)")
    print(f"write + fsync of one output        {write_floor(size, a.cache):6.2f} s")
    idle_rss = run_measured([sys.executable, "-c", "import ordermerge.merge"])[3]
    print(f"RSS of python + torch + ordermerge imported: {idle_rss} MB\n")
    print(f"{'method':28s} {'time':>7s} {'x floor':>8s} {'CPU':>7s} {'peak RSS':>9s}")
    for method, resample in (("average", 0), ("select", 0), ("select", 4)):
        sec, cpu, rss = ordermerge(base, models[: a.k], out / "om", method, resample, a.threads, repeats)
        label = f"ordermerge {method}" + (f" --resample {resample}" if resample else "")
        print(f"{label:28s} {sec:6.2f}s {sec / floor:7.1f}x {cpu:6.2f}s {rss:6d} MB", flush=True)
    if a.quick:
        print("CLI and mergekit runs: skipped (--quick)")
    else:
        sec = ordermerge_cli(base, models[: a.k], out / "om")
        print(f"{'ordermerge average, CLI':28s} {sec:6.2f}s {sec / floor:7.1f}x   (whole command, imports included)")
        if has_mergekit():
            sec, cpu, rss = mergekit_linear(models[: a.k], out / "mergekit")
            ulps = max_ulps(out / "om", out / "mergekit")
            print(f"{'mergekit linear, CLI':28s} {sec:6.2f}s {sec / floor:7.1f}x {cpu:6.2f}s {rss:6d} MB"
                  f"  max difference from ordermerge average: {ulps} bf16 ulp")
        else:
            print("mergekit: not installed, skipped")

    print(f"\n{'K sweep':8s} {'floor':>7s} {'average':>25s} {'select':>25s}")
    for k in sweep:
        f = read_floor(models[:k])
        cells = []
        for method in ("average", "select"):
            sec, _, rss = ordermerge(base, models[:k], out / "om", method, 0, a.threads, 1)
            cells.append(f"{sec:5.2f}s {sec / f:5.1f}x {rss:5d} MB")
        print(f"K={k:<6d} {f:6.2f}s {cells[0]:>25s} {cells[1]:>25s}", flush=True)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
