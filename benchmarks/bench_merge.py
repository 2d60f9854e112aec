"""Merge speed and memory against the physical floor of a merge.

K synthetic fine-tunes of a bf16 base (a real SmolLM2 directory via --base, else a random base with
SmolLM2-135M's tensor shapes, or --scale times as many layers and vocabulary) are built once under
--cache: base + small relative noise rounded to bf16, so most elements are stored unchanged, as in
real bf16 fine-tunes. Then, page cache warm:

- the floor: reading the K inputs once (cat, best of 3) plus writing and fsyncing one model-sized
  output (best of 3), both measured in this run;
- the sha256 of base + inputs that merge.json records (a merge computes it from its own reads the
  first time it sees a checkpoint, and takes it from the digest cache later: digest_cache.py);
- average and select with the inputs hashed (digest cache off), as the first merge of new runs is;
- each ordermerge method in a fresh process with the digests cached, as every later merge of the
  same runs is: wall time after imports, ratio to the floor, CPU time, peak RSS; mergekit linear if
  /tmp/mk has it;
- a K sweep (--sweep) of the methods in --sweep-methods: time, ratio to that K's floor, peak RSS.

On a shared machine wall times follow the load; CPU times much less so.

    python benchmarks/bench_merge.py [--base DIR] [--k 8] [--quick] [--scale 4] [--sweep 2,4,8,16]
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
from safetensors.torch import save_file

from ordermerge.merging import registry
from ordermerge.merging.bits import stored_bits
from ordermerge.merging.engine import sha256_of_dir
from ordermerge.storage.checkpoint import LazyCheckpoint

SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
NOISE = 0.003  # relative update size: leaves ~60 % of bf16 elements exactly unchanged
MERGEKIT_PYTHON = Path("/tmp/mk/bin/python")

# Children report their own peak RSS: VmHWM of the process image they exec'd. (ru_maxrss from wait4
# would include the RSS this parent had when it forked them.) Linux only.
PEAK_RSS = 'int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024'
# A merge in a fresh process; time and CPU count from after the imports.
MERGE_SNIPPET = f"""
import json, resource, sys, time
import torch
from ordermerge.merging.engine import merge_models
a = json.loads(sys.argv[1])
if a["threads"]:
    torch.set_num_threads(a["threads"])
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
t, c = time.perf_counter(), cpu()
merge_models(a["base"], a["models"], a["out"], method=a["method"], force=True, progress=False, **a["params"])
print(json.dumps({{"seconds": time.perf_counter() - t, "cpu": cpu() - c, "rss": {PEAK_RSS}}}))
"""
# A whole command line (imports included), run by its console-script function.
COMMAND_SNIPPET = f"""
import importlib, json, sys
module, function = sys.argv[1].split(":")
try:
    getattr(importlib.import_module(module), function)(sys.argv[2:])
except SystemExit as exc:
    if exc.code:
        raise
print(json.dumps({{"rss": {PEAK_RSS}}}))
"""


def synthetic_base(directory: Path, scale: int = 1) -> Path:
    """SmolLM2-135M's shapes; ``scale`` times its layers and vocabulary (about ``scale`` times its bytes)."""
    if directory.exists():
        return directory
    c = dict(
        SMOLLM2_135M,
        num_hidden_layers=SMOLLM2_135M["num_hidden_layers"] * scale,
        vocab_size=SMOLLM2_135M["vocab_size"] * scale,
    )
    h, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    g = torch.Generator().manual_seed(0)
    state = {
        n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
        for n, s in shapes.items()
    }
    _save_dir(directory, state, json.dumps(c, indent=2))
    return directory


def _save_dir(directory: Path, state: dict, config: str) -> None:
    """Write under a temporary name and rename: an interrupted build is never taken for a cached one."""
    tmp = directory.parent / f".tmp-{directory.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(config)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(directory)


