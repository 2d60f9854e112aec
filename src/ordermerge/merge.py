"""Streaming merge of K fine-tunes of one base: one tensor at a time, from memory-mapped safetensors.

Output is a complete Hugging Face directory (sharded safetensors + index, the base's config and
tokenizer, a model card) plus ``merge.json`` provenance, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .atomic import atomic_path
from .checkpoint_io import CheckpointError, LazyCheckpoint, ShardedWriter, copy_sidecars, parse_size
from .merge_math import normalized_weights, select, weighted_average
from .seeding import derive_seed

METHODS = ("average", "select")


def method_key(method: str, resample: int = 0) -> str:
    """The name used in paths and tables: average, select, resample1, resample2, ..."""
    return f"resample{resample}" if method == "select" and resample > 0 else method


def parse_method_key(key: str) -> tuple[str, int]:
    if key.startswith("resample"):
        return "select", int(key[len("resample"):])
    if key in METHODS:
        return key, 0
    raise ValueError(f"unknown merge method {key!r}; use average, select or resampleN (N = 1..8)")


def sha256_of_dir(directory: Path) -> str:
    """Digest of a model's weight files (names and bytes), for provenance."""
    h = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def _check_compatible(base: LazyCheckpoint, models: list[LazyCheckpoint]) -> None:
    names = base.keys()
    for m in models:
        if m.keys() != names:
            extra = sorted(set(m.keys()) ^ set(names))
            raise CheckpointError(f"{m.directory}: tensor names differ from the base {base.directory} (e.g. {extra[0]}); "
                                  "merge only fine-tunes of this base")
        for name in names:
            if m.meta(name) != base.meta(name):
                raise CheckpointError(f"{m.directory}: tensor {name} is {m.meta(name)} but the base has {base.meta(name)}; "
                                      "save every fine-tune in the base's shapes and dtype")


def merge_models(
    base_dir: str | Path,
    model_dirs: list[str | Path],
    out_dir: str | Path,
    method: str = "select",
    resample: int = 0,
    seed: int = 0,
    weights: list[float] | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Merge ``model_dirs`` (fine-tunes of ``base_dir``) into ``out_dir``; returns the provenance."""
    out_dir = Path(out_dir)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not 0 <= resample <= 8:
        raise ValueError(f"resample must be in 0..8, got {resample}")
    if resample and method != "select":
        raise ValueError("resample applies to method 'select' only")
    if len(model_dirs) < 2:
        raise ValueError(f"need at least 2 models to merge, got {len(model_dirs)}")
    if len(model_dirs) > 255:
        raise ValueError("at most 255 models can be merged at once")
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    probs = normalized_weights(weights, len(model_dirs))
    base = LazyCheckpoint(base_dir)
    models = [LazyCheckpoint(d) for d in model_dirs]
    _check_compatible(base, models)

    per_tensor = {}
    totals = {"elements": 0, "counts": [0] * len(models), "resampled": [0] * resample, "zero_after": 0}
    with atomic_path(out_dir, directory=True) as tmp:
        writer = ShardedWriter(tmp, parse_size(shard_size))
        for name in tqdm(base.keys(), desc=f"merge {method_key(method, resample)}", unit="tensor", disable=not progress):
            tensors = [m.get(name) for m in models]
            if method == "average" or not tensors[0].is_floating_point():
                merged = weighted_average(tensors, probs) if tensors[0].is_floating_point() else tensors[0]
            else:
                gen = torch.Generator().manual_seed(derive_seed(seed, "merge", name))
                merged, stats = select(tensors, probs, gen, base=base.get(name) if resample else None, resample=resample)
                n = merged.numel()
                per_tensor[name] = {
                    "fraction_from": [c / n for c in stats.counts],
                    "resampled": stats.resampled,
                    "zero_after": stats.zero_after,
                }
                totals["counts"] = [a + b for a, b in zip(totals["counts"], stats.counts)]
                totals["resampled"] = [a + b for a, b in zip(totals["resampled"], stats.resampled)]
                totals["zero_after"] += stats.zero_after
            totals["elements"] += merged.numel()
            writer.add(name, merged)
        writer.close()
        copy_sidecars(Path(base_dir), tmp)
        provenance = {
            "tool": f"ordermerge {__version__}",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "method": method,
            "method_key": method_key(method, resample),
            "resample": resample,
            "seed": seed,
            "weights": probs,
            "base": {"path": str(base_dir), "sha256": sha256_of_dir(Path(base_dir))},
            "inputs": [{"path": str(d), "sha256": sha256_of_dir(Path(d))} for d in model_dirs],
            "stats": {
                "elements": totals["elements"],
                "fraction_from": [c / max(1, totals["elements"]) for c in totals["counts"]] if method == "select" else None,
                "resampled_per_round": totals["resampled"],
                "zero_task_vector_after": totals["zero_after"],
            },
            "per_tensor": per_tensor,
        }
        (tmp / "merge.json").write_text(json.dumps(provenance, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(provenance))
    return provenance


def _model_card(p: dict) -> str:
    lines = [
        "---", "tags: [ordermerge, merge]", "---", "",
        f"# Merged model ({p['method_key']})", "",
        f"Merged by {p['tool']} from {len(p['inputs'])} fine-tunes of `{p['base']['path']}` "
        f"with method `{p['method']}`, resample={p['resample']}, seed={p['seed']}.",
        "Method: Ju et al., arXiv 2410.03743 (parameter selection, Eq. 2; resampling, Eq. 3).", "",
        "Inputs:", *[f"- `{i['path']}` (sha256 {i['sha256'][:16]}…)" for i in p["inputs"]], "",
        "Full provenance and per-tensor statistics: `merge.json`.", "",
    ]
    return "\n".join(lines)
