"""`make gpu-check`: what a GPU machine does with ordermerge, in one command (≤ 10 min on one GPU).

    python benchmarks/gpu_check.py [--steps 30] [--batch-size 8] [--peak-tflops 989]

1. Fine-tuning throughput on the GPU, bf16 autocast with sdpa attention, padded vs packed rows: tokens/s
   (first step skipped) and MFU = tokens/s x 6 x parameters / the GPU's dense bf16 peak (looked up by
   name below, or --peak-tflops). Model: the default run's SmolLM2-135M base if `make run` built it,
   else built here from the shipped GGUF (offline); data: the default task's train split, else
   synthetic records.
2. `ordermerge merge --device cuda` against `--device cpu` for every method on K=4 synthetic
   fine-tunes with SmolLM2-135M's shapes: the output bytes must be identical (sha256 of the weights).

Exits 1 without a CUDA device (`--allow-cpu` runs the same steps on the CPU, tiny, to test this script).
Put its output in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_merge import fine_tunes, synthetic_base  # noqa: E402
from bench_train import SMOLLM, bench_ordermerge, distinct_repeats, tiny_setup  # noqa: E402

from ordermerge.merging.registry import METHODS, PARAMETERS  # noqa: E402

# Dense bf16 peak TFLOP/s (no sparsity) by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "V100": 125.0,
    "T4": 65.0,
}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # longer names first where they share a prefix
        if key in name:
            return value
    return None


def model_and_data(tmp: Path, need: int, allow_cpu: bool) -> tuple[Path, Path, dict]:
    from ordermerge.config import load_config
    from ordermerge.data.prepare import read_jsonl

    cfg = load_config(ROOT / "config.yaml")
    task, spec = next(iter(cfg["tasks"].items()))
    if allow_cpu:  # the script's own test: a tiny model
        base, data = tiny_setup(tmp, need)
        return base, data, {"max_length": 96 + 8, "system_prompt": None}
    base = SMOLLM / "base"
    if not (base / "model.safetensors").exists():
        base = tmp / "base"
        subprocess.run(["ordermerge", "base-model", "--source", "smollm2-gguf", "--out", str(base)], check=True)
    split = SMOLLM / task / "data" / "train.jsonl"
    if not split.exists():
        raise SystemExit(f"no {split}: run `make run` (or its prepare_data job) first")
    records = distinct_repeats(read_jsonl(split), need)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return base, data, {**spec, "max_length": spec["max_length"] + 8}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def check_merges(tmp: Path, k: int) -> list[tuple[str, bool, float, float]]:
    base = synthetic_base(tmp / "merge-base")
    models = [str(m) for m in fine_tunes(base, tmp / "merge-fts", k)]
    rows = []
    for name, method in METHODS.items():
        if method.needs_data:
            continue  # greedy_soup scores candidates with a model: covered by the evaluate path
        args = ["--method", name] + (["--seed", "0"] if method.seeded else [])
        keyed = [PARAMETERS[method.key_param].flag, "1"] if method.key_param else None  # select: resample1
        variants = [args] + ([args + keyed] if keyed else [])
        inputs = models[: method.max_models]  # slerp: 2
        for v in variants:
            label = " ".join(v[1:2] + v[4:])
            digests, seconds = {}, {}
            for device in ("cpu", "cuda"):
                out = tmp / f"merged-{label.replace(' ', '_')}-{device}"
                t = time.perf_counter()
                subprocess.run(
                    [
                        "ordermerge",
                        "merge",
                        "--base",
                        str(base),
                        *v,
                        "--device",
                        device,
                        "--force",
                        "--out",
                        str(out),
                        *inputs,
                    ],
                    check=True,
                    capture_output=True,
                )
                seconds[device], digests[device] = time.perf_counter() - t, sha256(out)
            rows.append((label, digests["cpu"] == digests["cuda"], seconds["cpu"], seconds["cuda"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU with a tiny model (tests this script)")
    a = ap.parse_args()
    if not torch.cuda.is_available() and not a.allow_cpu:
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing was checked.")
        raise SystemExit(1)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    need = a.steps * a.batch_size
    base, data, spec = model_and_data(tmp, need, a.allow_cpu)
    params = sum(
        t.numel()
        for t in __import__("safetensors.torch", fromlist=["load_file"])
        .load_file(str(base / "model.safetensors"))
        .values()
    )
    cfg = {
        "epochs": 1,
        "batch_size": a.batch_size,
        "micro_batch_size": None,
        "lr": 1e-5,
        "schedule": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "save_dtype": "bfloat16",
        "compute_dtype": "bfloat16" if torch.cuda.is_available() else "float32",
    }
    peak = a.peak_tflops or peak_tflops(device)
    print(
        f"device {device}; torch {torch.__version__}; model {base} ({params / 1e6:.1f} M parameters); "
        f"{a.steps} steps x batch {a.batch_size}, {cfg['compute_dtype']} autocast, sdpa attention"
    )
    t0 = time.perf_counter()
    rates = {}
    for label, packing in (("padded", False), ("packed", True)):
        rates[label], tokens = bench_ordermerge(base, data, spec, {**cfg, "packing": packing}, a.steps, tmp)
        mfu = f"{100 * rates[label] * 6 * params / (peak * 1e12):.1f} %" if peak else "n/a (pass --peak-tflops)"
        print(f"fine-tune {label:7s} {rates[label]:10.0f} tokens/s   MFU {mfu}   ({tokens} tokens timed)")
    print(f"packed/padded {rates['packed'] / rates['padded']:.2f}x   ({time.perf_counter() - t0:.0f} s)")
    if not torch.cuda.is_available():
        print("merge --device cuda: skipped (no CUDA device)")
        return
    rows = check_merges(tmp, a.k)
    print(f"\nmerge, K={a.k} synthetic SmolLM2-135M-shaped fine-tunes: --device cuda vs --device cpu")
    for label, same, cpu_s, gpu_s in rows:
        print(
            f"  {label:24s} {'identical bytes' if same else 'DIFFERENT BYTES':16s} "
            f"cpu {cpu_s:6.1f} s   cuda {gpu_s:6.1f} s"
        )
    if not all(same for _, same, _, _ in rows):
        raise SystemExit("gpu-check: some merges differ between the GPU and the CPU")
    print(f"gpu-check passed in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