def fine_tunes(base: Path, root: Path, k: int) -> list[Path]:
    """K cached fine-tunes; returns their directories and prints the unchanged fraction of new ones."""
    state = None
    dirs = []
    for i in range(k):
        d = root / f"ft{i}"
        dirs.append(d)
        if d.exists():
            continue
        if state is None:
            ckpt = LazyCheckpoint(base)
            state = {n: ckpt.get(n) for n in ckpt.keys()}
        g = torch.Generator().manual_seed(1000 + i)
        ft, same, total = {}, 0, 0
        for name, t in state.items():
            f = t.float()
            ft[name] = f.add_(f * torch.randn(f.shape, generator=g), alpha=NOISE).to(t.dtype)
            same += int((stored_bits(ft[name]) == stored_bits(t)).sum())
            total += t.numel()
        _save_dir(d, ft, (base / "config.json").read_text())
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


def hash_floor(dirs: list[Path], threads: int) -> tuple[float, float]:
    """Wall and CPU seconds of the digests merge.json records (the merge computes the same)."""
    t, c = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(sha256_of_dir, dirs))
    return time.perf_counter() - t, time.process_time() - c


def write_floor(nbytes: int, where: Path, repeats: int = 3) -> float:
    """Writing ``nbytes`` to a new file beside the outputs and fsyncing it: best of ``repeats``."""
    data = os.urandom(1 << 24)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        with tempfile.NamedTemporaryFile(dir=where) as fh:
            for lo in range(0, nbytes, len(data)):
                fh.write(data[: nbytes - lo])
            fh.flush()
            os.fsync(fh.fileno())
        best = min(best, time.perf_counter() - t)
    return best


def run_measured(cmd: list[str]) -> tuple[dict, float, float]:
    """Run a command that prints a JSON line last: that line, wall seconds, CPU seconds (whole process)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{err.read().decode()[-3000:]}")
        out.seek(0)
        return json.loads(out.read().decode().strip().splitlines()[-1]), wall, usage.ru_utime + usage.ru_stime


def ordermerge(base, models, out, method, threads, repeats, params=None) -> tuple[float, float, int]:
    """Best merge time (after imports) of ``repeats`` fresh processes, with its CPU time and peak RSS in MB."""
    args = json.dumps(
        {
            "base": str(base),
            "models": [str(m) for m in models],
            "out": str(out),
            "method": method,
            "threads": threads,
            "params": params or {},
        }
    )
    runs = [run_measured([sys.executable, "-c", MERGE_SNIPPET, args])[0] for _ in range(repeats)]
    best = min(runs, key=lambda r: r["seconds"])
    return best["seconds"], best["cpu"], max(r["rss"] for r in runs)


def command(python: Path | str, entry: str, args: list) -> tuple[float, float, int]:
    """Wall time, CPU time and peak RSS of a whole command line, run by its entry point."""
    report, wall, cpu = run_measured([str(python), "-c", COMMAND_SNIPPET, entry, *map(str, args)])
    return wall, cpu, report["rss"]


def mergekit_linear(models, out: Path) -> tuple[float, float, int]:
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / "mergekit-linear.yml"
    lines = ["merge_method: linear", "dtype: bfloat16", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters:", "      weight: 1.0"]
    config.write_text("\n".join(lines) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    return command(MERGEKIT_PYTHON, "mergekit.scripts.run_yaml:main", [config, out, "--quiet"])


def has_mergekit() -> bool:
    return (
        MERGEKIT_PYTHON.exists()
        and subprocess.run([str(MERGEKIT_PYTHON), "-c", "import mergekit"], capture_output=True).returncode == 0
    )


def _ulp_line(t: torch.Tensor) -> torch.Tensor:
    """bf16 bits as sign-magnitude -> a monotone integer line, so differences count ulps."""
    i = t.view(torch.int16).int()
    return torch.where(i < 0, -(i & 0x7FFF), i)


def agreement(a_dir: Path, b_dir: Path, base_dir: Path | None = None) -> dict:
    """How far two bf16 merges of the same inputs are apart, over the tensors both have: the largest
    difference in bf16 ulps, the fraction of elements that differ, and (with ``base_dir``) the L2 norm of
    the difference relative to that of b's merged update, ||a - b|| / ||b - base||."""
    a, b = LazyCheckpoint(a_dir), LazyCheckpoint(b_dir)
    base = LazyCheckpoint(base_dir) if base_dir else None
    worst, differ, total, diff2, update2 = 0, 0, 0, 0.0, 0.0
    names = sorted(set(a.keys()) & set(b.keys()))
    for name in names:
        ta, tb = a.get(name), b.get(name)
        if ta.dtype == torch.bfloat16 and tb.dtype == torch.bfloat16:
            worst = max(worst, int((_ulp_line(ta) - _ulp_line(tb)).abs().max()))
        differ += int((stored_bits(ta) != stored_bits(tb)).sum()) if ta.dtype == tb.dtype else ta.numel()
        total += ta.numel()
        diff2 += float((ta.double() - tb.double()).square().sum())
        if base is not None:
            update2 += float((tb.double() - base.get(name).double()).square().sum())
    out = {
        "max_ulps": worst,
        "differ": differ / max(1, total),
        "tensors": len(names),
        "only_in_one": len(set(a.keys()) ^ set(b.keys())),
    }
    if base is not None:
        out["rel_l2"] = (diff2 / update2) ** 0.5 if update2 else float("inf") if diff2 else 0.0
    return out


