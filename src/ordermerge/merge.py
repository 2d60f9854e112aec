"""Streaming merge of K fine-tunes of one base, chunk by chunk, in parallel over chunks.

Memory holds K copies of one chunk per worker thread, never K models (nor K whole tensors).

Output is a complete Hugging Face directory (sharded safetensors + index, the base's config and
tokenizer, a model card) plus ``merge.json`` provenance, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import platform
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .atomic import atomic_path
from .checkpoint_io import CheckpointError, LazyCheckpoint, ShardedWriter, copy_sidecars, parse_size
from .merge_math import (CHUNK, INT_VIEW, SelectStats, chunk_rng, normalized_weights, select_bits, stored_bits,
                         weighted_average)

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
    buf = bytearray(1 << 20)  # reused and cache-sized: hashing is most of a merge's CPU time
    view = memoryview(buf)
    for path in sorted(directory.glob("*.safetensors")):
        h.update(path.name.encode())
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
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


class _ChunkMerger:
    """Merges one chunk of one tensor: reads it from all K inputs, computes, writes it out."""

    def __init__(self, base, models, writer, method, probs, seed, resample):
        self.base, self.models, self.writer = base, models, writer
        self.method, self.probs, self.seed, self.resample = method, probs, seed, resample
        self._local = threading.local()

    def _buffer(self, nbytes: int) -> np.ndarray:
        # One buffer per worker thread, reused: no allocation (or page faults) per chunk.
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.size < nbytes:
            buf = self._local.buf = np.empty(nbytes, np.uint8)
        return buf[:nbytes]

    def __call__(self, name: str, start: int, count: int) -> SelectStats | None:
        info = self.base.info(name)
        floating = info.torch_dtype.is_floating_point
        k = len(self.models) if floating else 1  # non-float tensors are copied from the first model
        with_base = floating and self.method == "select" and self.resample > 0
        buf = self._buffer((k + with_base) * count * info.itemsize)
        stack = buf.view(INT_VIEW[info.itemsize]).reshape(k + with_base, count)
        for i, m in enumerate(self.models[:k]):
            m.read_into(name, start, stack[i])
        stats = None
        if not floating:
            out = stack[0]
        elif self.method == "average":
            rows = torch.from_numpy(stack).view(info.torch_dtype)
            out = stored_bits(weighted_average(rows, self.probs)).numpy()
        else:
            if with_base:
                self.base.read_into(name, start, stack[k])
            rng = chunk_rng(self.seed, name, start // CHUNK)
            out, stats = select_bits(stack[:k], self.probs, rng, stack[k] if with_base else None, self.resample)
        self.writer.write(name, start, out)
        return stats


def _run_parallel(tasks: list[tuple], hash_dirs: list[Path], merger: _ChunkMerger, progress: bool, desc: str):
    """Chunks and input digests on torch.get_num_threads() worker threads (numpy and torch release the GIL)."""
    workers = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over chunks instead: intra-op threads would oversubscribe
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        chunks = [pool.submit(merger, *t) for t in tasks]
        digests = [pool.submit(sha256_of_dir, d) for d in hash_dirs]  # last: they overlap the output's sync
        for f in tqdm(as_completed(chunks), total=len(chunks), desc=desc, unit="chunk", disable=not progress):
            f.result()
        merger.writer.close()
        return [f.result() for f in chunks], [f.result() for f in digests]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        merger.writer.close(sync=False)  # on failure: closes the files before the temporary directory goes
        torch.set_num_threads(workers)


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
        raise ValueError(f"need at least 2 models to merge, got {len(model_dirs)}; pass K >= 2 MODEL_DIRs")
    if len(model_dirs) > 255:
        raise ValueError("at most 255 models can be merged at once")
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    probs = normalized_weights(weights, len(model_dirs))
    base = LazyCheckpoint(base_dir)
    models = [LazyCheckpoint(d) for d in model_dirs]
    _check_compatible(base, models)
    names = base.keys()
    tasks = [(name, lo, min(CHUNK, base.info(name).numel - lo))
             for name in names for lo in range(0, base.info(name).numel, CHUNK)]
    key = method_key(method, resample)
    try:
        with atomic_path(out_dir, directory=True) as tmp:
            writer = ShardedWriter(tmp, parse_size(shard_size), [(n, *base.meta(n)) for n in names])
            merger = _ChunkMerger(base, models, writer, method, probs, seed, resample)
            results, digests = _run_parallel(tasks, [Path(base_dir), *map(Path, model_dirs)], merger,
                                             progress, f"merge {key}")
            copy_sidecars(Path(base_dir), tmp)
            provenance = _provenance(base_dir, model_dirs, method, resample, seed, probs, digests,
                                     sum(base.info(n).numel for n in names), tasks, results)
            (tmp / "merge.json").write_text(json.dumps(provenance, indent=2) + "\n")
            (tmp / "README.md").write_text(_model_card(provenance))
    finally:
        for checkpoint in (base, *models):
            checkpoint.close()
    return provenance


def _provenance(base_dir, model_dirs, method, resample, seed, probs, digests, elements, tasks, results) -> dict:
    per_tensor: dict[str, SelectStats] = {}
    for (name, _, _), stats in zip(tasks, results):
        if stats is not None:
            per_tensor[name] = per_tensor[name] + stats if name in per_tensor else stats
    total = SelectStats([0] * len(model_dirs), [0] * resample)
    for stats in per_tensor.values():
        total = total + stats
    selected = sum(total.counts)
    return {
        "tool": f"ordermerge {__version__}",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "method": method,
        "method_key": method_key(method, resample),
        "resample": resample,
        "seed": seed,
        "weights": probs,
        "rng": f"numpy PCG64 per (seed, tensor, chunk of {CHUNK} elements)",
        "base": {"path": str(base_dir), "sha256": digests[0]},
        "inputs": [{"path": str(d), "sha256": h} for d, h in zip(model_dirs, digests[1:])],
        "stats": {
            "elements": elements,
            # over the elements that were selected (integer tensors are copied, not selected)
            "fraction_from": [c / max(1, selected) for c in total.counts] if method == "select" else None,
            "resampled_per_round": total.resampled,
            "zero_task_vector_after": total.zero_after,
        },
        "per_tensor": {
            name: {"fraction_from": [c / max(1, sum(s.counts)) for c in s.counts],
                   "resampled": s.resampled, "zero_after": s.zero_after}
            for name, s in sorted(per_tensor.items())
        },
    }


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