def max_ulps(a_dir: Path, b_dir: Path) -> int:
    return agreement(a_dir, b_dir)["max_ulps"]


def bench_inputs(cache: Path, k: int, base: Path | None = None, scale: int = 1) -> tuple[Path, list[Path]]:
    """The base (``base``, else the synthetic SmolLM2-sized one) and ``k`` cached synthetic fine-tunes of it."""
    base = base or synthetic_base(cache / ("base-synthetic" + (f"-x{scale}" if scale > 1 else "")), scale)
    key = hashlib.sha256(f"{base.resolve()} {NOISE}".encode()).hexdigest()[:8]
    return base, fine_tunes(base, cache / f"fine-tunes-of-{base.name}-{key}", k)


METHODS = {  # method key: parameters beyond those the key fixes
    "average": {},
    "select": {},
    "resample1": {},
    "resample4": {},
    "task_arithmetic": {},
    "ties": {"density": 0.2},
    "dare": {"drop_rate": 0.9},
    "model_stock": {},
}


def request(key: str) -> tuple[str, dict]:
    """(method, parameters) of a row: resample1 is select with resample 1 (registry.parse_key)."""
    method, fixed = registry.parse_key(key)
    return method.name, {**fixed, **METHODS[key]}


# Targets on the ratio to the floor (and peak RSS) that the merge engine is held to; a row that
# misses one says by how much.
GOALS = {
    "average": (1.3, None),
    "select": (1.3, None),
    "resample1": (1.6, None),
    "resample4": (1.6, None),
    "dare": (2.0, None),
    "ties": (3.0, 600),
}


def verdict(name: str, ratio: float, rss: int) -> str:
    if name not in GOALS:
        return ""
    x, mb = GOALS[name]
    misses = ([f"time {ratio / x - 1:.0%} over"] if ratio > x else []) + (
        [f"RSS {rss / mb - 1:.0%} over"] if mb is not None and rss > mb else []
    )
    goal = f"goal <= {x}x" + (f", <= {mb} MB" if mb is not None else "")
    return f"  {goal}: " + ("met" if not misses else "missed, " + ", ".join(misses))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="a bf16 HF safetensors directory; default: synthetic SmolLM2-135M")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="one repeat, K sweep 2 and 4 only, no mergekit")
    p.add_argument("--cache", type=Path, default=Path("/tmp/ordermerge-bench"))
    p.add_argument("--threads", type=int, help="torch threads for the merges (default: torch's own)")
    p.add_argument("--scale", type=int, default=1, help="synthetic base with this many times the layers and vocabulary")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--sweep", help="comma-separated K values (default 2,4,8,16; --quick 2,4; empty: none)")
    p.add_argument("--sweep-methods", default="average,select,resample4,ties,dare")
    a = p.parse_args()
    sweep = [int(x) for x in (a.sweep if a.sweep is not None else "2,4" if a.quick else "2,4,8,16").split(",") if x]
    methods = [m for m in a.methods.split(",") if m]
    repeats = 1 if a.quick else 2
    threads = a.threads or torch.get_num_threads()
    base, models = bench_inputs(a.cache, max([a.k, *sweep]), a.base, a.scale)
    out = a.cache / "out"
    out.mkdir(parents=True, exist_ok=True)
    size = sum(p.stat().st_size for p in weight_files([base]))

    print(
        f"\nK={a.k} bf16 fine-tunes of {base} ({size / 1e6:.0f} MB each), {threads} threads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    read = read_floor(models[: a.k])
    write = write_floor(size, out)
    floor = read + write
    print(f"read of the K inputs (cat, warm cache)  {read:6.2f} s  ({a.k * size / read / 1e9:.1f} GB/s, best of 3)")
    print(f"write + fsync of one output             {write:6.2f} s  (best of 3)")
    print(f"floor = read + write + fsync            {floor:6.2f} s")
    print(
        "sha256 of base + inputs (for reference) {:6.2f} s  ({:.2f} s CPU; the merge hashes what it reads)".format(
            *hash_floor([base, *models[: a.k]], threads)
        )
    )
    idle_rss = run_measured(
        [sys.executable, "-c", f"import json, ordermerge.merging.engine; print(json.dumps({PEAK_RSS}))"]
    )[0]
    print(f"peak RSS of python + torch + ordermerge imported: {idle_rss} MB\n")
    print(f"{'method (digests cached, unless hashing)':36s} {'time':>7s} {'x floor':>8s} {'CPU':>7s} {'peak RSS':>9s}")

    def row(label, sec, cpu, rss, note=""):
        print(f"{label:36s} {sec:6.2f}s {sec / floor:7.2f}x {cpu:6.2f}s {rss:6d} MB{note}", flush=True)

    def label(name):
        method, params = request(name)
        return " ".join([f"ordermerge {method}", *(f"--{k.replace('_', '-')} {v}" for k, v in params.items())])

    digests = a.cache / "digest-cache"  # this run's own digest cache (digest_cache.py), emptied first
    shutil.rmtree(digests, ignore_errors=True)
    os.environ["ORDERMERGE_CACHE_DIR"] = "off"
    for name in [m for m in ("average", "select") if m in methods]:
        method, params = request(name)
        row(label(name) + ", hashing", *ordermerge(base, models[: a.k], out / "om", method, a.threads, repeats, params))
    os.environ["ORDERMERGE_CACHE_DIR"] = str(digests)
    ordermerge(base, models[: a.k], out / "om", "average", a.threads, 1)  # the first merge fills the cache
    for name in methods:
        method, params = request(name)
        sec, cpu, rss = ordermerge(base, models[: a.k], out / "om", method, a.threads, repeats, params)
        row(label(name), sec, cpu, rss, verdict(name, sec / floor, rss))
    if a.quick:
        print("whole-command runs and mergekit: skipped (--quick)")
    else:
        cli = ["merge", "--base", base, "--method", "average", "--force", "--out", out / "om", *models[: a.k]]
        row("ordermerge average, command", *command(sys.executable, "ordermerge.cli:main", cli))
        if has_mergekit():
            sec, cpu, rss = mergekit_linear(models[: a.k], out / "mergekit")
            row(
                "mergekit linear, command",
                sec,
                cpu,
                rss,
                f"  max difference from ordermerge average: {max_ulps(out / 'om', out / 'mergekit')} bf16 ulp",
            )
        else:
            print("mergekit: not installed, skipped")

    if sweep:
        names = [m for m in a.sweep_methods.split(",") if m]
        print("\nK sweep: time, x that K's floor (read + write + fsync), peak RSS")
        print(f"{'K':4s} {'floor':>6s} " + " ".join(f"{n:>25s}" for n in names))
        for k in sweep:
            f = read_floor(models[:k]) + write
            ordermerge(base, models[:k], out / "om", "average", a.threads, 1)  # digests of the new inputs cached
            cells = []
            for name in names:
                method, params = request(name)
                sec, cpu, rss = ordermerge(base, models[:k], out / "om", method, a.threads, 1, params)
                cells.append(f"{sec:6.2f}s {sec / f:5.2f}x {rss:5d} MB")
            print(f"{k:<4d} {f:5.2f}s " + " ".join(f"{c:>25s}" for c in cells), flush=True)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
